"""The training harness: configs compose, runs write what they promise, resume is exact, bad
settings fail early, wandb stays offline under the run dir, a multirun writes a comparison."""

import gc
import json
import math
import os
import subprocess
import sys
import time
from itertools import product

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import train
from predictive.harness import report

GROUPS = {g: sorted(p.stem for p in (ROOT / "configs" / g).glob("*.yaml")) for g in
          ("task", "model", "learning", "trainer", "logger", "scheduler")}
TIMING = ("steps_per_second", "time_steps_per_second", "train_seconds", "peak_memory_mb", "us_per_element")


def config(out, *overrides, base=TINY):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*base, f"paths.output_dir={out}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as @hydra.main does: ${hydra:...} resolves
    with open_dict(cfg):
        del cfg.hydra  # ... and the job's config has no hydra node
    return cfg


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_combination_composes(tmp_path):
    assert {"sequence", "speech", "taxi"} <= set(GROUPS["task"])
    assert {"local", "backprop", "hybrid", "frozen"} == set(GROUPS["learning"])
    assert {"stack", "lstm"} <= set(GROUPS["model"]) and {"cpu", "gpu", "ddp"} <= set(GROUPS["trainer"])
    # trainer and logger are independent of the rest: pair each with one combination.
    runtime = list(product(GROUPS["trainer"], GROUPS["logger"]))
    for i, (task, model, learning) in enumerate(product(GROUPS["task"], GROUPS["model"], GROUPS["learning"])):
        trainer, logger = runtime[i % len(runtime)]
        cfg = config(tmp_path, f"task={task}", f"learning={learning}", f"model={model}", f"trainer={trainer}",
                     f"logger={logger}", base=[])
        resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert resolved["task"]["_target_"].startswith("tasks.")
        assert resolved["learning"]["rule"]["name"] == learning
    assert i + 1 >= len(runtime)  # every trainer x logger pair was used
    # Each model and rule config matches its constructor.
    for model in GROUPS["model"]:
        net = instantiate(config(tmp_path, f"model={model}", base=[]).model, input_size=16)
        assert net.output_size > 0
    for learning in GROUPS["learning"]:
        assert instantiate(config(tmp_path, f"learning={learning}").learning.rule).name == learning


