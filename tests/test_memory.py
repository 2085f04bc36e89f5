"""The temporal-memory layer and the stack: shapes, HTM semantics, learning-mode invariants."""

from itertools import product

import pytest
import torch

from predictive.learning import build
from predictive.memory import LayerStep, TemporalMemory
from predictive.stack import PredictiveStack

LOCAL = build("local", new_synapses=6)
SMALL = dict(
    columns=64, cells=4, active_columns=8, segments=2, synapses=8, activation_threshold=4, matching_threshold=3
)
THRESHOLDS = dict(activation_threshold=2, matching_threshold=2)


def codes(n_symbols=6, width=48, bits=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n_symbols, width)
    for s in range(n_symbols):
        out[s, torch.randperm(width, generator=g)[:bits]] = 1.0
    return out


def stream(symbols, repeats, batch=1):
    c = codes()
    return c[torch.tensor(symbols * repeats)].unsqueeze(0).expand(batch, -1, -1).contiguous()


def starts(length, period):
    return (torch.arange(length) % period == 0).unsqueeze(0)


@pytest.mark.parametrize("fused", [False, True])
def test_first_step_bursts_then_a_learned_sequence_is_predicted(fused):
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL)
    x = stream([0, 1, 2, 3, 4], 6)
    out, _ = stack(x, stack.initial_state(1), reset=starts(30, 5), learning=build("local", new_synapses=6, fused=fused))
    layer = stack.layers[0]
    assert (out.anomaly[0, ::5] == 1.0).all()  # after a reset nothing is predicted: all burst
    assert out.cells[0, 0].sum() == layer.k * layer.cells_per_column
    # Once learned, each later step is predicted: one cell per active column, no anomaly.
    last = out.cells[0, -4:]
    assert (out.anomaly[0, -4:] == 0).all()
    assert (last.sum(-1) == layer.k).all()
    assert ((last == 0) | (last == 1)).all()


@pytest.mark.parametrize("fused", [False, True])
def test_same_symbol_in_two_contexts_uses_different_cells(fused):
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL)
    x = stream([0, 2, 3, 1, 2, 4], 8)  # symbol 2 after 0 and after 1
    out, _ = stack(x, stack.initial_state(1), reset=starts(48, 3), learning=build("local", new_synapses=6, fused=fused))
    after_0, after_1 = out.cells[0, -5], out.cells[0, -2]
    layer_columns = lambda cells: cells.view(64, 4).amax(-1)  # noqa: E731
    assert torch.equal(layer_columns(after_0), layer_columns(after_1))  # same columns: same input
    assert (after_0 * after_1).sum() == 0  # disjoint cells: different contexts


@pytest.mark.parametrize("fused", [False, True])
def test_reset_clears_only_the_masked_streams(fused):
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL)
    x = stream([0, 1, 2, 3], 8, batch=2)
    rule = build("local", new_synapses=6, fused=fused)
    _, state = stack(x[:, :-1], stack.initial_state(2), reset=starts(31, 4).expand(2, -1), learning=rule)
    reset = torch.tensor([[True], [False]])
    out, _ = stack(x[:, -1:], state, reset=reset, learning=rule)  # symbol 3, predicted in context
    assert out.anomaly[0, 0] == 1.0 and out.anomaly[1, 0] == 0.0


def test_local_mode_head_loss_puts_no_gradient_into_the_stack():
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL, dict(SMALL, columns=32)])
    head = torch.nn.Linear(stack.output_size, 3)
    rule = build("local", new_synapses=6)
    out, _ = stack(stream([0, 1, 2], 4), stack.initial_state(1), learning=rule)
    loss = head(rule.head_features(out.cells)).logsumexp(-1).sum() + rule.local_loss_weight * out.local_loss
    loss.backward()
    assert head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stack.parameters())
    assert out.cells.grad_fn is None and out.local_loss.grad_fn is None


def test_backprop_mode_task_gradient_reaches_the_bottom_layer():
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL, dict(SMALL, columns=32)])
    with torch.no_grad():  # some connected synapses, so that segments carry gradient too
        for layer in stack.layers:
            layer.segments.permanence.uniform_(0.0, 1.0)
    head = torch.nn.Linear(stack.output_size, 3)
    out, _ = stack(stream([0, 1, 2], 3), stack.initial_state(1), learning=build("backprop"))
    head(out.cells).logsumexp(-1).sum().backward()
    bottom = stack.layers[0]
    assert bottom.feedforward.parametrizations.weight.original.grad.abs().sum() > 0
    assert bottom.segments.permanence.grad.abs().sum() > 0


