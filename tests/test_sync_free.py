"""The torch steps never read a tensor value on the host: a GPU never waits inside the time loop.

Counted with the torch profiler on a CPU: every op that hands a data-dependent value to Python
(`item`, `is_nonzero` behind `if tensor.any()`, `nonzero` behind boolean indexing, `unique`)
is a host synchronisation on a GPU."""

from collections import Counter

import pytest
import torch
from test_fused import high_order_stream
from torch.profiler import ProfilerActivity, profile

from predictive.learning import Frozen, build
from predictive.stack import PredictiveStack

HOST_READS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")
LAYER = dict(columns=64, cells=4, active_columns=8, segments=3, synapses=8, activation_threshold=4,
             matching_threshold=3)
STEPS = 12


def host_reads(stack, rule, x, state, reset) -> Counter:
    """Host reads of `STEPS` steps of a chunk, by op."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        stack(x, state, reset, learning=rule)
    return Counter(e.name for e in prof.events() if e.name in HOST_READS or e.name.startswith("aten::unique"))


def learned_stack(batch: int = 3):
    """Two layers that have learned the high-order stream for a while (segments, recall, splits),
    and the next chunk with a reset in one stream."""
    torch.manual_seed(0)
    x = high_order_stream(batch, 200 + STEPS)
    stack = PredictiveStack(x.shape[-1], 2, **LAYER)
    with torch.no_grad():
        _, state = stack(x[:, :200], stack.initial_state(batch), learning=build("local", new_synapses=6))
    assert (stack.layers[1].segments.permanence > 0.5).any()  # the top layer has connected synapses
    reset = torch.zeros(batch, STEPS, dtype=torch.bool)
    reset[1, 4] = True
    return stack, x[:, 200:], state, reset


def test_local_learning_steps_read_nothing_on_the_host():
    stack, x, state, reset = learned_stack()
    rule = build("local", new_synapses=6, fused=False, fixed_shapes=True)
    before = stack.layers[0].segments.permanence.clone()
    assert host_reads(stack, rule, x, state, reset) == Counter()
    assert not torch.equal(stack.layers[0].segments.permanence, before)  # it did learn


def test_the_count_sees_the_host_reads_of_lists_as_found():
    stack, x, state, reset = learned_stack()
    rule = build("local", new_synapses=6, fused=False, fixed_shapes=False)  # nonzero: what a CPU prefers
    assert host_reads(stack, rule, x, state, reset)["aten::nonzero"] >= STEPS


@pytest.mark.parametrize("evaluate", [False, True])
def test_inference_steps_read_nothing_on_the_host(evaluate):
    stack, x, state, reset = learned_stack()
    stack.train(not evaluate)
    assert host_reads(stack, Frozen(fused=False), x, state, reset) == Counter()  # the torch steps, as on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rule", [build("local", new_synapses=6), None])
def test_a_chunk_on_a_gpu_never_synchronises(rule):
    stack, x, state, reset = learned_stack()
    stack = stack.cuda()
    x, reset, state = x.cuda(), reset.cuda(), {k: v.cuda() for k, v in state.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            stack(x, state, reset, learning=rule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