@pytest.mark.parametrize("learning", ["local", "backprop", "hybrid"])
def test_the_saved_config_is_what_runs(tmp_path, learning):
    # Each mode's layer settings come from its config (configs/learning/*.yaml `layer`), and
    # building the run changes none of them: the resolved config saved with a run is what ran.
    from predictive.harness.module import PredictiveModule

    cfg = config(tmp_path, f"learning={learning}")
    task = instantiate(cfg.task)
    model = instantiate(cfg.model, input_size=task.input_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PredictiveModule(task, model, instantiate(cfg.learning.rule), instantiate(cfg.optimizer))
    expected = {"local": (True, 300, "empty"), "backprop": (False, 0, "random"), "hybrid": (True, 0, "empty")}
    layer = model.layers[0]
    assert (cfg.model.recall, cfg.model.fresh_steps, cfg.model.initial_segments) == expected[learning]
    assert (layer.recall, layer.fresh_steps, layer.initial_segments) == expected[learning]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model", ["stack", "lstm", "cnn"])
def test_the_code_defaults_are_the_config_defaults(tmp_path, model):
    import inspect

    from predictive import PredictiveHebbian, TemporalMemory
    from predictive.learning import Hybrid

    cfg = OmegaConf.to_container(config(tmp_path, f"model={model}", base=[]).model, resolve=True)
    cls = TemporalMemory if model == "stack" else type(instantiate(cfg, input_size=640))
    code = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    differ = {k: (code[k], v) for k, v in cfg.items() if k in code and code[k] != v and k != "frequency_bins"}
    assert not differ, f"{cls.__name__}: code default != config default: {differ}"
    if model == "stack":
        for name, rule_cls in (("local", PredictiveHebbian), ("hybrid", Hybrid)):
            rule = OmegaConf.to_container(config(tmp_path, f"learning={name}", base=[]).learning.rule)
            code = {k: p.default for k, p in inspect.signature(rule_cls).parameters.items()
                    if p.default is not p.empty}
            assert not {k: (code[k], v) for k, v in rule.items() if k in code and code[k] != v}


def test_help_lists_groups():
    result = cli("train.py", "--help")
    assert result.returncode == 0, result.stderr
    for group, options in GROUPS.items():
        assert f"{group}: " + ", ".join(options) in result.stdout


def test_wrong_override_gets_hydra_error():
    result = cli("train.py", "learning=nonsense")
    assert result.returncode != 0
    assert "Could not find 'learning/nonsense'" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1: a number > 0"),
    ("model.active_columns=100", "model.active_columns=100: an integer in [1, columns=64], or a number in (0, 1]"),
    ("task.chunk=0", "task.chunk=0: an integer >= 1"),
    ("torch_threads=0", "torch_threads=0: an integer >= 1 or null"),
    ("scheduler=cosine trainer.max_epochs=-1",
     "scheduler.T_max=-1: an integer >= 1\ntrainer.max_epochs=-1: an integer >= 1 with a scheduler"),
])
def test_bad_value_is_a_value_error_naming_it(tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        train.train(config(tmp_path, *override.split()))
    assert str(e.value).startswith(message)
    assert not (tmp_path / "checkpoints").exists()  # failed before any training


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """An uninterrupted local-mode run; the reference for the resume test."""
    out = tmp_path_factory.mktemp("local")
    return out, train.train(config(out, "learning=local"))


def check_run(out, summary, learning):
    assert (out / "checkpoints" / "last.ckpt").exists()
    written = json.loads((out / "summary.json").read_text())
    assert written["status"] == "completed" and summary["status"] == "completed"
    assert written["learning"] == learning and written["task"] == "sequence"
    for key in ("steps_per_second", "time_steps_per_second", "peak_memory_mb", "train/loss", "final_accuracy"):
        assert key in written
    assert written["steps_per_second"] > 0 and written["peak_memory_mb"] > 10
    assert math.isfinite(written["train/loss"])
    assert summary["learning"] == learning


def test_local_run(local_run):
    out, summary = local_run
    check_run(out, summary, "local")
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/anomaly" in metrics
    assert (out / "curve_accuracy.png").exists() and (out / "curves.json").exists()
    # The model learned by its local rules (its synapses changed) though no gradient reached it.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ArrayStreams"]["position"] == 4  # the datamodule's stream position
    assert ckpt["stream_state"] is not None
    assert gc.get_freeze_count() == 0  # frozen for training only: a multirun's finished jobs are collected


def test_step_values_are_logged_when_lightning_writes_them_and_at_the_end(tmp_path, local_run):
    # The module logs the loss only at the batches Lightning writes (every log_every_n_steps)
    # and at the last one: the logger gets the same rows, the summary the final loss.
    out, summary = local_run  # every batch logged (log_every_n_steps=1)
    every3 = train.train(config(tmp_path, "learning=local", "trainer.log_every_n_steps=3"))
    assert every3["train/loss"] == summary["train/loss"]

    def rows(path):
        lines = (path / "csv" / "metrics.csv").read_text().splitlines()
        header = lines[0].split(",")
        return [dict(zip(header, line.split(","))) for line in lines[1:]]

    written = [r for r in rows(tmp_path) if r["train/loss"]]
    assert [r["step"] for r in written] == ["2"]  # batch 3 of 4
    reference = {r["step"]: r for r in rows(out) if r["train/loss"]}
    assert len(reference) == 4 and written[0] == reference["2"]


@pytest.mark.parametrize("model", ["stack", "lstm"])
def test_a_frozen_model_ends_as_it_started(tmp_path, model):
    # learning=frozen: the floor of every comparison. The head learns; no parameter or
    # buffer of the model moves (no local update, no gradient, no duty cycle).
    base = TINY if model == "stack" else [o for o in TINY if not o.startswith("model.")]
    cfg = config(tmp_path, "learning=frozen", f"model={model}", base=base)
    train.train(cfg)
    L.seed_everything(cfg.seed, workers=True)  # as train.py builds it
    task = instantiate(cfg.task)
    start = instantiate(cfg.model, input_size=task.input_size).state_dict()
    end = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(start[k], end[f"model.{k}"]) for k in start)
    head = [k for k in end if k.startswith("head.")]
    assert head, "the head is trained"


def test_a_second_stage_starts_from_the_first_ones_model_with_a_fresh_head(tmp_path):
    # init_from: a fresh head on the layers a local run learned (under learning=frozen, the
    # linear evaluation of what they learned); the loaded model then ends as it started.
    cells = "task.features=cells"  # a linear head on the cells: one with weights to train
    train.train(config(tmp_path / "first", "learning=local", cells))
    path = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(path, weights_only=True)["state_dict"]
    second = train.prepare(config(tmp_path / "second", "learning=frozen", cells, f"init_from={path}")).module
    fresh = train.prepare(config(tmp_path / "fresh", "learning=frozen", cells)).module
    model, initial = second.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(value, first[f"model.{k}"]) for k, value in model.items())
    assert not all(torch.equal(value, initial[k]) for k, value in model.items())  # the first stage learned
    head = second.head.state_dict()
    assert all(torch.equal(value, fresh.head.state_dict()[k]) for k, value in head.items())
    assert not all(torch.equal(value, first[f"head.{k}"]) for k, value in head.items())
    summary = train.train(config(tmp_path / "trained", "learning=frozen", cells, f"init_from={path}"))
    assert summary["status"] == "completed" and summary["init_from"] == str(path)
    end = torch.load(tmp_path / "trained" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(end[k], value) for k, value in first.items() if k.startswith("model."))