def test_hybrid_grows_segments_by_the_local_rule_and_the_gradient_still_flows():
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL, dict(SMALL, columns=32)])
    rule = build("hybrid", new_synapses=6)
    rule.check(stack)  # no random synapses: growth starts them, as in local mode
    assert all(not (layer.segments.permanence > 0).any() for layer in stack.layers)
    head = torch.nn.Linear(stack.output_size, 3)
    out, _ = stack(stream([0, 1, 2, 3], 4), stack.initial_state(1), learning=rule)
    head(out.cells).logsumexp(-1).sum().backward()
    for layer in stack.layers:
        assert (layer.segments.permanence > 0).sum() >= 6  # grown by the local rule
        assert layer.segments.permanence.grad.abs().sum() > 0  # and tuned by the task loss
    assert stack.layers[0].feedforward.parametrizations.weight.original.grad.abs().sum() > 0
    without = build("hybrid", grow_segments=False, new_synapses=6)
    with pytest.raises(ValueError, match="model.initial_segments=empty"):  # nothing to grow a gradient from
        without.check(PredictiveStack(48, [SMALL]))
    fresh = PredictiveStack(48, [SMALL], initial_segments="random")
    without.check(fresh)
    assert (fresh.layers[0].segments.permanence > 0).float().mean() > 0.4  # random start instead


@pytest.mark.parametrize("learning", ["local", "backprop", "hybrid"])
def test_checking_a_rule_changes_nothing_in_the_model(learning):
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL, dict(SMALL, columns=32)], initial_segments="random")
    before = {k: v.clone() for k, v in stack.state_dict().items()}
    settings = [(layer.recall, layer.fresh_steps, layer.initial_segments) for layer in stack.layers]
    build(learning, **({} if learning == "backprop" else {"new_synapses": 6})).check(stack)
    assert all(torch.equal(before[k], v) for k, v in stack.state_dict().items())
    assert settings == [(layer.recall, layer.fresh_steps, layer.initial_segments) for layer in stack.layers]


def test_each_layers_local_loss_reaches_only_its_own_parameters():
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL, dict(SMALL, columns=32)])
    with torch.no_grad():
        for layer in stack.layers:
            layer.segments.permanence.uniform_(0.0, 1.0)
    rule = build("backprop")
    states = stack.layer_states(stack.initial_state(2))
    x = stream([0, 1, 2], 2, batch=2)
    for t in range(x.shape[1]):
        steps, states, _ = stack.step_layers(x[:, t], states, None, rule)
    for i, layer in enumerate(stack.layers):
        stack.zero_grad(set_to_none=True)
        layer.local_loss(steps[i]).backward(retain_graph=True)
        own = [p.grad for p in layer.parameters() if p.grad is not None]
        assert own and sum(g.abs().sum() for g in own) > 0
        others = [p for j, other in enumerate(stack.layers) if j != i for p in other.parameters()]
        assert all(p.grad is None for p in others)


