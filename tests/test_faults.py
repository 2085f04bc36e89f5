"""Faults: outputs are written whole or not at all."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TINY

import train
from predictive.harness.files import AtomicCheckpointIO, atomic_write, write_text
from predictive.harness.resume import CheckpointError


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "summary.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would make it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.{dead.stdout.strip()}-0123abcd.tmp"  # what a SIGKILL during a save leaves
    stale.write_bytes(b"torn")
    mine = tmp_path / f".last.ckpt.{os.getpid()}-0123abcd.tmp"  # a live process's (this one's): kept
    mine.write_bytes(b"in progress")
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, path)
    assert not stale.exists() and mine.exists()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_runs_save_checkpoints_through_the_atomic_writer(tmp_path, monkeypatch):
    from test_harness import config

    saved = []
    save = AtomicCheckpointIO.save_checkpoint
    record = lambda self, checkpoint, path, **kw: saved.append(path) or save(self, checkpoint, path)  # noqa: E731
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    train.train(config(tmp_path, "trainer.max_steps=2", base=TINY))
    assert saved and all(str(p).endswith("last.ckpt") for p in saved)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last.ckpt"]


# --- checkpoints named on failure ------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real checkpoint: the tiny sequence run stopped after two chunks."""
    from test_harness import config

    out = tmp_path_factory.mktemp("saved")
    train.train(config(out, "trainer.max_steps=2"))
    return out / "checkpoints" / "last.ckpt"


def resume_error(tmp_path, ckpt, *overrides) -> str:
    """The error that stops a run resumed from `ckpt`, raised before anything trains."""
    from test_harness import config

    with pytest.raises(CheckpointError) as e:
        train.prepare(config(tmp_path / "resumed", f"ckpt_path={ckpt}", *overrides))
    assert not (tmp_path / "resumed").exists()  # nothing written: no training started
    return str(e.value)


def test_a_checkpoint_that_cannot_be_read_is_named(tmp_path, saved):
    missing = tmp_path / "nowhere.ckpt"
    assert resume_error(tmp_path, missing) == f"ckpt_path={missing}: no such file"
    torn = tmp_path / "torn.ckpt"  # what a kill during a save in place left behind
    torn.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 8)
    text = tmp_path / "summary.json"
    text.write_text('{"final_accuracy": 1.0}')
    for path in (torn, junk, text):
        message = resume_error(tmp_path, path)
        assert message.startswith(f"ckpt_path={path}: truncated or not a checkpoint (") and "\n" not in message
    weights = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.ones(3)}, weights)
    assert resume_error(tmp_path, weights) == f"ckpt_path={weights}: not a training checkpoint (it has no state_dict)"


def test_a_checkpoint_of_another_run_is_named(tmp_path, saved):
    assert resume_error(tmp_path, saved, "learning=backprop") == \
        f"ckpt_path={saved}: saved by learning=local, this run is learning=backprop"
    assert resume_error(tmp_path, saved, "model.columns=32", "task.chunk=10") == (
        f"ckpt_path={saved}: saved with other settings: model.columns=64 there, 32 here; task.chunk=20 there, "
        "10 here; resume with the overrides it was saved with")
    ckpt = torch.load(saved, weights_only=True)
    ckpt["run"]["choices"]["task"] = "taxi"  # as a taxi run's checkpoint says
    torch.save(ckpt, tmp_path / "taxi.ckpt")
    assert resume_error(tmp_path, tmp_path / "taxi.ckpt") == \
        f"ckpt_path={tmp_path / 'taxi.ckpt'}: saved by task=taxi, this run is task=sequence"
    del ckpt["run"]  # a checkpoint that does not say which run saved it: its weights must still fit
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert resume_error(tmp_path, tmp_path / "old.ckpt", "model.columns=32") == (
        f"ckpt_path={tmp_path / 'old.ckpt'}: does not fit this model: model.layers.0.feedforward.parametrizations."
        "weight.original is 64x128 in the checkpoint, 32x128 here (saved with other model settings)")


# --- a run cut short says so -------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_the_batch_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, signum):
    from test_harness import TIMING, config

    from predictive.harness.module import PredictiveModule

    base = [o for o in TINY if not o.startswith("checkpoint.")]  # no save every step: the stop saves
    whole = train.train(config(tmp_path / "whole", base=base))
    step = PredictiveModule.training_step

    def signalled(self, batch, batch_idx):
        if self.trainer.global_step == 1:  # in the second of four chunks
            os.kill(os.getpid(), signum)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PredictiveModule, "training_step", signalled)
    stopped = train.train(config(tmp_path / "stopped", base=base))
    monkeypatch.setattr(PredictiveModule, "training_step", step)
    assert stopped["status"] == "interrupted" and stopped["signal"] == signal.Signals(signum).name
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["status"] == "interrupted"
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["ArrayStreams"]["position"] == 2  # the chunk in progress was finished
    resumed = train.train(config(tmp_path / "resumed", f"ckpt_path={last}", base=base))
    assert resumed["status"] == "completed"
    assert {k: v for k, v in resumed.items() if k not in TIMING} == {k: v for k, v in whole.items() if k not in TIMING}
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_a_model_to_start_from_that_cannot_be_loaded_is_named(tmp_path, saved):
    from test_harness import config

    def error(path, *overrides):
        with pytest.raises(CheckpointError) as e:
            train.prepare(config(tmp_path / "second", f"init_from={path}", *overrides))
        assert not (tmp_path / "second").exists()
        return str(e.value)

    assert error(tmp_path / "nowhere.ckpt") == f"init_from={tmp_path / 'nowhere.ckpt'}: no such file"
    assert error(saved, "model.columns=32") == (
        f"init_from={saved}: its model does not fit this one: model.layers.0.feedforward.parametrizations.weight."
        "original is 64x128 in the checkpoint, 32x128 here (give the model settings it was saved with)")
    assert error(saved, "model.layers=2").startswith(
        f"init_from={saved}: its model does not fit this one: missing [model.layers.1.")