def test_the_printed_headline_has_the_task_figures_and_counts():
    summary = {"seed": 0, "final_accuracy": 0.99947, "elements_to_95": 1031, "recovery_elements": None,
               "train/loss": 0.5, "fused": True, "us_per_element": 196.13}
    assert train.headline(summary) == "final_accuracy=0.9995, elements_to_95=1031, us_per_element=196.1"


def test_last_checkpoint_is_the_final_state_between_periodic_saves(tmp_path):
    train.train(config(tmp_path, "learning=local", "trainer.max_steps=3", "checkpoint.every_n_train_steps=2"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["ArrayStreams"]["position"] == 3


@pytest.mark.parametrize("learning", ["backprop", "hybrid"])
def test_gradient_modes_run(tmp_path, learning):
    check_run(tmp_path, train.train(config(tmp_path, f"learning={learning}", "trainer.max_steps=2")), learning)


def test_resume_is_exact(tmp_path, local_run, recwarn):
    reference_dir, reference = local_run
    stopped = tmp_path / "stopped"
    train.train(config(stopped, "learning=local", "trainer.max_steps=2"))
    resumed = tmp_path / "resumed"
    summary = train.train(config(resumed, "learning=local", f"ckpt_path={stopped}/checkpoints/last.ckpt"))
    # Stopped mid-epoch: Lightning must know the train loader resumes there (no warning that it does not).
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]
    assert {k: v for k, v in summary.items() if k not in TIMING} == \
           {k: v for k, v in reference.items() if k not in TIMING}
    a = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for name, value in a["stream_state"].items():
        assert torch.equal(value, b["stream_state"][name]), name
    assert str(a["optimizer_states"]) == str(b["optimizer_states"])


def test_resume_from_a_stream_state_of_another_version_fails_clearly(tmp_path):
    stopped = tmp_path / "stopped"
    train.train(config(stopped, "learning=local", "trainer.max_steps=1"))
    ckpt = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)
    del ckpt["stream_state"]["0.diverted"]  # as saved before that state existed
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"stream state does not fit this model: missing \['0.diverted'\]"):
        train.train(config(tmp_path / "resumed", "learning=local", f"ckpt_path={tmp_path / 'old.ckpt'}"))


def test_non_finite_input_stops_the_run(tmp_path, monkeypatch):
    from tasks.sequence import SymbolInput

    monkeypatch.setattr(SymbolInput, "forward", lambda self, batch: torch.full((*batch["symbol"].shape, 128), math.nan))
    with pytest.raises(FloatingPointError, match="NaN"):
        train.train(config(tmp_path))
    written = json.loads((tmp_path / "summary.json").read_text())  # a script can tell it from a finished run
    assert written["status"] == "failed" and written["error"].startswith("FloatingPointError: non-finite values")


def test_the_loss_check_names_the_losses_only_when_it_fails():
    from predictive.harness.module import check_finite

    def name():
        raise AssertionError("built although the loss was finite")

    check_finite(torch.tensor(1.0), name)  # finite: the name (which reads tensors) is never built
    with pytest.raises(FloatingPointError, match=r"in the loss \(task loss nan\); stopping"):
        check_finite(torch.tensor(math.nan), lambda: "loss (task loss nan)")


def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train.train(config(tmp_path, "logger=wandb", "trainer.max_steps=2"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log_file = next(runs[0].glob("run-*.wandb"))
    for _ in range(50):  # wandb's service may still be flushing the file when finish() returns
        if b"train/anomaly" in log_file.read_bytes():
            break
        time.sleep(0.2)
    log = log_file.read_bytes()
    assert b"train/loss" in log and b"train/anomaly" in log  # the metrics are in the run's log


def test_multirun_writes_comparison(tmp_path, monkeypatch):
    # From another folder, with the default sweep dir (multirun/<time>/ under the cwd).
    overrides = [o for o in TINY if not o.startswith("logger")]
    command = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, "logger=none", "trainer.max_steps=2",
               "learning=local,backprop,hybrid"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    table = (sweep / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| sequence |")]
    assert sorted(row.split(" | ")[1] for row in rows) == ["backprop", "hybrid", "local"]
    assert "steps_per_second" in table and "±" in table
    assert (sweep / "metrics.png").exists() and (sweep / "curve_accuracy.png").exists()
    os.remove(sweep / "comparison.md")
    # A re-test in a run's evaluate/ (tasks.speech.evaluate writes one there) is not a run.
    retest = next(sweep.rglob("summary.json")).parent / "evaluate"
    retest.mkdir()
    (retest / "summary.json").write_text('{"final_accuracy": 0.0}')
    monkeypatch.chdir(tmp_path)  # the report names the dir as given, here relative to the cwd
    rebuilt = report.write_report(sweep.relative_to(tmp_path)).read_text()
    assert rebuilt == table  # rebuilt from the run dirs alone
    # A summary.json that names no task, learning or model beside runs that do gets a row of "?".
    (sweep / "other").mkdir()
    (sweep / "other" / "summary.json").write_text('{"final_accuracy": 0.5}')
    assert "| ? | ? | ? | 1 |" in report.write_report(sweep.relative_to(tmp_path)).read_text()