def saved_bytes(stack, rule, steps):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = stream([0, 1, 2, 3, 4], steps // 5 + 1)[:, :steps]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack(x, stack.initial_state(1), learning=rule)
    return total


def test_local_mode_memory_does_not_grow_with_chunk_length_but_bptt_does():
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL, dict(SMALL, columns=32)])
    assert saved_bytes(stack, LOCAL, 100) == saved_bytes(stack, LOCAL, 2000) == 0
    short, long = saved_bytes(stack, build("backprop"), 20), saved_bytes(stack, build("backprop"), 200)
    assert long > 8 * short


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(active_columns=65), "active_columns"),
        (dict(columns=0), "columns"),
        (dict(cells=0), "cells"),
        (dict(feedforward_sparsity=1.0), "sparsity"),
        (dict(activation_threshold=9), "activation_threshold"),
        (dict(matching_threshold=0), "matching_threshold"),
        (dict(activation_threshold=4.5), "activation_threshold=4.5 must be an integer"),
        (dict(soft_kwta=-1.0), "soft_kwta"),
        (dict(recall="no"), "recall must be true or false, got 'no'"),
        (dict(start_cells=0), "start_cells must be true or false, got 0"),
        (dict(first_order_fallback=1), "first_order_fallback must be true or false"),
        (dict(fresh_steps=-1), "fresh_steps must be an integer >= 0"),
        (dict(fresh_steps=1.5), "fresh_steps must be an integer >= 0"),
        (dict(predicted_bias=-0.5), "predicted_bias must be a number >= 0"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(settings, name):
    with pytest.raises(ValueError, match=name):
        TemporalMemory(48, **{**SMALL, **settings})


def test_input_of_the_wrong_width_is_rejected():
    stack = PredictiveStack(48, 1, **SMALL)
    with pytest.raises(ValueError, match="input_size=48"):
        stack(torch.zeros(1, 3, 40), stack.initial_state(1))


def test_bad_learning_settings_are_rejected():
    with pytest.raises(ValueError, match="learning rule"):
        build("evolution")
    with pytest.raises(ValueError, match="initial_permanence"):
        build("local", initial_permanence=0.0)
    with pytest.raises(ValueError, match=r"burst_decrement must be in \[0, 1\], got -0.1"):
        build("local", burst_decrement=-0.1)
    with pytest.raises(ValueError, match="permanence_increment"):
        build("local", permanence_increment=1.5)
    with pytest.raises(ValueError, match=r"max_permanence must be in \[initial_permanence=0.45, 1\], got 0.4"):
        build("local", max_permanence=0.4)
    with pytest.raises(ValueError, match="max_permanence=0.45 is below the layer's connected_permanence=0.5"):
        build("local", new_synapses=6, max_permanence=0.45).check(PredictiveStack(48, 1, **SMALL))
    with pytest.raises(ValueError, match="local_loss_weight"):
        build("hybrid", local_loss_weight=-1.0)
    with pytest.raises(ValueError, match="grow_predicted must be true or false"):
        build("local", grow_predicted="no")
    with pytest.raises(ValueError, match="decoder_bias must be true or false"):
        build("local", decoder_bias=1)
    with pytest.raises(ValueError, match="grow_segments must be true or false"):
        build("hybrid", grow_segments="yes")
    with pytest.raises(ValueError, match=r"decoder_code_rate must be in \[0, 1\], got 2"):
        build("local", decoder_code_rate=2)
    with pytest.raises(ValueError, match="fused must be true or false"):
        build("local", fused="auto")
    with pytest.raises(ValueError, match="fused must be false for learning=hybrid"):
        build("hybrid", fused=True)
    with pytest.raises(ValueError, match="fused must be true or false"):
        build("frozen", fused="no")
    with pytest.raises(ValueError, match="fixed_shapes must be true or false"):
        build("local", fixed_shapes="auto")
    with pytest.raises(ValueError, match="new_synapses=20 exceeds"):
        build("local", new_synapses=20).check(PredictiveStack(48, 1, **SMALL))
    with pytest.raises(ValueError, match=r"new_synapses=6 exceeds the layer's cells=4 \(columns x cells\)"):
        build("local", new_synapses=6).check(PredictiveStack(48, 1, **{**SMALL, "columns": 2, "cells": 2,
                                                                      "active_columns": 1}))
    for count in (2.5, True):
        with pytest.raises(ValueError, match="new_synapses must be an integer >= 1"):
            build("local", new_synapses=count)
    for grace in (-1, 2.5, True):
        with pytest.raises(ValueError, match="connected_grace must be an integer >= 0"):
            build("local", connected_grace=grace)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("ceiling, failures", [(0.65, 2), (1.0, 7)])
def test_a_continuation_that_stopped_coming_is_unlearned_in_the_failures_its_ceiling_allows(fused, ceiling, failures):
    """0 1 2 learned twenty times, then 0 1 3: symbol 2 stays predicted after 1 until its links
    fall below connected (0.5) by 0.08 per failure, from `max_permanence` however long it held."""
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL)
    rule = build("local", new_synapses=6, max_permanence=ceiling, fused=fused)
    state = stack.initial_state(1)
    _, state = stack(stream([0, 1, 2], 20), state, reset=starts(60, 3), learning=rule)
    perm = stack.layers[0].segments.permanence
    assert float(perm.detach().max()) == pytest.approx(ceiling)  # reached and held
    out, _ = stack(stream([0, 1, 3], 10), state, reset=starts(30, 3), learning=rule)
    columns_of_2 = stack.layers[0].kwinners.winners(stack.layers[0].feedforward(codes()[2:3]))[0]
    predicted = out.predicted[0, 1::3].view(10, 64, 4).amax(-1)[:, columns_of_2]  # after each 1
    still = predicted.all(-1)
    assert still[:failures].all() and not still[failures:].any()



@pytest.mark.parametrize("grace, evicted", [(30, 1), (0, 0)])
def test_a_new_segment_evicts_a_link_seen_once_before_an_established_one(grace, evicted):
    # Cell 9 (column 2) has both slots in use: slot 0 connected, learned at step 10; slot 1 a
    # link seen once, learned at step 20. Columns 2, 3 burst with cells 9, 13 as new winners,
    # in a context (cells 28, 29 won at t-1) that neither segment matches: new segments start.
    layer = TemporalMemory(8, columns=8, cells=4, active_columns=2, segments=2, synapses=4, **THRESHOLDS)
    seg = layer.segments
    with torch.no_grad():
        seg.presynaptic[18, :2], seg.permanence[18, :2], seg.last_learned[18] = torch.tensor([0, 1]), 0.6, 10
        seg.presynaptic[19, :2], seg.permanence[19, :2], seg.last_learned[19] = torch.tensor([2, 3]), 0.45, 20
    layer.learning_steps.fill_(40)
    prev = layer.initial_state(1)
    prev.cells[0, [28, 29]] = prev.winners[0, [28, 29]] = prev.columns[0, 7] = 1.0  # predicted: no start
    step = burst_of_columns_2_and_3(layer, prev, matched=False)
    with torch.no_grad():
        build("local", new_synapses=2, connected_grace=grace).hebbian.learn_segments(layer, step)
    kept = 19 - evicted
    assert sorted(seg.presynaptic[18 + evicted, :2].tolist()) == [28, 29]  # the new segment
    assert seg.last_learned[kept] == (10 if kept == 18 else 20)  # the other one untouched


