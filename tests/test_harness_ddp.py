"""trainer=ddp: Lightning's DDP strategy with 2 CPU processes (gloo) on a tiny model."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY


@pytest.mark.parametrize("learning", ["local", "backprop"])
def test_ddp_two_cpu_processes(tmp_path, learning):
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, "trainer=ddp", "trainer.accelerator=cpu", f"learning={learning}",
         "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout  # both processes joined the group
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["learning"] == learning and summary["steps_per_second"] > 0
    assert summary["streams"] == 2  # one stream per process, both in the figures
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2


def test_ddp_resume_continues_every_process_streams(tmp_path):
    # Each process learns its own streams; a resumed run must give each one back its own
    # stream state, metrics and RNG (before, every process got process 0's).
    def run(out, *extra):
        result = subprocess.run(
            [sys.executable, "train.py", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "learning=local",
             f"hydra.run.dir={out}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)

    reference = run(tmp_path / "reference")
    run(tmp_path / "stopped", "trainer.max_steps=2")
    resumed = run(tmp_path / "resumed", f"ckpt_path={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}")
    assert len(reference["ranks"]) == len(resumed["ranks"]) == 2
    for a, b in zip(reference["ranks"], resumed["ranks"]):
        for name in ("correct", "anomaly"):
            assert torch.equal(a["task_state"][name].nan_to_num(), b["task_state"][name].nan_to_num())
        assert all(torch.equal(a["stream_state"][k], b["stream_state"][k]) for k in a["stream_state"])
    # The two processes did learn different streams.
    assert not torch.equal(reference["ranks"][0]["stream_state"]["0.columns"],
                           reference["ranks"][1]["stream_state"]["0.columns"])
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_resuming_streams_with_another_number_of_processes_fails_clearly(tmp_path):
    stopped = tmp_path / "stopped"
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "learning=local",
         "trainer.max_steps=2", f"hydra.run.dir={stopped}"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, "learning=local", f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}",
         f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # named before training, in one line
    assert result.stderr.splitlines()[-1] == (
        f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}: saved by 2 process(es), this run has 1: resume with "
        "the devices and nodes it was saved with")
