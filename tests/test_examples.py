"""The examples run as written and learn what they say they learn."""

import subprocess
import sys

from conftest import ROOT


def run(script: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_learn_sequence_predicts_each_ending_from_its_first_element():
    lines = run("learn_sequence.py").splitlines()
    last = [line for line in lines if line.startswith("pass 11")]
    assert "saw C  anomaly 0.00  predicts next: D" in last[2]
    assert "saw C  anomaly 0.00  predicts next: Y" in last[6]
    first = [line for line in lines if line.startswith("pass  0")]
    assert all("anomaly 1.00" in line for line in first)  # nothing known at first


def test_a_temporal_memory_inside_your_own_module():
    assert "the readout says sequence [0, 1] (truth [0, 1])" in run("custom_module.py")


def test_import_predictive_needs_torch_alone():
    # The core is a library: the harness's Lightning, Hydra, wandb, pandas and matplotlib, and
    # numba (loaded when the compiled local step first runs), stay out of `import predictive`.
    heavy = ["lightning", "hydra", "wandb", "pandas", "matplotlib", "numba"]
    code = f"import sys, predictive; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