@pytest.mark.parametrize("fused", [False, True])
def test_local_learning_keeps_the_cached_synapse_masks_exact(fused):
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL])
    stack(stream([0, 1, 2, 3, 4], 6), stack.initial_state(1), learning=build("local", new_synapses=6, fused=fused))
    seg = stack.layers[0].segments
    p = seg.permanence.detach()
    assert (p > 0).any()
    assert torch.equal(seg.synapse_masks(), torch.stack([p >= seg.connected_permanence, p > 0]).float())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("start_cells", [True, False])
def test_a_step_that_nothing_predicted_starts_on_its_columns_first_cells(fused, start_cells):
    # From the initial state nothing is predicted for symbol 0: with start_cells its columns
    # burst onto their first cells and the context counts as known (diverted 3: the next step
    # fires only what those cells predict), and symbol 1's winners grow towards those cells;
    # without, onto random least-used cells. Symbol 1 starts nothing (the step before did).
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL, start_cells=start_cells)
    rule = build("local", new_synapses=6, fused=fused)
    x = stream([0, 1], 1)
    out, state = stack(x[:, :1], stack.initial_state(1), learning=rule)
    assert state["0.diverted"].tolist() == [3.0 if start_cells else 0.0]
    out, state = stack(x[:, 1:], state, learning=rule)
    assert out.cells[0, 0].sum() == 8 * 4  # symbol 1 bursts: nothing predicts it yet
    assert state["0.diverted"].tolist() == [0.0]
    seg = stack.layers[0].segments
    grown = seg.last_learned >= 0
    presynaptic = seg.presynaptic[grown][seg.permanence[grown] > 0]
    assert len(presynaptic) == 8 * 6  # a segment on each of symbol 1's 8 winners, towards symbol 0's
    assert (presynaptic % 4 == 0).all().item() is start_cells


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [0.0, 1.0])
def test_a_predicted_column_ranks_with_its_raised_score(fused, bias):
    # The first column outside the k-WTA, one of whose cells is predicted: a bias of one
    # standard deviation of the scores lifts it past the k-th (the gap is smaller), and it
    # fires its predicted cell; without a bias it stays out.
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL, predicted_bias=bias)
    layer, x = stack.layers[0], stream([0], 1)
    scores = layer.column_scores(x[0, :1])[0].detach()
    order = scores.sort(descending=True).indices
    first_out, kth = int(order[8]), int(order[7])
    assert scores[kth] - scores[first_out] < scores.std(correction=0)
    state = stack.initial_state(1)
    state["0.predicted"][0, first_out * 4 + 1] = 1.0
    out, _ = stack(x, state, learning=build("local", new_synapses=6, fused=fused))
    columns = out.cells[0, 0].view(64, 4).amax(-1) > 0
    assert columns.sum() == 8
    assert bool(columns[first_out]) is bool(bias)
    assert bool(columns[kth]) is not bool(bias)  # the lowest winner made room
    assert out.anomaly[0, 0].item() == (1.0 - 1 / 8 if bias else 1.0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("anomaly, start", [(0.9, True), (0.5, False)])
def test_a_start_follows_a_step_whose_columns_mostly_burst(fused, anomaly, start):
    # Noise lands on a predicted column now and then: the step after it still starts a
    # context when most of its columns burst, not when half or more were predicted.
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL)
    state = stack.initial_state(1)
    state["0.columns"][0, :10] = 1.0
    state["0.anomaly"][0] = anomaly
    _, state = stack(stream([0], 1), state, learning=build("local", new_synapses=6, fused=fused))
    assert state["0.diverted"].tolist() == [3.0 if start else 0.0]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("start_cells", [True, False])
def test_first_cells_carry_starts_alone(fused, start_cells):
    # Sequences between noise inputs: a new context in a middle learns on a cell other than
    # its column's first (a start's, which grows no segment), so no segment lives on a first
    # cell; without start cells a new context may take any least used cell.
    torch.manual_seed(0)
    stack = PredictiveStack(48, 1, **SMALL, start_cells=start_cells)
    g = torch.Generator().manual_seed(1)
    c, parts = codes(), []
    for i in range(60):
        parts += [c[[0, 1, 2, 3] if i % 2 else [4, 1, 2, 5]], (torch.rand(1, 48, generator=g) < 0.125).float()]
    x = torch.cat(parts).unsqueeze(0)
    stack(x, stack.initial_state(1), learning=build("local", new_synapses=6, fused=fused))
    seg = stack.layers[0].segments
    on_first_cells = (seg.last_learned.view(64, 4, -1)[:, 0] >= 0).any().item()
    assert on_first_cells is not start_cells
    assert (seg.last_learned >= 0).sum() > 30  # the sequences and the noise grew segments


