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
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
