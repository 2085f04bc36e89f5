"""Faults: outputs are written whole or not at all."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY

import train
from predictive.harness.files import AtomicCheckpointIO, atomic_write, write_text


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
