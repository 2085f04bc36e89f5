"""The NAB task: NAB's results layout, no look-ahead, bad input named early, incomplete corpora
refused, the download's stand-in, and runs of every learning mode and the LSTM."""

import csv
import json
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_harness import cli, config

import train
from tasks.nab import corpus
from tasks.nab.detector import Settings, detect
from tasks.nab.task import NabTask

NAB = Path(os.environ["PREDICTIVE_DATA_DIR"]) / "nab"
# Three short files whose label windows begin early, cut to their first 500 records.
FILES = ["realAWSCloudwatch/iio_us-east-1_i-a2eb1cd9_NetworkIn.csv", "realAdExchange/exchange-2_cpc_results.csv",
         "realTraffic/speed_7578.csv"]
SMALL = ["model.columns=128", "model.cells=4", "model.active_columns=8", "logger=csv", "task.records=500",
         "task.workers=1", "task.files=[" + ",".join(FILES) + "]", "task.plots=[realTraffic/speed_7578.csv]"]
MODEL = {"_target_": "predictive.stack.PredictiveStack", "columns": 128, "cells": 4, "active_columns": 8,
         "matching_threshold": 4}
LOCAL = {"_target_": "predictive.learning.build", "name": "local", "new_synapses": 10}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def nab_copy(root: Path, names: list[str], edit=None) -> Path:
    """A corpus under `root` with the given files of the real one (the label file lists them
    all); `edit(name, lines)` may change a file's lines."""
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "combined_windows.json").write_text(json.dumps({n: windows[n] for n in names}))
    for n in names:
        lines = (NAB / "data" / n).read_text().splitlines()
        if edit is not None:
            lines = edit(n, lines)
        (root / "data" / n).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / n).write_text("\n".join(lines) + "\n")
    return root


def test_run_writes_nabs_layout_and_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [o.replace("logger=csv", "logger=wandb") for o in SMALL]
    summary = train.train(config(tmp_path, "task=nab", *overrides, base=[]))
    for key in ("nab_standard", "nab_reward_low_fp", "nab_reward_low_fn", "nab_standard_realTraffic",
                "us_per_record", "wall_seconds", "records_per_second"):
        assert isinstance(summary[key], float), key
    assert summary["files"] == 3 and summary["records"] == 1500 and summary["complete"] is False
    assert json.loads((tmp_path / "summary.json").read_text())["nab_standard"] == summary["nab_standard"]
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    for name in FILES:
        group, file = name.split("/")
        path = tmp_path / "nab" / "predictivelocal" / group / f"predictivelocal_{file}"
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["timestamp", "value", "anomaly_score", "label"]
        data = list(csv.reader(open(NAB / "data" / name, newline="")))[1:501]
        assert [r[:2] for r in rows[1:]] == data  # one row per data row, timestamps and values as written
        scores = np.array([float(r[2]) for r in rows[1:]])
        assert np.all((scores >= 0) & (scores <= 1))
        labels = np.array([int(r[3]) for r in rows[1:]])
        stamps = [r[0] for r in data]
        expected = np.zeros(500, dtype=int)
        for start, end in windows[name]:
            if end[:19] not in stamps:  # past the 500 records: left out
                continue
            expected[stamps.index(start[:19]) : stamps.index(end[:19]) + 1] = 1
        assert labels.tolist() == expected.tolist() and labels.sum() > 0
    table = list(csv.DictReader(open(tmp_path / "files.csv")))
    assert [r["file"] for r in table] == sorted(FILES) and all(r["records"] == "500" for r in table)
    assert (tmp_path / "nab_speed_7578.png").stat().st_size > 10_000
    (run,) = (tmp_path / "wandb").glob("offline-run-*")  # the picture reaches wandb as an image too
    assert len(list((run / "files" / "media" / "images" / "nab").glob("nab_speed_7578_*.png"))) == 1


