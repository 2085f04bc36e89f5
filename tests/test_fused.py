"""predictive.fused (local learning compiled, a chunk per call) must be the torch steps."""

import pytest
import torch

from predictive.learning import build
from predictive.stack import PredictiveStack

LAYER = dict(
    columns=64, cells=4, active_columns=8, segments=3, synapses=8, activation_threshold=4, matching_threshold=3
)


def high_order_stream(batch: int, length: int, width: int = 48) -> torch.Tensor:
    """Two sequences with a shared middle (0 1 2 3, 4 1 2 5), a random noise symbol after each."""
    g = torch.Generator().manual_seed(1)
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


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "layer, rule",
    [
        (LAYER, dict(new_synapses=6)),
        (
            dict(LAYER, boost_strength=1.0),
            dict(new_synapses=5, grow_predicted=True, decoder_bias=True, burst_decrement=0.05),
        ),
    ],
)
def test_fused_chunks_are_the_torch_steps(batch, layer, rule):
    x = high_order_stream(batch, 400)
    reset = torch.zeros(batch, 400, dtype=torch.bool)
    reset[0, [0, 130, 131, 260]] = True  # a reset in one stream only, twice in a row once
    (torch_stack, torch_state, torch_out), (fused_stack, fused_state, fused_out) = (
        learn(fused, x, reset, layer, rule) for fused in (False, True)
    )
    seg, fused_seg = torch_stack.layers[0].segments, fused_stack.layers[0].segments
    assert (seg.permanence >= seg.connected_permanence).sum() > 100  # it learned something
    assert torch_out["anomaly"][:, -50:].mean() < 0.5
    # The segments, the cells and the counters: bit for bit.
    for name in ("permanence", "presynaptic", "last_learned"):
        assert torch.equal(getattr(seg, name), getattr(fused_seg, name)), name
    for name in ("learning_steps", "kwinners.duty_cycle", "kwinners.learning_iterations", "kwinners.boost_strength"):
        assert torch.equal(torch_stack.layers[0].get_buffer(name), fused_stack.layers[0].get_buffer(name)), name
    for name in ("cells", "predicted", "anomaly"):
        assert torch.equal(torch_out[name], fused_out[name]), name
    for name, value in torch_state.items():
        if name != "0.prediction":
            assert torch.equal(value, fused_state[name]), name
    # The decoder sums in another order: equal to float rounding.
    torch.testing.assert_close(torch_out["prediction"], fused_out["prediction"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_stack.layers[0].decoder.weight, fused_stack.layers[0].decoder.weight)


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
