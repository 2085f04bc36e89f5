"""Shared test settings: the data root, wandb offline, and a tiny run of the real
sequence task for the harness tests (seconds on a CPU)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Real data sets beside the repository (../shared/data), unless the caller points elsewhere.
os.environ.setdefault("PREDICTIVE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
DATA = Path(os.environ["PREDICTIVE_DATA_DIR"])
os.environ.setdefault("WANDB_MODE", "offline")  # tests never talk to the wandb servers
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # many small ops per time step: one thread is faster (see configs/config.yaml)

# 4 chunks of 20 steps through a 64-column layer: a few seconds per run.
TINY = [
    "task=sequence", "task.length=80", "task.switch_after=40", "task.chunk=20",
    "task.code_size=128", "task.code_active=8",
    "model.columns=64", "model.cells=4", "model.active_columns=4",
    "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=1",
    "trainer.log_every_n_steps=1", "logger=csv",
]


def needs_data(*parts: str):
    """Skip a test whose data set (under the data root) is not there, saying which."""
    path = DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (shared data; PREDICTIVE_DATA_DIR)")


@pytest.fixture
def tiny():
    return list(TINY)
