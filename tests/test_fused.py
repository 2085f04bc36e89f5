"""predictive.fused (local learning compiled, a chunk per call) must be the torch steps."""

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

from predictive import learning
from predictive.learning import Frozen, build, last_taken
from predictive.stack import PredictiveStack, StackOutput

LAYER = dict(
    columns=64, cells=4, active_columns=8, segments=3, synapses=8, activation_threshold=4, matching_threshold=3
)
CASES = 32  # random setting combinations compared step for step


def high_order_stream(batch: int, length: int, width: int = 48, seed: int = 1) -> torch.Tensor:
    """Two sequences with a shared middle (0 1 2 3, 4 1 2 5), a random noise symbol after each."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(16, width)
    for s in range(16):
        codes[s, torch.randperm(width, generator=g)[:6]] = 1.0
    streams = []
    for _ in range(batch):
        symbols = []
        while len(symbols) < length:
            which = int(torch.randint(2, (1,), generator=g))
            symbols += [[0, 1, 2, 3], [4, 1, 2, 5]][which] + [int(torch.randint(6, 16, (1,), generator=g))]
        streams.append(codes[torch.tensor(symbols[:length])])
    return torch.stack(streams)


def learn(fused: bool, x: torch.Tensor, reset: torch.Tensor, layer: dict, rule: dict, chunk: int = 25):
    torch.manual_seed(0)
    stack = PredictiveStack(x.shape[-1], 1, **layer)
    rule = build("local", fused=fused, **rule)
    state, outs = stack.initial_state(x.shape[0]), []
    for c in range(0, x.shape[1], chunk):
        out, state = stack(x[:, c : c + chunk], state, reset[:, c : c + chunk], learning=rule)
        outs.append(out)
    joined = {f: torch.cat([getattr(o, f) for o in outs], 1) for f in ("cells", "predicted", "prediction", "anomaly")}
    return stack, state, joined


def assert_same_run(torch_run, fused_run):
    """Segments, cells, winners, overlaps, counters: bit for bit; the decoder sums in another
    order, so it and its prediction are equal to float rounding."""
    (torch_stack, torch_state, torch_out), (fused_stack, fused_state, fused_out) = torch_run, fused_run
    fused_params = fused_stack.state_dict()
    for name, value in torch_stack.state_dict().items():
        if ".decoder." in name:
            torch.testing.assert_close(value, fused_params[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(value, fused_params[name]), name
    for name in ("cells", "predicted", "anomaly"):
        assert torch.equal(torch_out[name], fused_out[name]), name
    torch.testing.assert_close(torch_out["prediction"], fused_out["prediction"], rtol=1e-5, atol=1e-5)
    for name, value in torch_state.items():
        if name.endswith(".prediction"):
            torch.testing.assert_close(value, fused_state[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(value, fused_state[name]), name


@pytest.mark.parametrize("fixed_shapes", [False, True])
@pytest.mark.parametrize(
    "batch, layer, rule",
    [
        (1, LAYER, dict(new_synapses=6)),
        (
            3,
            dict(LAYER, boost_strength=1.0),
            dict(new_synapses=5, grow_predicted=True, decoder_bias=True, burst_decrement=0.05),
        ),
    ],
)
def test_fused_chunks_are_the_torch_steps(batch, layer, rule, fixed_shapes):
    rule = dict(rule, fixed_shapes=fixed_shapes)  # the torch steps' two ways of listing what learns
    x = high_order_stream(batch, 400)
    reset = torch.zeros(batch, 400, dtype=torch.bool)
    reset[0, [0, 130, 131, 260]] = True  # a reset in one stream only, twice in a row once
    torch_run, fused_run = (learn(fused, x, reset, layer, rule) for fused in (False, True))
    seg = torch_run[0].layers[0].segments
    assert (seg.permanence >= seg.connected_permanence).sum() > 100  # it learned something
    assert torch_run[2]["anomaly"][:, -50:].mean() < 0.5
    assert_same_run(torch_run, fused_run)


def test_weakening_a_few_streams_at_a_time_keeps_the_steps(monkeypatch):
    monkeypatch.setattr(learning, "WEAKEN_ELEMENTS", 1)  # fixed shapes weaken one stream at a time
    x = high_order_stream(3, 200)
    reset = torch.zeros(3, 200, dtype=torch.bool)
    rule = dict(new_synapses=5, burst_decrement=0.05, fixed_shapes=True)
    assert_same_run(learn(False, x, reset, LAYER, rule), learn(True, x, reset, LAYER, rule))


@pytest.mark.parametrize("seed", range(5))
def test_writes_resolved_by_last_taken_land_as_an_ordered_assignment(seed):
    """Growth writes many synapses at once, some twice (two streams): the last taken write wins."""
    g = torch.Generator().manual_seed(seed)
    targets, taken = torch.randint(0, 12, (24,), generator=g), torch.rand(24, generator=g) < 0.4
    expected = torch.full((12,), -1)
    for i in range(24):
        if taken[i]:
            expected[targets[i]] = i
    last = last_taken(targets, taken)
    out = torch.full((12,), -1)
    out.index_put_((targets,), torch.where(taken[last], last, out[targets]))
    assert torch.equal(out, expected) and (expected >= 0).any() and (expected < 0).any()


def case(seed: int) -> dict:
    """One random combination of the settings the compiled steps read."""
    r = random.Random(seed)
    synapses, active = r.choice([4, 6, 8, 12]), r.choice([3, 4, 6])
    new_synapses = r.randint(2, synapses)
    context = min(new_synapses, active)  # the synapses a segment grows onto one step's winners
    layer = dict(
        columns=r.choice([16, 24, 32]), cells=r.choice([2, 3, 4]), active_columns=active,
        segments=r.choice([1, 2, 3]), synapses=synapses, activation_threshold=r.randint(1, context),
        matching_threshold=r.randint(1, context), connected_permanence=r.choice([0.5, 0.3]),
        boost_strength=r.choice([0.0, 0.5]), recall=r.random() < 0.6, fresh_steps=r.choice([0, 4, 300]),
        predicted_bias=r.choice([0.0, 1.0]),
    )
    rule = dict(
        new_synapses=new_synapses, connected_grace=r.choice([0, 2, 30]), decoder_code_rate=r.choice([0.0, 0.5]),
        decoder_bias=r.random() < 0.5, grow_predicted=r.random() < 0.3, burst_decrement=r.choice([0.0, 0.05]),
        predicted_decrement=r.choice([0.0, 0.08]), permanence_increment=r.choice([0.12, 0.3]),
        initial_permanence=r.choice([0.45, 0.6]), fixed_shapes=r.random() < 0.5, max_permanence=r.choice([1.0, 0.7]),
    )
    return dict(layer=layer, rule=rule, batch=r.choice([1, 4]), layers=r.choice([1, 2]), evaluate=r.random() < 0.3,
                stream=r.randrange(1000))


def run_case(c: dict, fused: bool, length: int = 90, chunk: int = 30, layer_by_layer: bool = True):
    """A case's stack over `length` steps in chunks. The torch reference of two layers runs layer
    by layer over each chunk (`torch_layers`), as the compiled path does, unless told not to."""
    x = high_order_stream(c["batch"], length, width=32, seed=c["stream"])
    g = torch.Generator().manual_seed(c["stream"])
    reset = torch.rand(c["batch"], length, generator=g) < 0.02
    reset[0, [20, 21]] = True  # twice in a row, in one stream
    torch.manual_seed(c["stream"])
    top = dict(c["layer"], columns=16)
    stack = PredictiveStack(x.shape[-1], [c["layer"], top][: c["layers"]])
    if c["evaluate"]:
        stack.eval()
        for layer in stack.layers:  # what KWinners' k_inference_factor sets: more columns in eval mode
            layer.kwinners.k_inference = layer.k + 1
    rule = build("local", fused=fused, **c["rule"])
    state, outs = stack.initial_state(c["batch"]), []
    for t in range(0, length, chunk):
        args = (x[:, t : t + chunk], state, reset[:, t : t + chunk])
        by_layer = layer_by_layer and c["layers"] > 1 and not fused
        out, state = torch_layers(stack, rule, *args) if by_layer else stack(*args, learning=rule)
        outs.append(out)
    joined = {f: torch.cat([getattr(o, f) for o in outs], 1) for f in ("cells", "predicted", "prediction", "anomaly")}
    return stack, state, joined


@torch.no_grad()
def torch_layers(stack: PredictiveStack, rule, x: torch.Tensor, state: dict, reset: torch.Tensor):
    """The torch steps of a local stack, one layer over the whole chunk, then the next: in local
    mode nothing of a layer reaches the layers below it, so this is the stack's computation,
    with the random numbers drawn in the order the compiled path draws them."""
    new_state, inputs, outputs = {}, x, []
    with parametrize.cached():
        for i, (layer, layer_state) in enumerate(zip(stack.layers, stack.layer_states(state))):
            cells, predicted, prediction, anomaly = [], [], [], []
            for t in range(x.shape[1]):
                step, layer_state = layer(inputs[:, t], layer_state, reset[:, t], learn=rule.update)
                cells.append(step.cells)
                predicted.append(layer_state.predicted)
                prediction.append(layer_state.prediction)
                anomaly.append(step.anomaly)
            new_state.update({f"{i}.{name}": value for name, value in layer_state._asdict().items()})
            outputs.append([torch.stack(v, 1) for v in (cells, predicted, prediction, anomaly)])
            inputs = outputs[-1][0]
    (cells, predicted, _, _), (_, _, prediction, anomaly) = outputs[-1], outputs[0]
    return StackOutput(cells, predicted, prediction, anomaly, local_loss=x.new_zeros(())), new_state


def test_the_cases_cover_every_setting():
    cases = [{**c["layer"], **c["rule"], **c} for c in map(case, range(CASES))]
    for name in ("recall", "fresh_steps", "boost_strength", "predicted_bias", "connected_permanence", "segments",
                 "synapses", "activation_threshold", "matching_threshold", "connected_grace", "decoder_code_rate",
                 "decoder_bias", "grow_predicted", "burst_decrement", "batch", "layers", "evaluate", "fixed_shapes"):
        assert len({c[name] for c in cases}) > 1, name
    assert {c["fresh_steps"] > 0 for c in cases} == {c["connected_grace"] > 0 for c in cases} == {False, True}
    assert {(c["layers"], c["batch"]) for c in cases} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert {(c["evaluate"], c["batch"]) for c in cases} == {(False, 1), (False, 4), (True, 1), (True, 4)}
    assert {(c["fixed_shapes"], c["batch"]) for c in cases} == {(False, 1), (False, 4), (True, 1), (True, 4)}


@pytest.mark.parametrize("seed", range(CASES))
def test_fused_is_the_torch_step_over_random_settings(seed):
    c = case(seed)
    torch_run, fused_run = run_case(c, fused=False), run_case(c, fused=True)
    assert (torch_run[0].layers[-1].segments.permanence > 0).any()  # the top layer learned too
    assert torch_run[2]["predicted"][:, -30:].any()  # and predicts
    assert_same_run(torch_run, fused_run)


@pytest.mark.parametrize("seed", range(0, CASES, 4))
def test_compiled_inference_is_the_torch_steps(seed):
    """A rule that changes no layer (frozen; evaluation) runs compiled too: the same steps."""
    c = case(seed)
    learned, state, _ = run_case(c, fused=True)
    x = high_order_stream(c["batch"], 60, width=32, seed=c["stream"] + 1)
    reset = torch.rand(c["batch"], 60, generator=torch.Generator().manual_seed(seed)) < 0.05
    runs = []
    for fused in (False, True):
        stack = copy.deepcopy(learned)
        torch.manual_seed(seed)
        with torch.no_grad():
            if fused:
                out, new_state = stack(x, state, reset, learning=Frozen())
            else:
                out, new_state = torch_layers(stack, Frozen(fused=False), x, state, reset)
        runs.append((stack, new_state, {f: getattr(out, f) for f in ("cells", "predicted", "prediction", "anomaly")}))
    assert runs[0][2]["predicted"].any()  # it predicts
    assert torch.equal(runs[1][0].layers[0].segments.permanence, learned.layers[0].segments.permanence)
    assert_same_run(*runs)


def test_a_two_layer_stack_one_step_a_chunk_is_the_torch_stack():
    """Fed one step at a time the compiled path draws its random numbers in the torch stack's
    order (each layer's tie-break and growth sample, layer after layer), so the stack's own
    torch path is the reference."""
    c = dict(case(0), layers=2, batch=2, evaluate=False)
    torch_run = run_case(c, fused=False, length=40, chunk=40, layer_by_layer=False)
    assert_same_run(torch_run, run_case(c, fused=True, length=40, chunk=1))


def test_fused_stack_feeds_each_layer_the_cells_of_the_one_below():
    torch.manual_seed(0)
    x = high_order_stream(2, 200)
    stack = PredictiveStack(48, [LAYER, dict(LAYER, columns=32)])
    out, state = stack(x, stack.initial_state(2), learning=build("local", new_synapses=6))
    top = stack.layers[1]
    assert out.cells.shape == (2, 200, top.output_size) and out.prediction.shape == (2, 200, 48)
    assert torch.equal(out.cells[:, -1], state["1.cells"])
    assert (top.segments.permanence > 0).any()  # the top layer learned from the bottom one's cells
    assert out.anomaly[:, -50:].mean() < 0.5  # and the bottom one predicts its input


def test_torch_path_sees_what_a_fused_chunk_learned():
    torch.manual_seed(0)
    stack = PredictiveStack(48, [LAYER])
    x = high_order_stream(1, 100)
    stack(x, stack.initial_state(1), learning=build("local", new_synapses=6, fused=False))  # fills the mask cache
    stack(x, stack.initial_state(1), learning=build("local", new_synapses=6))
    seg = stack.layers[0].segments
    p = seg.permanence.detach()
    assert torch.equal(seg.synapse_masks(), torch.stack([p >= seg.connected_permanence, p > 0]).float())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layers", [[LAYER], [dict(LAYER, synapses=24), LAYER]])
def test_more_new_synapses_than_synapses_stops_the_first_chunk(fused, layers):
    stack = PredictiveStack(48, layers)
    refusing = stack.layers[-1]
    before = {name: value.clone() for name, value in refusing.state_dict().items()}
    with pytest.raises(ValueError, match=r"new_synapses=20 exceeds the layer's synapses=8"):
        stack(high_order_stream(1, 12), stack.initial_state(1), learning=build("local", new_synapses=20, fused=fused))
    for name, value in refusing.state_dict().items():  # it learned nothing before the refusal
        if "segments" in name or "decoder" in name:
            assert torch.equal(value, before[name]), name


def fused_runs() -> dict:
    """Every random case through the compiled path: outputs, state and parameters."""
    runs = {}
    for seed in range(CASES):
        stack, state, out = run_case(case(seed), fused=True)
        runs[seed] = {**out, **state, **stack.state_dict()}
    return runs


BOUNDS_CHECKED = """
import sys
import numpy as np
import torch
sys.path.insert(0, "tests")
import test_fused
from predictive import fused
try:  # one past the end of a 1-cell `used`
    fused.least_used(np.zeros(1, dtype=np.float32), np.zeros(2, dtype=np.float32), 0)
    sys.exit("NUMBA_BOUNDSCHECK did not take: an index past the end went unchecked")
except IndexError:
    pass
runs = test_fused.fused_runs()
if any(fused.chunk.stats.cache_hits.values()):
    sys.exit("the compiled step came from a cache, not built with bounds checks")
torch.save(runs, sys.argv[1])
"""


@pytest.mark.slow  # compiles the kernel afresh
def test_the_kernel_stays_in_bounds(tmp_path):
    """The random cases through the compiled path again, in a process whose compiled functions
    check every index (numba reads NUMBA_BOUNDSCHECK when it compiles, and an empty cache
    directory makes it compile rather than load the unchecked build): no index out of
    bounds, and the same numbers."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    root, saved = Path(__file__).resolve().parents[1], tmp_path / "runs.pt"
    result = subprocess.run([sys.executable, "-c", BOUNDS_CHECKED, str(saved)], cwd=root, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    checked = torch.load(saved)
    for seed, run in fused_runs().items():
        for name, value in run.items():
            assert torch.equal(value, checked[seed][name]), (seed, name)
