"""trainer=ddp: Lightning's DDP strategy with 2 CPU processes (gloo) on a tiny model."""

import json
import subprocess
import sys
import traceback

import pytest
import torch
from conftest import ROOT, TINY

pytestmark = [pytest.mark.slow,  # each test starts processes and runs a stream in them
              pytest.mark.xdist_group("ddp")]  # one at a time: two process groups would share 2 cores 4 ways


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
    # Local learning: every process runs both processes' streams, so the state is saved once.
    state = reference["stream_state"]
    assert state["0.columns"].shape[0] == 2 and not torch.equal(state["0.columns"][0], state["0.columns"][1])
    assert all(torch.equal(state[k], resumed["stream_state"][k]) for k in state)
    # The two processes did score different streams.
    scored = [r["task_state"]["correct"] for r in reference["ranks"]]
    assert not torch.equal(scored[0], scored[1])
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


# Long enough for the layer to predict (and so for the head to learn): 600 elements, 12 chunks.
SHORT_RUN = ["task=sequence", "task.length=600", "task.switch_after=300", "trainer.enable_progress_bar=false",
             "logger=csv"]
TIMINGS = {"us_per_element", "steps_per_second", "time_steps_per_second", "train_seconds", "peak_memory_mb"}


@pytest.mark.parametrize("learning", ["local", "hybrid"])
def test_ddp_learns_what_one_process_learns_from_every_stream(tmp_path, learning):
    # 2 processes x 1 stream against 1 process x 2 streams: the same streams (seeds 0 and 1),
    # and with local updates applied to both at every step on each process, the same model.
    length = ["task.length=200", "task.switch_after=100"] if learning == "hybrid" else []  # slower: torch steps

    def run(out, *extra):
        result = subprocess.run(
            [sys.executable, "train.py", *SHORT_RUN, *length, f"learning={learning}", f"hydra.run.dir={out}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        return ckpt, json.loads((out / "summary.json").read_text())

    one, one_summary = run(tmp_path / "one", "task.streams=2")
    two, two_summary = run(tmp_path / "two", "task.streams=1", "trainer=ddp", "trainer.accelerator=cpu")

    # The gradient-trained parts (the head; under hybrid the layers' permanences and decoder)
    # follow DDP's mean of the processes' losses: on this task each loss averages over the
    # steps followed by a sequence symbol, which differ in number between the streams.
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if learning == "local" else {"rtol": 0.0, "atol": 1e-2}
    assert one["state_dict"].keys() == two["state_dict"].keys()
    for key, value in one["state_dict"].items():
        other = two["state_dict"][key]
        if value.is_floating_point():
            assert torch.allclose(value, other, **tolerance), (key, (value - other).abs().max())
        else:
            assert torch.equal(value, other), key
    if learning == "local":  # the layer, which the head does not reach, bit for bit
        assert all(torch.equal(v, two["state_dict"][k]) for k, v in one["state_dict"].items() if k.startswith("model."))
    segments = one["state_dict"]["model.layers.0.segments.last_learned"]
    assert (segments >= 0).sum() > 100  # the layer did grow segments
    for key in ("cells", "predicted_columns", "diverted"):  # the streams' state, in rank order
        assert torch.equal(one["stream_state"][f"0.{key}"], two["stream_state"][f"0.{key}"]), key
    for rank, state in enumerate(two["ranks"]):  # each process scored its own stream, as stream `rank`
        assert torch.equal(state["task_state"]["correct"], one["task_state"]["correct"][rank:rank + 1])

    figures = {k: v for k, v in one_summary.items() if k not in TIMINGS and "/" not in k}
    assert figures == {k: two_summary[k] for k in figures}
    assert figures["streams"] == 2 and figures["mean_anomaly"] < 0.6  # the model did learn to predict


def _gather_in_process(rank: int, init_file: str, errors):
    from predictive.harness.module import gather_streams

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x = torch.full((2, 3, 4), float(rank), requires_grad=True)  # 2 streams per process
        reset = torch.tensor([[rank == 1, False, False], [False, False, True]])
        inputs, resets, own = gather_streams(x, reset)
        assert inputs.shape == (4, 3, 4) and own == slice(2 * rank, 2 * rank + 2)
        assert torch.equal(inputs[:, 0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # rank order
        assert resets[:, 0].tolist() == [False, False, True, False]
        assert resets[:, 2].tolist() == [False, True, False, True]
        inputs[own].sum().backward()  # the own rows are x, with its graph
        assert torch.equal(x.grad, torch.ones_like(x))
        try:
            gather_streams(torch.zeros(1 + rank, 3, 4), None)  # one process has one stream more
            errors.put(f"rank {rank}: no error for batches of different shapes")
        except ValueError as e:
            assert "differ in shape: [(1, 3, 4), (2, 3, 4)]" in str(e), e
    except AssertionError:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        torch.distributed.destroy_process_group()


def test_gather_streams_stacks_every_process_batch_in_rank_order(tmp_path):
    context = torch.multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    processes = [context.Process(target=_gather_in_process, args=(r, str(tmp_path / "init"), errors)) for r in (0, 1)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems
