"""Stop a run at any moment and resume it: a run killed (SIGKILL) again and again, during training,
inside a checkpoint save, during validation, during the test sweep and while summary.json is
written, each time resumed from its last.ckpt, ends with the summary figures and the weights of a
run that never stopped, and no kill leaves a torn file.

Each run is `train.py`'s main in a process forked from this one (a fresh interpreter would spend
seconds importing torch for every kill); the moment to stop at is set by hooks, not by timing, so
the test is reproducible: which moments a chain uses is drawn from a seeded RNG.
"""

import json
import multiprocessing
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import matplotlib.pyplot  # noqa: F401  (imported once here, not in every forked run)
import pytest
import torch
from conftest import ROOT, TINY
from test_harness import TIMING

import train
from predictive.harness import callbacks, files
from predictive.harness.module import PredictiveModule
from predictive.harness.resume import load_checkpoint
from tasks.speech import task  # noqa: F401

pytestmark = pytest.mark.slow


def stop(signum: int):
    os.kill(os.getpid(), signum)  # SIGKILL: gone; SIGTERM, SIGINT: the run stops after this batch


def half_written(path, data: bytes, signum: int):
    """Write half of `data` to `path` the way the run writes files, and stop there."""
    with files.atomic_write(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        stop(signum)


def arm(kind: str, n: int, signum: int):
    """Make this process stop (`signum`) at the moment (`kind`, `n`):
    train n: the training step that starts at global step n; save n / replace n: the save of the
    checkpoint of global step n, half written / written but not yet moved into place; val n: the
    second batch of the validation at global step n; test n: test batch n; summary n: the n-th
    write of summary.json in this process, half written."""
    step, save, replace = PredictiveModule.training_step, files.AtomicCheckpointIO.save_checkpoint, os.replace
    saving, summaries = {}, []

    def training_step(self, batch, batch_idx):
        if kind == "train" and self.trainer.global_step == n:
            stop(signum)
        return step(self, batch, batch_idx)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        saving["step"] = checkpoint["global_step"]
        if kind == "save" and checkpoint["global_step"] == n:
            buffer = __import__("io").BytesIO()
            torch.save(checkpoint, buffer)
            half_written(path, buffer.getvalue(), signum)
        return save(self, checkpoint, path, storage_options)

    def os_replace(source, target):
        if kind == "replace" and Path(target).name == "last.ckpt" and saving.get("step") == n:
            stop(signum)
        return replace(source, target)

    def evaluate(self, stage, batch):
        if kind == stage:
            loop = self.trainer.fit_loop.epoch_loop.val_loop if stage == "val" else self.trainer.test_loop
            batch_index = loop.batch_progress.current.ready - 1
            if (stage == "val" and self.trainer.global_step == n and batch_index == 1) or (
                    stage == "test" and batch_index == n):
                stop(signum)
        return evaluate_(self, stage, batch)

    def write_json(path, obj, **kwargs):
        if Path(path).name == "summary.json":
            summaries.append(path)
            if kind == "summary" and len(summaries) == n:
                half_written(path, json.dumps(obj, **kwargs).encode(), signum)
        return write(path, obj, **kwargs)

    evaluate_, write = PredictiveModule.evaluate, callbacks.write_json
    PredictiveModule.training_step, PredictiveModule.evaluate = training_step, evaluate
    files.AtomicCheckpointIO.save_checkpoint, os.replace, callbacks.write_json = save_checkpoint, os_replace, write_json


def child(args: list[str], moment):
    try:
        if moment:
            arm(*moment)
        sys.argv = ["train.py", f"--config-path={ROOT / 'configs'}", *args]
        train.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def run(out: Path, args: list[str], moment=None) -> int:
    """train.py with `args` into `out`, from its last.ckpt if there is one; its exit code
    (-9 when killed)."""
    last = out / "checkpoints" / "last.ckpt"
    resume = [f"ckpt_path={last}"] if last.exists() else []
    process = multiprocessing.get_context("fork").Process(target=child, args=([*args, *resume,
                                                                               f"hydra.run.dir={out}"], moment))
    process.start()
    process.join(300)
    if process.is_alive():
        process.kill()
        raise AssertionError(f"{moment}: still running after 300 s")
    return process.exitcode


def check_nothing_torn(out: Path):
    """Every file the run wrote reads whole (the previous version or the new one)."""
    for path in out.rglob("*"):
        if path.suffix == ".ckpt":
            load_checkpoint(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path


def when(moment) -> tuple:
    """Where a moment comes in a run: training steps, validation, saves, then the end of fit
    (summary.json's first write), the test sweep and the last writes."""
    kind, n = moment[:2]
    if kind in ("val", "save", "replace", "train"):  # at global step n: validate, save, then train on
        return 0, n, ("val", "save", "replace", "train").index(kind)
    return 1, n if kind == "test" else (-1 if n == 1 else 100 + n), 0


def draw(seed: int, candidates: dict[str, list], counts: dict[str, int]) -> list[tuple]:
    """`counts[kind]` moments of each kind, drawn by a seeded RNG."""
    rng = random.Random(seed)
    return [(kind, n, signal.SIGKILL) for kind, k in counts.items() for n in rng.sample(candidates[kind], k)]


def kill_chain(tmp_path, args, kills, stops=()) -> Path:
    """Stop a run at each moment, in the order a run meets them (SIGKILL at `kills`, SIGTERM or
    SIGINT at `stops`), resume it from its last.ckpt each time, let it finish, and check that it
    ends as a run that never stopped."""
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert run(reference, args) == 0
    for kind, n, signum in sorted([*kills, *stops], key=when):
        code = run(out, args, (kind, n, signum))
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum), (kind, n, signum, code)
        check_nothing_torn(out)
    assert run(out, args) == 0
    assert not list(out.rglob(".*.tmp"))  # what the killed writers left was removed by the next writes
    a, b = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert b["status"] == "completed"
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    x, y = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (reference, out))
    assert x["global_step"] == y["global_step"] and x["state_dict"].keys() == y["state_dict"].keys()
    for name in x["state_dict"]:
        assert torch.equal(x["state_dict"][name], y["state_dict"][name]), name
    for name, value in (x.get("stream_state") or {}).items():
        assert torch.equal(value, y["stream_state"][name]), name
    assert str(x["optimizer_states"]) == str(y["optimizer_states"])
    return reference