def test_cli_prints_the_three_scores(tmp_path):
    """`python train.py task=nab` through Hydra, files in two worker processes."""
    result = cli("train.py", "task=nab", *[o for o in SMALL if o != "task.workers=1"], "task.workers=2",
                 f"hydra.run.dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "standard" in result.stdout and "reward_low_FP" in result.stdout and "reward_low_FN" in result.stdout
    assert f"{tmp_path}/nab/predictivelocal" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["files"] == 3


def test_no_look_ahead():
    """Rows after t changed (the file's min and max kept, as NAB lets them set the value
    range): the raw scores and the reported scores up to t stay the same."""
    name = "realTraffic/speed_7578.csv"
    series = corpus.truncate(corpus.read_series(NAB / "data" / name, name), 600)
    changed = corpus.truncate(corpus.read_series(NAB / "data" / name, name), 600)
    t = 250  # within a chunk of 100
    rng = np.random.default_rng(0)
    low, high = series.values.min(), series.values.max()
    changed.values[t:] = rng.uniform(low, high, 600 - t)
    for extreme in (series.values.argmin(), series.values.argmax()):
        changed.values[extreme] = series.values[extreme]
    task = NabTask(data_dir=NAB.parent, files=[name], records=600, workers=1)
    for model in (MODEL, {"_target_": "predictive.baselines.LSTMModel", "hidden_size": 16}):
        raw, _ = detect(series, Settings(), model, LOCAL, ADAM, None, 0)
        raw2, _ = detect(changed, Settings(), model, LOCAL, ADAM, None, 0)
        np.testing.assert_array_equal(raw[:t], raw2[:t])
        assert not np.array_equal(raw[t:], raw2[t:])
        np.testing.assert_array_equal(task.final_scores(series, raw)[:t], task.final_scores(changed, raw2)[:t])


@pytest.mark.parametrize("line, match", [
    (",12.0", "missing timestamp"),
    ("2015-09-08 13:09:00,fast", "unparsable value 'fast'"),
    ("2015-09-08 13:09:00,nan", "value is nan"),
    ("2015-09-08 25:09:00,12.0", "unparsable timestamp"),
    ("2015-09-07 13:09:00,12.0", "goes back"),
])
def test_bad_rows_are_named_with_file_and_line(tmp_path, line, match):
    name = "realTraffic/speed_7578.csv"

    def edit(_, lines):
        return lines[:20] + [line] + lines[21:]

    root = nab_copy(tmp_path, [name], edit)
    with pytest.raises(ValueError, match=f"speed_7578.csv:21: .*{match}"):
        NabTask(root=root, workers=1)
    task = NabTask(root=root, workers=1, skip_bad=True)  # or skipped and listed
    series = task.series[name]
    assert len(series) == 1127 and not series.good[19] and series.good.sum() == 1126
    assert series.skipped[0].startswith("line 21:") and match in series.skipped[0]


def test_a_file_of_the_label_list_missing_is_refused(tmp_path):
    root = nab_copy(tmp_path, FILES)
    (root / "data" / FILES[1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: 1 of 3 files are missing \(realAdExchange/exchange-2"):
        NabTask(root=root)
    with pytest.raises(FileNotFoundError, match="results files are missing"):
        corpus.read_results(tmp_path / "results", "numenta", {n: [] for n in FILES})


@pytest.mark.parametrize("setting, match", [
    ({"detector": "my_detector"}, "task.detector"),
    ({"score": "probability"}, "task.score"),
    ({"raw": "cells"}, "task.raw"),
    ({"workers": 0}, "task.workers"),
    ({"files": ["realTraffic/nothing.csv"]}, "task.files"),
    ({"colour": 1}, "unknown settings colour"),
])
def test_bad_settings_are_named(setting, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NabTask(data_dir=NAB.parent, **setting)


@pytest.mark.parametrize("setting", ["ckpt_path", "init_from"])
def test_a_checkpoint_is_refused_not_ignored(tmp_path, setting):
    # Every file starts a fresh model: a checkpoint to resume or start from would be ignored.
    with pytest.raises(ValueError, match=rf"^{setting}=any.ckpt: task=nab starts a fresh model for every file"):
        train.prepare(config(tmp_path, "task=nab", *SMALL, f"{setting}=any.ckpt", base=[]))


def test_download_unpacks_nabs_archive(tmp_path, monkeypatch):
    """task.download=true with nothing there: NAB's repository archive (a stand-in in the same
    layout) is unpacked into <data_dir>/nab; nothing is fetched when the corpus is there."""
    repo = nab_copy(tmp_path / "archive" / "NAB-master", FILES[:1])
    archive = tmp_path / "NAB-master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in repo.rglob("*"):
            z.write(path, path.relative_to(tmp_path / "archive"))
    fetched = []

    def fake_retrieve(url, dest):
        fetched.append(url)
        shutil.copy(archive, dest)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_retrieve)
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="task.download=true"):
        NabTask(data_dir=data_dir)
    task = NabTask(data_dir=data_dir, download=True)
    assert fetched == [corpus.NAB_URL] and list(task.series) == FILES[:1]
    NabTask(data_dir=data_dir, download=True)
    assert len(fetched) == 1


@pytest.mark.parametrize("overrides", [
    ["learning=backprop"],
    ["learning=hybrid"],
    ["model=lstm", "learning=local"],
    ["model=lstm", "learning=backprop"],
    ["task.score=raw"],
])
def test_every_mode_runs_on_the_same_protocol(tmp_path, overrides):
    small = [o for o in SMALL if o != "task.files=[" + ",".join(FILES) + "]"] + ["task.files=[" + FILES[2] + "]"]
    small = [o.replace("task.records=500", "task.records=400") for o in small]  # one window
    if "model=lstm" in overrides:
        small = [o for o in small if not o.startswith("model.")] + ["model.hidden_size=32"]
    summary = train.train(config(tmp_path, "task=nab", *small, *overrides, base=[]))
    scores = corpus.read_scores(next((tmp_path / "nab").rglob("*.csv")))[1]
    assert len(scores) == 400 and np.all((scores >= 0) & (scores <= 1))
    assert summary["learning"] == next((o.split("=")[1] for o in overrides if o.startswith("learning=")), "local")
    assert summary["score"] == ("raw" if "task.score=raw" in overrides else "likelihood")
    assert summary["nab_standard"] is not None


def test_the_raw_score_run_is_a_row_of_its_own_in_the_comparison(tmp_path):
    from predictive.harness import report

    runs = {"0": ("local", "likelihood", 72.0), "1": ("backprop", "likelihood", 40.0),
            "2": ("local", "raw score", 61.0)}
    for run, (learning, variant, score) in runs.items():
        (tmp_path / run).mkdir()
        summary = {"task": "nab", "learning": learning, "model": "nab_stack", "variant": variant, "nab_standard": score}
        (tmp_path / run / "summary.json").write_text(json.dumps(summary))
    table = report.write_report(tmp_path).read_text()
    assert "| nab | local | nab_stack | likelihood | 1 | 72.00 ± 0.00 |" in table
    assert "| nab | local | nab_stack | raw score | 1 | 61.00 ± 0.00 |" in table
