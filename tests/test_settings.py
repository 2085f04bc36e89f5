"""Every numeric or choice setting of every config group is checked before anything is built: an
out-of-range value fails with one line `<group>.<key>=<value>: <what is allowed>`."""

import subprocess
import sys

import pytest
from conftest import ROOT
from omegaconf import OmegaConf, open_dict
from test_harness import config

import train
from predictive.harness.settings import SettingError, check_settings, show

# Settings that name things (files, folders, classes, wandb projects), not numbers or choices.
FREE_TEXT = {"_target_", "_partial_", "data_dir", "root", "file", "output_dir", "dirpath", "save_dir", "name",
             "version", "project", "entity", "group", "tags", "ckpt_path", "init_from", "split_files",
             "set",  # task.set: published | generated | a file
             "test_speaker", "val_speaker"}  # FSDD's voices, checked against the data set when it is read
# What to try for a setting whose default is null (its type is not in the config).
BAD_WHEN_NULL = {"records": 0, "f_max": -2, "frequency_bins": -2, "speaker_pattern": "no group"}
WALKED = {"config": 9, "nab": 23, "sequence": 16, "speech": 41, "taxi": 19, "cnn": 4, "lstm": 2, "sparse_cnn": 13,
          "continual_stack": 21, "nab_stack": 21, "speech_stack": 21, "stack": 21, "taxi_stack": 21, "backprop": 5,
          "frozen": 4, "hybrid": 24, "local": 20, "cpu": 9, "ddp": 12, "gpu": 9, "cosine": 1}  # 316 settings
OPTIONS = [(group, p.stem) for group in ("task", "model", "learning", "trainer", "scheduler")
           for p in sorted((ROOT / "configs" / group).glob("*.yaml"))]


def bad_value(key: str, value):
    """An out-of-range value of the setting's own type."""
    name = key.rsplit(".", 1)[-1]
    if value is None:
        return BAD_WHEN_NULL.get(name)
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return -2
    if isinstance(value, str):
        return "nonsense"
    if isinstance(value, list):
        return [-2]
    raise AssertionError(f"{key}: no bad value for {value!r}")


def settings(node, prefix=""):
    """(dotted key, value) of every setting below `node` that is a number or a choice."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key in FREE_TEXT or (path in ("logger", "scheduler") and value is None):
            continue
        if isinstance(value, dict):
            yield from settings(value, f"{path}.")
        else:
            yield path, value


@pytest.mark.parametrize("group, option", [("", "config"), *OPTIONS])
def test_every_setting_out_of_range_is_named_in_one_line(group, option):
    cfg = config("out", *([f"{group}={option}"] if group else []), base=[])
    check_settings(cfg)  # the defaults are valid
    node = OmegaConf.to_container(cfg[group] if group else cfg, resolve=True)
    if not group:  # the top level and the groups configured in config.yaml itself
        node = {k: v for k, v in node.items() if k not in ("task", "model", "learning", "trainer", "paths")}
    walked = 0
    for key, value in settings(node, f"{group}." if group else ""):
        bad = bad_value(key, value)
        if bad is None:
            continue
        changed = cfg.copy()
        with open_dict(changed):
            OmegaConf.update(changed, key, bad, force_add=True)
        with pytest.raises(SettingError) as e:
            check_settings(changed)
        lines = str(e.value).splitlines()
        assert any(line.startswith(f"{key}={show(bad)}: ") for line in lines), (key, lines)
        walked += 1
    assert walked == WALKED[option]  # a setting added to a config is walked too (its bad value: bad_value)


def test_a_bad_setting_on_the_command_line_is_one_line_without_a_traceback(tmp_path, monkeypatch):
    bad = ["optimizer.lr=-1", "task.chunk=0"]
    result = subprocess.run([sys.executable, "train.py", *bad, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == "optimizer.lr=-1: a number > 0\ntask.chunk=0: an integer >= 1\n"
    # HYDRA_FULL_ERROR=1: the error itself, for its traceback.
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    argv = ["train.py", f"--config-path={ROOT / 'configs'}", *bad, f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SettingError, match="optimizer.lr=-1"):
        train.main()


@pytest.mark.parametrize("overrides, message", [
    (["task.speaker_pattern='^(spk)'"], "task.speaker_pattern=^(spk): null unless task.dataset=folder"),
    (["task.dataset=folder", "task.split_files=lists.txt"],
     "task.split_files=lists.txt: a CSV file with file and split columns, or {val: <list file>, test: <list file>"),
    (["task.dataset=folder", "task.speaker_pattern='(a)'", "task.split_files=s.csv"],
     "task.split_files=s.csv: null when task.speaker_pattern is set (one or the other)"),
])
def test_split_settings_apply_to_folders_one_at_a_time(overrides, message):
    with pytest.raises(SettingError) as e:
        check_settings(config("out", "task=speech", *overrides, base=[]))
    assert str(e.value).startswith(message)