def test_a_sequence_run_killed_at_any_moment_resumes_exactly(tmp_path):
    """8 chunks, a checkpoint every 3 (and at the end): stopped by SIGTERM in chunk 1 and Ctrl-C
    in chunk 2 (each saves where it stops), then killed at 9 moments drawn from the rest."""
    args = [*[o for o in TINY if not o.startswith(("checkpoint.", "logger", "task.length"))], "task.length=160",
            "checkpoint.every_n_train_steps=3", "logger=none"]
    stops = [("train", 0, signal.SIGTERM), ("train", 1, signal.SIGINT)]
    candidates = {"train": list(range(2, 8)), "save": [3, 6, 8], "replace": [3, 6, 8], "summary": [1, 2]}
    kills = draw(0, candidates, {"train": 4, "save": 2, "replace": 2, "summary": 1})
    kill_chain(tmp_path, args, kills, stops)


def test_a_speech_run_killed_at_any_moment_resumes_exactly(tmp_path):
    """3 epochs of 7 batches, a checkpoint at each epoch's end: a run stopped within an epoch
    resumes from the last one and does the epoch again. Stopped by SIGTERM in epoch 0 (nothing
    saved yet) and Ctrl-C in the test sweep, killed at 8 moments drawn from training, the saves,
    validation, the test sweep and the summary's writes. Then `tasks.speech.evaluate` tests the
    model again, with the thread setting it is given, and finds the run's own figures."""
    from test_speech import two_tones

    from tasks.speech.evaluate import evaluate

    two_tones(tmp_path / "d")
    args = ["task=speech", "task.dataset=folder", f"task.root={tmp_path / 'd'}", "task.sample_rate=8000",
            "task.n_fft=256", "task.clip_seconds=0.5", "task.n_mels=20", "task.context_frames=1",
            "task.noise_levels=[0.0,0.1,0.2,0.3]", "task.batch_size=8", "learning=local", "model.columns=128",
            "model.cells=1", "model.active_columns=8", "optimizer.lr=0.01", "scheduler=cosine",
            "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "logger=none"]
    saves = [7, 14, 21]
    candidates = {"train": list(range(21)), "save": saves, "replace": saves, "val": saves, "test": [0, 1],
                  "summary": [1, 2, 3]}
    kills = draw(1, candidates, {"train": 3, "save": 1, "replace": 1, "val": 1, "test": 1, "summary": 1})
    stops = [("train", 3, signal.SIGTERM), ("test", 0, signal.SIGINT)]
    reference = kill_chain(tmp_path, args, kills, stops)

    summary = json.loads((reference / "summary.json").read_text())
    try:
        again = evaluate(reference / "checkpoints" / "last.ckpt", ["torch_threads=2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert again == {k: summary[k] for k in again} and again["test_accuracy"] == 1.0


def test_a_taxi_run_killed_at_any_moment_resumes_exactly(tmp_path):
    """6 chunks of 50 records, backprop, a checkpoint every 2 chunks: stopped by SIGTERM in chunk
    1 (saved where it stops), then killed at 8 moments drawn from the rest. The head's pending
    features (targets not yet seen) travel in the checkpoints."""
    args = ["task=taxi", "task.records=300", "task.score_from=100", "task.chunk=50", "learning=backprop",
            "model.columns=64", "model.cells=4", "model.active_columns=8", "model.activation_threshold=4",
            "model.matching_threshold=3", "logger=none", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_train_steps=2"]
    candidates = {"train": list(range(2, 6)), "save": [4, 6], "replace": [4, 6], "summary": [1, 2]}
    kills = draw(2, candidates, {"train": 4, "save": 1, "replace": 2, "summary": 1})
    kill_chain(tmp_path, args, kills, [("train", 0, signal.SIGTERM)])