def layer_with_an_old_context() -> TemporalMemory:
    """8 columns x 4 cells; cell 0 of columns 4 and 5 (cells 16, 20) has a connected segment
    onto cell 0 of columns 2 and 3 (cells 8, 12): an older context. The steps tested come
    after a step that predicted something (not the start of a context: start_cells off)."""
    layer = TemporalMemory(8, columns=8, cells=4, active_columns=2, segments=2, synapses=4, start_cells=False,
                           **THRESHOLDS)
    seg = layer.segments
    with torch.no_grad():
        for cell in (16, 20):
            seg.presynaptic[cell * 2, :2] = torch.tensor([8, 12])
            seg.permanence[cell * 2, :2] = 0.6
            seg.last_learned[cell * 2] = 0
    return layer


@pytest.mark.parametrize(
    "burst_winner, matched, novel",
    [
        (0, True, False),  # the burst's winner is the cell the next column's segment knows
        (1, True, True),  # a known context on another cell: predicted only through the union
        (1, False, False),  # an unmatched winner (e.g. after noise) says nothing: the union holds
    ],
)
def test_column_predicted_only_through_a_bursts_other_cells_learns_on_a_new_cell(burst_winner, matched, novel):
    # Columns 2, 3 burst (all 8 cells fire). Cell 0 of columns 4 and 5 has a connected segment
    # onto cell 0 of columns 2 and 3 (an older context). Columns 4, 5 become active next.
    layer = layer_with_an_old_context()
    burst_columns = torch.zeros(1, 8, dtype=torch.bool)
    burst_columns[0, 2:4] = True
    cells = burst_columns.repeat_interleave(4, 1).float()
    winners = torch.zeros(1, 32, dtype=torch.bool)
    winners[0, [8 + burst_winner, 12 + burst_winner]] = True
    step = LayerStep(
        x=torch.zeros(1, 8),
        prev=layer.initial_state(1),
        columns=burst_columns,
        bursting=burst_columns,
        novel=burst_columns,
        cells=cells,
        winners=winners,
        matched=burst_columns & matched,
        anomaly=torch.ones(1), start=layer.starts(layer.initial_state(1)),
    )
    state = layer.predict(step)
    assert state.predicted[0, [16, 20]].tolist() == [1.0, 1.0]  # the burst predicts them
    active = torch.zeros(1, 8, dtype=torch.bool)
    active[0, 4:6] = True
    predicted_cells = (state.predicted > 0) & active.repeat_interleave(4, 1)
    chosen, _, is_novel = layer.choose_winners(state, active, predicted_cells, layer.starts(state))
    assert is_novel[0, 4:6].tolist() == [novel, novel]
    assert chosen[0, [16, 20]].tolist() == [not novel, not novel]  # novel: another cell learns it
    assert chosen[0].sum() == 2  # one winner per active column either way


@pytest.mark.parametrize("diverted", [True, False])
def test_a_diverted_context_stays_on_the_new_winners(diverted):
    # Columns 2, 3 fire their old cells 0 (predicted) but learn on new winners, cells 1 (novel,
    # not bursting). Cell 0 of columns 4, 5 listens to the old cells. When the step before was
    # already diverted (a known context on new winners), the new winners alone carry the
    # context on and columns 4, 5 are novel too; otherwise the old cells' prediction stands.
    layer = layer_with_an_old_context()
    columns = torch.zeros(1, 8, dtype=torch.bool)
    columns[0, 2:4] = True
    cells, winners = torch.zeros(1, 32), torch.zeros(1, 32, dtype=torch.bool)
    cells[0, [8, 12]] = 1.0
    winners[0, [9, 13]] = True
    prev = layer.initial_state(1)
    prev.diverted.fill_(float(diverted))
    step = LayerStep(
        x=torch.zeros(1, 8),
        prev=prev,
        columns=columns,
        bursting=torch.zeros_like(columns),
        novel=columns,
        cells=cells,
        winners=winners,
        matched=torch.zeros_like(columns),
        anomaly=torch.zeros(1), start=layer.starts(prev),
    )
    state = layer.predict(step)
    assert state.predicted[0, [16, 20]].tolist() == [1.0, 1.0]
    assert state.diverted.tolist() == [float(diverted)]
    active = torch.zeros(1, 8, dtype=torch.bool)
    active[0, 4:6] = True
    predicted_cells = (state.predicted > 0) & active.repeat_interleave(4, 1)
    _, _, is_novel = layer.choose_winners(state, active, predicted_cells, layer.starts(state))
    assert is_novel[0, 4:6].tolist() == [diverted, diverted]


