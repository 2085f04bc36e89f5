"""SequenceTask: chunks, head, loss and prequential metrics, driven with hand-made model outputs
(known answers), then once through the real stack and harness."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import train
from tasks.sequence import OverlapHead, SequenceTask

DATA = os.environ["PREDICTIVE_DATA_DIR"]  # set by conftest.py


def make(**kw):
    return SequenceTask(data_dir=DATA, **{"length": 4000, "switch_after": 2000, "chunk": 40, **kw})


def play(task, answer):
    """Drive the task over its whole stream with head outputs from `answer(batch) -> logits`,
    the way the module does (predict, update metrics, move on)."""
    dm = task.datamodule()
    for index in range(dm.num_chunks):
        batch = dm.chunk(index)
        out = SimpleNamespace(anomaly=torch.full(batch["symbol"].shape, 0.25))
        task.update_metrics("train", answer(batch), batch, out)
        dm.position += 1
    return dm


def oracle(task, right=lambda index: index >= 0):
    """Logits that put the true next symbol first where right(element index) holds, else last."""

    def answer(batch):
        logits = torch.zeros(*batch["next"].shape, task.num_symbols)
        target = batch["next"].clamp(0, task.num_symbols - 1)
        good = right(batch["index"] + 1)
        logits.scatter_(-1, target[..., None], torch.where(good, 1.0, -1.0)[..., None])
        return logits

    return answer


def test_chunks_cover_the_stream_and_are_reproducible():
    task = make()
    dm = task.datamodule()
    s = task.streams[0]
    assert dm.num_chunks == 100
    symbols = torch.cat([dm.chunk(i)["symbol"] for i in range(dm.num_chunks)], 1)[0].numpy()
    assert np.array_equal(symbols, s.symbols)
    b = dm.chunk(7)
    assert torch.equal(b["symbol"], dm.chunk(7)["symbol"])
    assert torch.equal(b["index"][0], torch.arange(280, 320))
    assert torch.equal(b["next"][0], torch.from_numpy(s.symbols[281:321]))
    assert torch.equal(b["next_scored"][0], torch.from_numpy(s.scored[281:321]))
    assert dm.chunk(dm.num_chunks - 1)["next"][0, -1] == -1  # nothing after the last element
    assert task.reset_mask(b) is None  # the paper's protocol: no resets
    assert torch.equal(make(resets=True).reset_mask(b), b["start"])


def test_perfect_and_wrong_predictions_give_known_summaries():
    task = make()
    play(task, oracle(task))
    s = task.summary()
    assert s["final_accuracy"] == 1.0 and s["end_accuracy"] == 1.0
    # The curve is defined once 100 scored sequences exist, about 850 elements in.
    assert 750 < s["elements_to_95"] < 950 and 750 < s["recovery_elements"] < 950
    assert isinstance(s["elements_to_95"], int)  # counts stay counts in summary.json
    assert s["mean_anomaly"] == 0.25 and s["streams"] == 1 and s["us_per_element"] > 0
    x, y = task.curves()["accuracy"]
    assert x[0] == s["elements_to_95"] and set(y) == {1.0}

    task = make()
    switch = task.streams[0].switch
    play(task, oracle(task, right=lambda index: index < switch))  # forgets nothing, adapts never
    s = task.summary()
    assert s["final_accuracy"] == 1.0 and s["end_accuracy"] == 0.0 and s["recovery_elements"] is None


def test_top_k_with_several_endings():
    # With 2 endings the truth must be among the top 2: a runner-up truth counts, a third doesn't.
    task = make(endings=2)

    def second(batch):
        logits = torch.zeros(*batch["next"].shape, task.num_symbols)
        logits[..., 0] = 2.0
        logits.scatter_(-1, batch["next"].clamp(0, task.num_symbols - 1)[..., None], 1.0)
        return logits

    play(task, second)
    # Right everywhere except where the truth is symbol 0 (then 0 is first: also right).
    assert task.summary()["final_accuracy"] == 1.0
    task = make(endings=1)
    play(task, second)
    s = task.summary()
    truth_is_0 = task.streams[0].symbols[task.streams[0].scored] == 0
    assert 0.0 <= s["end_accuracy"] <= truth_is_0.mean() + 0.15


def test_several_streams_scored_each_with_mean_and_spread():
    task = make(streams=3)
    assert len({tuple(s.symbols[:30]) for s in task.streams}) == 3  # different seeds
    switches = [s.switch for s in task.streams]
    play(task, oracle(task, right=lambda index: index < torch.tensor(switches)[:, None]))
    s = task.summary()
    assert s["streams"] == 3 and s["final_accuracy"] == 1.0 and s["final_accuracy_std"] == 0.0
    assert s["end_accuracy"] == 0.0 and s["recovery_elements"] is None


def test_streams_share_the_relabelling_unless_per_stream():
    shared, per = make(streams=3), make(streams=3, relabel="per_stream")
    for a, b in zip(shared.streams, per.streams):  # the same sequence order and noise ...
        assert np.array_equal(a.scored, b.scored) and np.array_equal(a.symbols >= 10, b.symbols >= 10)
        # ... and the same sequences, relabelled: shared label = shared relabel of the set symbol
        seq = b.symbols < 10
        inverse = np.argsort(b.relabel)
        assert np.array_equal(a.symbols[seq], shared.streams[0].relabel[inverse[b.symbols[seq]]])
    assert all(np.array_equal(s.relabel, shared.streams[0].relabel) for s in shared.streams)
    assert len({tuple(s.relabel) for s in per.streams}) == 3
    assert np.array_equal(per.streams[0].symbols, shared.streams[0].symbols)  # stream 0: the seed's own
    assert np.array_equal(make().streams[0].symbols, shared.streams[0].symbols)


def test_each_ddp_rank_learns_its_own_streams():
    task = make(streams=2)
    rank0 = task.datamodule().chunk(0)["symbol"]
    rank1 = task.datamodule(rank=1).chunk(0)["symbol"]  # what train.py asks for on rank 1
    seeds_2_3 = make(streams=4).streams[2:]
    assert torch.equal(rank1, torch.as_tensor(np.stack([s.symbols[:40] for s in seeds_2_3])))
    assert not torch.equal(rank0, rank1)
    assert all(np.array_equal(s.relabel, task.streams[0].relabel) for s in seeds_2_3)  # one task on every rank


def test_a_ddp_summary_and_curve_cover_every_process_streams():
    # Two processes with one stream each (rank r streams seed + r) report what one process
    # learning both streams reports; the processes' elements add up, their seconds overlap.
    both = make(streams=2)
    play(both, oracle(both, right=lambda index: index % 3 > 0))
    state = both.state_dict()
    ranks = [{**state, "correct": state["correct"][r:r + 1], "anomaly": state["anomaly"][r:r + 1],
              "elements": state["elements"] // 2} for r in range(2)]
    summary = make().summary(ranks)
    assert summary == both.summary() and summary["streams"] == 2
    assert summary["final_accuracy_std"] > 0  # the two streams were scored differently
    # The curve is the mean over both processes' streams too, not the first process's alone.
    assert make().curves(ranks) == both.curves() != make().curves(ranks[:1])


@pytest.mark.parametrize("relabel", ["shared", "per_stream"])
def test_one_model_learns_several_streams_of_one_task(relabel):
    """Four streams through one layer at once: with one relabelling they are four samples of
    the same eight sequences and each is learned as well as one stream alone; with four
    relabellings the 256 x 8 layer must hold four times the contexts per column and is
    capacity-bound (docs/results.md, "Several streams")."""
    from predictive.learning import build
    from predictive.stack import PredictiveStack
    from tasks import high_order

    torch.manual_seed(0)
    task = make(streams=4, relabel=relabel, length=3000, switch_after=3000)
    x = task.encoder({"symbol": torch.as_tensor(np.stack([s.symbols for s in task.streams]))})
    model = PredictiveStack(task.input_size, columns=256, cells=8, active_columns=10, segments=4, synapses=24,
                            activation_threshold=6, matching_threshold=6)
    rule = build("local", new_synapses=10)
    state, scores = model.initial_state(4), []
    codes = task.encoder.codes.codes(torch.arange(task.num_symbols)).float()
    for start in range(0, 3000, 50):
        out, state = model(x[:, start : start + 50], state, None, rule)
        scores.append(out.prediction @ codes.T)
    scores = torch.cat(scores, 1).numpy()
    accuracy = []
    for b, s in enumerate(task.streams):
        at = np.flatnonzero(s.scored)[-50:] - 1  # the last 50 endings, predicted one step before
        accuracy.append(high_order.is_correct(scores[b, at], s.symbols[at + 1], 1).mean())
    if relabel == "shared":  # 1.00 in each stream
        assert min(accuracy) >= 0.95, accuracy
    else:  # 0.60-0.62
        assert max(accuracy) < 0.9, accuracy


def test_state_dict_round_trip_resumes_the_metrics():
    a, b = make(), make()
    dm_a = play(a, oracle(a, right=lambda index: index % 3 != 0))
    # b stops halfway, is saved, rebuilt and resumed.
    dm_b = b.datamodule()
    answer = oracle(b, right=lambda index: index % 3 != 0)
    for index in range(30):
        b.update_metrics(
            "train", answer(dm_b.chunk(index)), dm_b.chunk(index), SimpleNamespace(anomaly=torch.full((1, 40), 0.25))
        )
    state = b.state_dict()
    c = make()
    c.load_state_dict(state)
    for index in range(30, dm_a.num_chunks):
        c.update_metrics(
            "train", answer(dm_b.chunk(index)), dm_b.chunk(index), SimpleNamespace(anomaly=torch.full((1, 40), 0.25))
        )
    sa, sc = a.summary(), c.summary()
    for key in ("final_accuracy", "elements_to_95", "recovery_elements", "end_accuracy", "mean_anomaly"):
        assert sa[key] == sc[key], key
    assert a.compute_metrics("train") == c.compute_metrics("train")


def test_the_logged_accuracy_is_the_curves_latest_value_read_from_the_stream_end():
    """compute_metrics (every logged step) reads the last scored elements, not the whole stream:
    the same value as the curve, at any point of the stream."""
    task = make(streams=2)
    rng = np.random.default_rng(0)
    dm = task.datamodule()
    for index in range(dm.num_chunks):
        batch = dm.chunk(index)
        logits = torch.from_numpy(rng.normal(size=(2, 40, task.num_symbols)))  # right about 1 time in 10
        task.update_metrics("train", logits, batch, SimpleNamespace(anomaly=torch.rand(2, 40)))
        if index in (10, 17, 60, dm.num_chunks - 1):
            curves = [task._curve(row) for row in task._correct]
            last = [c[~np.isnan(c)][-1] for c in curves if (~np.isnan(c)).any()]
            metrics = task.compute_metrics("train")
            assert metrics.get("accuracy") == (float(np.mean(last)) if last else None)
            assert metrics["anomaly"] == pytest.approx(np.nanmean(task._anomaly), rel=1e-12)
    assert 0.05 < metrics["accuracy"] < 0.3


def test_overlap_head_decodes_codes_and_loss_skips_noise():
    task = make()
    head = task.build_head(task.input_size)
    assert isinstance(head, OverlapHead)
    codes = task.encoder.codes.codes(torch.arange(task.num_symbols))
    # A clean prediction of symbol s scores s highest; a union of two scores both on top.
    assert torch.equal(head(codes).argmax(-1), torch.arange(task.num_symbols))
    union = head((codes[3] + codes[5]).clamp(max=1))
    assert set(union.topk(2).indices.tolist()) == {3, 5}
    batch = task.datamodule().chunk(0)
    logits = head(task.encoder(batch)).detach().requires_grad_()
    loss = task.loss(logits, batch)
    loss.backward()
    noise_next = batch["next"] >= task.num_symbols
    assert noise_next.any() and torch.all(logits.grad[noise_next] == 0)
    with pytest.raises(ValueError, match="features=prediction"):
        task.build_head(64)
    assert isinstance(make(features="predicted").build_head(64), torch.nn.Linear)
    # The default reads one ending from the decoded prediction, a union of several by a
    # learned linear readout of the predicted cells.
    assert make().features == "prediction"
    assert make(endings=2).features == make(endings=4).features == "predicted"
    assert isinstance(make(endings=4).build_head(64), torch.nn.Linear)


@pytest.mark.parametrize(
    "setting, value, match",
    [
        ("streams", 0, "task.streams"),
        ("relabel", "per-stream", r"task.relabel must be one of \('shared', 'per_stream'\), got 'per-stream'"),
        ("features", "bogus", "task.features"),
        ("endings", 3, "task.endings"),
        ("window", 0, "task.window"),
        ("chunk", 0, "task.chunk"),
    ],
)
def test_bad_settings_are_named(setting, value, match):
    with pytest.raises(ValueError, match=match):
        make(**{setting: value}).datamodule()


def test_a_missing_sequence_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.set=.*sets.json"):
        SequenceTask(data_dir=tmp_path, set="sets.json")


def test_learns_through_the_real_stack_and_harness(tmp_path):
    """A short stream through train.py with a small layer: the task's figures land in
    summary.json, and the layer learns the transitions: everything bursts at first (anomaly
    1), while only the noise and each sequence's first element stay unpredictable (2 of
    about 8.5 elements)."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            return_hydra_config=True,
            overrides=[
                *TINY,
                "task.length=400",
                "task.switch_after=300",
                "task.chunk=100",
                "task.window=10",
                "model.columns=128",
                "model.active_columns=16",
                "model.activation_threshold=6",
                "model.matching_threshold=4",
                "checkpoint.every_n_train_steps=100",
                "logger=none",
                f"paths.output_dir={tmp_path}",
            ],
        )
    HydraConfig.instance().set_config(cfg)
    train.train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"final_accuracy", "elements_to_95", "recovery_elements", "end_accuracy", "us_per_element"} <= set(summary)
    assert summary["mean_anomaly"] < 0.5