def burst_of_columns_2_and_3(layer: TemporalMemory, prev: dict, matched: bool) -> LayerStep:
    """Columns 2, 3 burst (all cells fire) and learn on cells 1 (9, 13)."""
    columns = torch.zeros(1, 8, dtype=torch.bool)
    columns[0, 2:4] = True
    winners = torch.zeros(1, 32, dtype=torch.bool)
    winners[0, [9, 13]] = True
    return LayerStep(
        x=torch.zeros(1, 8), prev=prev, columns=columns, bursting=columns, novel=columns,
        cells=columns.repeat_interleave(4, 1).float(), winners=winners, matched=columns & matched,
        anomaly=torch.ones(1), start=layer.starts(prev),
    )


@pytest.mark.parametrize("matched", [True, False])
def test_a_known_context_predicts_what_its_winners_recall(matched):
    # The burst of columns 2, 3 predicts the old context's cells in columns 4, 5 (connected).
    # Cell 1 of columns 6, 7 grew a segment onto the winners, cells 1 of columns 2, 3, in one
    # earlier pass (potential synapses, not connected). When the burst's winners matched (a
    # context seen before), the decoded prediction is what they recall, columns 6 and 7.
    layer = layer_with_an_old_context()
    with torch.no_grad():
        for cell in (25, 29):
            layer.segments.presynaptic[cell * 2, :2] = torch.tensor([9, 13])
            layer.segments.permanence[cell * 2, :2] = 0.45
            layer.segments.last_learned[cell * 2] = 0
    state = layer.predict(burst_of_columns_2_and_3(layer, layer.initial_state(1), matched))
    assert state.predicted[0].nonzero().flatten().tolist() == [16, 20]  # the cells that fire next
    expected = [6, 7] if matched else [4, 5]
    assert state.predicted_columns[0].nonzero().flatten().tolist() == expected


@pytest.mark.parametrize(
    "diverted, context_cells, recall, fired",
    [
        (1.0, [17], True, [17]),  # a known context: only its own cell of the two predicted fires
        (1.0, [18], True, [16, 17, 18, 19]),  # it predicts no cell that was predicted: the column bursts
        (0.0, [16, 17], True, [16, 17]),  # not known (context == predicted): every predicted cell fires
        (1.0, [17], False, [16, 17]),  # a layer that does not recall (backprop) fires the union's cells
    ],
)
def test_a_known_context_fires_only_its_own_cells(diverted, context_cells, recall, fired):
    # Column 4 has two predicted cells (16, 17: two contexts of an earlier burst's union).
    layer = layer_with_an_old_context()
    layer.recall = recall
    state = layer.initial_state(1)
    state.predicted[0, [16, 17]] = 1.0
    state.context_predicted[0, context_cells] = 1.0
    state.diverted.fill_(diverted)
    active = torch.zeros(1, 8, dtype=torch.bool)
    active[0, 4] = True
    layer.kwinners.winners = lambda scores: active  # the input's columns, whatever x is
    step = layer.activate(torch.zeros(1, 8), state)
    assert step.cells[0].nonzero().flatten().tolist() == fired
    assert step.bursting[0, 4].item() is (len(fired) == 4)


@pytest.mark.parametrize(
    "was_matching, diverted_before, diverted_after",
    [
        (True, 1.0, 2.0),  # a transition seen before: carried on, through a burst
        (False, 1.0, 0.0),  # a burst nothing matched (noise) ends it
        (True, 2.0, 0.0),  # a second such burst in a row ends it
    ],
)
def test_a_diverted_context_runs_on_through_one_burst_of_a_transition_not_yet_connected(
    was_matching, diverted_before, diverted_after
):
    # At t-1 the context was diverted (new winners carried it). Now columns 2, 3 burst with no
    # segment on those winners. If their cells had a segment matching the cells that fired at
    # t-1 (a transition seen before, not connected yet), the new winners still carry the
    # context on, once.
    layer = layer_with_an_old_context()
    prev = layer.initial_state(1)
    prev.diverted.fill_(diverted_before)
    prev.matching_columns[0, 2:4] = float(was_matching)
    state = layer.predict(burst_of_columns_2_and_3(layer, prev, matched=False))
    assert state.diverted.tolist() == [diverted_after]
    # Cells 0 of columns 4, 5 have segments matching the burst: columns 4, 5 are matching now.
    assert state.matching_columns[0].nonzero().flatten().tolist() == [4, 5]


def test_soft_kwta_sends_gradient_to_losing_columns_with_the_same_forward_values():
    x = torch.rand(2, 48, generator=torch.Generator().manual_seed(1))
    cells, reached = [], []
    for soft in (0.0, 1.0):
        torch.manual_seed(0)
        layer = TemporalMemory(48, soft_kwta=soft, **SMALL)
        step, _ = layer(x, layer.initial_state(2))
        step.cells.sum().backward()
        grad = layer.feedforward.parametrizations.weight.original.grad  # (C, D)
        losers = ~step.columns.any(0)
        cells.append(step.cells.detach())
        reached.append(bool(grad[losers].abs().sum() > 0))
    assert torch.equal(cells[0], cells[1])  # the forward pass is the same binary activity
    assert reached == [False, True]  # only the soft gate lets a losing column learn to win


def test_a_winner_that_did_not_fire_counts_as_presynaptic_activity():
    # A diverted context: at t-1 columns 2, 3 fired their old cells 0 (8, 12) and learned on new
    # winners, cells 1 (9, 13). Cell 1 of column 4 (17) grew a segment onto those winners in an
    # earlier pass (below the connection threshold); now column 4 is novel again and 17 is its
    # matched winner. Its synapses onto 9 and 13 are reinforced: the winners carry the context.
    layer = layer_with_an_old_context()
    seg = layer.segments
    with torch.no_grad():
        seg.presynaptic[17 * 2, :2] = torch.tensor([9, 13])
        seg.permanence[17 * 2, :2] = 0.45
        seg.last_learned[17 * 2] = 0
    prev = layer.initial_state(1)
    prev.cells[0, [8, 12]] = 1.0
    prev.winners[0, [9, 13]] = 1.0
    prev.potential_overlap[0, 17, 0] = 2.0  # against the winners (a known context)
    columns = torch.zeros(1, 8, dtype=torch.bool)
    columns[0, 4] = True
    cells, winners = torch.zeros(1, 32), torch.zeros(1, 32, dtype=torch.bool)
    cells[0, 16], winners[0, 17] = 1.0, True
    step = LayerStep(
        x=torch.zeros(1, 8), prev=prev, columns=columns, bursting=torch.zeros_like(columns), novel=columns,
        cells=cells, winners=winners, matched=columns, anomaly=torch.zeros(1), start=layer.starts(prev),
    )
    build("local", new_synapses=2, fused=False).update(layer, step)
    assert seg.permanence[17 * 2, :2].tolist() == pytest.approx([0.57, 0.57])  # +0.12, not -0.02


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("code_rate", [0.0, 0.5])
def test_the_decoder_learns_the_input_of_the_active_columns(fused, code_rate):
    torch.manual_seed(0)
    stack = PredictiveStack(48, [SMALL])
    x = stream([0, 1, 2, 3, 4], 2)
    rule = build("local", new_synapses=6, decoder_code_rate=code_rate, fused=fused)
    out, _ = stack(x, stack.initial_state(1), reset=starts(10, 5), learning=rule)
    assert out.anomaly.min() == 1.0  # each transition seen twice: nothing predicted yet
    layer = stack.layers[0]
    with torch.no_grad():
        columns = layer.kwinners.winners(layer.feedforward(x[0, :5])).float()  # (5 symbols, C)
        error = float((layer.decoder(columns) - x[0, :5]).norm() / x[0, :5].norm())
    if code_rate:
        assert error < 0.4  # each symbol's columns already decode to it
    else:
        # Nothing was predicted (connected), and a known context's recall teaches it nothing
        # (test_the_decoder_does_not_learn_from_a_known_contexts_prediction): it is still zero.
        assert error == 1.0


def test_recall_can_be_turned_off_in_both_paths():
    x = stream([0, 1, 2, 3, 4, 5], 4)
    prediction = {}
    for recall, fused in product((True, False), (False, True)):
        torch.manual_seed(0)
        stack = PredictiveStack(48, [dict(SMALL, recall=recall)])
        out, _ = stack(x, stack.initial_state(1), learning=build("local", new_synapses=6, fused=fused))
        prediction[recall, fused] = out.prediction
    for recall in (True, False):  # the decoder's sums run in another order in the kernel
        torch.testing.assert_close(prediction[recall, False], prediction[recall, True], rtol=1e-5, atol=1e-5)
    assert (prediction[True, False] - prediction[False, False]).abs().max() > 0.1  # the 2nd pass recalls


@pytest.mark.parametrize(
    "diverted, context_cells, weakened",
    [
        (0.0, [], True),  # a settled context: its failed prediction is weakened
        (1.0, [], False),  # a known context on other cells: 16, 20 belong to the old one
        (1.0, [16, 20], True),  # ... unless its own winners predicted them too
    ],
)
def test_a_known_context_does_not_weaken_the_predictions_of_other_contexts_cells(diverted, context_cells, weakened):
    # At t-1 columns 2, 3 fired the old context's cells 8, 12 and (diverted) learned on new
    # winners 9, 13; 8 and 12 made cells 16, 20 predict columns 4, 5. Column 6 comes instead.
    layer = layer_with_an_old_context()
    prev = layer.initial_state(1)
    prev.cells[0, [8, 12]] = 1.0
    prev.winners[0, [9, 13]] = 1.0
    prev.active_overlap[0, [16, 20], 0] = 2.0
    prev.diverted.fill_(diverted)
    prev.context_predicted[0, context_cells] = 1.0
    columns = torch.zeros(1, 8, dtype=torch.bool)
    columns[0, 6] = True
    cells, winners = torch.zeros(1, 32), torch.zeros(1, 32, dtype=torch.bool)
    cells[0, 24:28], winners[0, 24] = 1.0, True
    step = LayerStep(
        x=torch.zeros(1, 8), prev=prev, columns=columns, bursting=columns, novel=columns,
        cells=cells, winners=winners, matched=torch.zeros_like(columns), anomaly=torch.ones(1),
        start=layer.starts(prev),
    )
    build("local", new_synapses=2, fused=False).update(layer, step)
    expected = 0.6 - 0.08 if weakened else 0.6  # predicted_decrement (the context at t-1 was predicted)
    assert layer.segments.permanence[[16 * 2, 20 * 2], :2].flatten().tolist() == pytest.approx([expected] * 4)


@pytest.mark.parametrize("diverted", [0.0, 1.0, 2.0])
def test_the_decoder_does_not_learn_from_a_known_contexts_prediction(diverted):
    # A known context's prediction is its winners' recall or the burst's union (other
    # contexts'); the input that follows is this context's, so the pair teaches nothing.
    layer = layer_with_an_old_context()
    prev = layer.initial_state(1)
    prev.predicted_columns[0, 4] = 1.0
    prev.diverted.fill_(diverted)
    step = LayerStep(
        x=torch.ones(1, 8), prev=prev, columns=torch.zeros(1, 8, dtype=torch.bool),
        bursting=torch.zeros(1, 8, dtype=torch.bool), novel=torch.zeros(1, 8, dtype=torch.bool),
        cells=torch.zeros(1, 32), winners=torch.zeros(1, 32, dtype=torch.bool),
        matched=torch.zeros(1, 8, dtype=torch.bool), anomaly=torch.zeros(1), start=layer.starts(prev),
    )
    build("local", new_synapses=2, fused=False, decoder_code_rate=0.0).update(layer, step)
    learned = layer.decoder.weight[:, 4]
    if diverted:
        assert learned.abs().sum() == 0
    else:
        assert learned.tolist() == pytest.approx([0.25] * 8)  # error 1 x rate 0.5 / (1 column + 1)


@pytest.mark.parametrize(
    "fresh_steps, learned_ago, predicted_columns",
    [
        (300, 10, [6, 7]),  # a continuation seen once, lately, on the fired cells: recalled
        (300, 400, [4, 5]),  # a link that faded long ago is not: the burst's union stands
        (0, 10, [4, 5]),  # off
    ],
)
def test_a_known_context_on_new_cells_recalls_the_fired_cells_fresh_links(fresh_steps, learned_ago, predicted_columns):
    # Columns 2, 3 fire the old context's cells 8, 12 (connected onward to 16, 20: columns 4,
    # 5) but the context is known and learns on new winners 9, 13, which recall nothing yet.
    # Cells 24, 28 (columns 6, 7) hold a link onto 8, 12 seen once (0.45, matching only):
    # what this context learned when it first ran along the old one's cells.
    layer = layer_with_an_old_context()
    layer.fresh_steps = fresh_steps
    seg = layer.segments
    with torch.no_grad():
        layer.learning_steps.fill_(1000)
        for cell in (24, 28):
            seg.presynaptic[cell * 2, :2] = torch.tensor([8, 12])
            seg.permanence[cell * 2, :2] = 0.45
            seg.last_learned[cell * 2] = 1000 - learned_ago
    prev = layer.initial_state(1)
    prev.diverted.fill_(1.0)
    columns = torch.zeros(1, 8, dtype=torch.bool)
    columns[0, 2:4] = True
    cells, winners = torch.zeros(1, 32), torch.zeros(1, 32, dtype=torch.bool)
    cells[0, [8, 12]], winners[0, [9, 13]] = 1.0, True
    step = LayerStep(
        x=torch.zeros(1, 8), prev=prev, columns=columns, bursting=torch.zeros_like(columns), novel=columns,
        cells=cells, winners=winners, matched=torch.zeros_like(columns), anomaly=torch.zeros(1),
        start=layer.starts(prev),
    )
    state = layer.predict(step)
    assert state.diverted.tolist() == [1.0]  # known: carried on by the new winners
    assert state.predicted[0].nonzero().flatten().tolist() == [16, 20]  # the connected links
    assert state.predicted_columns[0].nonzero().flatten().tolist() == predicted_columns
