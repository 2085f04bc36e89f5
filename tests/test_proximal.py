"""Proximal learning: the layer-local contrastive predictive loss of the feedforward maps."""

import math

import pytest
import torch
import torch.nn.functional as F

from predictive import Frozen, Local, PredictiveStack
from predictive.proximal import contrastive_predictive_loss

SMALL = dict(columns=32, cells=2, active_columns=4, synapses=8, activation_threshold=2, matching_threshold=2)


def test_the_loss_is_log_t_for_a_blind_predictor_and_small_for_a_right_one():
    t, ahead = 8, 2
    code = torch.eye(t).expand(3, t, t)  # step s codes as the one-hot e_s
    blind = contrastive_predictive_loss(code, torch.zeros(t, t), ahead)
    assert blind.item() == pytest.approx(math.log(t), abs=1e-6)
    shift = torch.zeros(t, t)
    shift[torch.arange(t - ahead), torch.arange(ahead, t)] = 20.0  # e_s -> 20 e_{s+ahead}
    assert contrastive_predictive_loss(code, shift, ahead).item() < 1e-7
    assert contrastive_predictive_loss(code[:, :ahead], shift, ahead).item() == 0.0  # no anchor in the chunk


def test_anchors_whose_successor_lies_past_a_reset_are_left_out():
    torch.manual_seed(0)
    code, predictor, ahead = torch.randn(2, 9, 5), torch.randn(5, 5), 2
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 4] = True  # stream 0: anchors 2 and 3 reach step 4
    logits = (code[:, :-ahead] @ predictor) @ code.transpose(1, 2)
    each = F.cross_entropy(logits.flatten(0, 1), torch.arange(ahead, 9).repeat(2), reduction="none").view(2, -1)
    keep = torch.ones_like(each, dtype=torch.bool)
    keep[0, 2:4] = False
    expected = each[keep].mean()
    assert contrastive_predictive_loss(code, predictor, ahead, reset).item() == pytest.approx(expected.item(), rel=1e-6)
    reset[0, 0] = True  # a reset at an anchor's own step cuts nothing
    assert contrastive_predictive_loss(code, predictor, ahead, reset).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_the_gradient_reaches_each_local_layers_map_and_predictor_alone(fused):
    torch.manual_seed(0)
    stack = PredictiveStack(20, layers=2, proximal_ahead=2, **SMALL)
    x = torch.randn(3, 12, 20, requires_grad=True)
    out, _ = stack(x, stack.initial_state(3), learning=Local(fused=fused, new_synapses=4))
    out.local_loss.backward()
    reached = {name for name, p in stack.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {f"layers.{i}.{name}" for i in (0, 1)
                       for name in ("code_predictor", "feedforward.parametrizations.weight.original")}
    assert x.grad is None  # nothing below the bottom layer either
    # The layer above learns from the cells below, detached: its loss alone reaches no weight of layer 0.
    stack.zero_grad()
    stack.layers[1].proximal_loss(out.cells.detach()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in stack.layers[0].parameters())


@pytest.mark.parametrize("rule", [Local(new_synapses=4), Frozen()])
def test_without_proximal_learning_the_map_and_the_input_mean_stay_put(rule):
    """A layer without `proximal_ahead` has no predictor, and a rule other than `Local` leaves
    the map of one with it as it is (frozen: the same model with its layers frozen)."""
    torch.manual_seed(0)
    plain, proximal = PredictiveStack(20, **SMALL), PredictiveStack(20, proximal_ahead=2, **SMALL)
    assert plain.layers[0].code_predictor is None
    with pytest.raises(ValueError, match="proximal_ahead > 0"):
        plain.layers[0].proximal_loss(torch.randn(2, 10, 20))
    for stack in (plain, proximal) if isinstance(rule, Local) else (proximal,):
        layer = stack.layers[0]
        before = layer.feedforward.dense_weight.detach().clone()
        if stack is plain:
            out, _ = stack(torch.randn(2, 10, 20), stack.initial_state(2), learning=rule)
        else:
            with torch.no_grad() if isinstance(rule, Local) else torch.enable_grad():  # no gradient wanted: no loss
                out, _ = stack(torch.randn(2, 10, 20), stack.initial_state(2), learning=rule)
        assert out.local_loss.item() == 0.0 and not out.local_loss.requires_grad
        assert torch.equal(layer.feedforward.dense_weight, before) and torch.equal(layer.input_mean, torch.zeros(20))
        assert layer.input_steps.item() == 0 and layer.map_updates.item() == 0


def test_the_map_learns_a_code_that_predicts_itself_with_unit_rows_and_its_zeros_kept():
    """A stream that walks around a ring of 12 random patterns (plus noise): the code's loss
    falls from about log T towards what the ring allows, under the optimizer that trains a head."""
    torch.manual_seed(0)
    ring, t, ahead = torch.randn(12, 40), 24, 3
    stack = PredictiveStack(40, columns=64, cells=1, active_columns=6, synapses=8, proximal_ahead=ahead)
    layer = stack.layers[0]
    rule = Local(proximal_lr=0.01, new_synapses=4)
    mask = layer.feedforward.mask.clone()
    initial = F.normalize(layer.feedforward.weight.detach().clone(), dim=1)
    groups = rule.parameter_groups(stack, [p for p in stack.parameters() if p.requires_grad])
    assert [g.get("lr") for g in groups] == [None, 0.01] and len(groups[1]["params"]) == 2
    optimizer = torch.optim.Adam(groups, lr=0.1)
    losses = []
    for _ in range(60):
        start = torch.randint(12, (8, 1))
        x = ring[(start + torch.arange(t)) % 12] + 0.3 * torch.randn(8, t, 40) + 2.0  # an offset the mean takes out
        out, _ = stack(x, stack.initial_state(8), learning=rule)
        optimizer.zero_grad()
        out.local_loss.backward()
        optimizer.step()
        losses.append(out.local_loss.item())
    assert losses[0] > math.log(t) - 0.3 and sum(losses[-10:]) / 10 < losses[0] - 1.0
    assert torch.allclose(layer.input_mean, ring.mean(0) + 2.0, atol=0.1) and layer.input_steps.item() == 60 * 8 * t
    layer.proximal_loss(x)  # (re)normalises the rows before it scores
    weight = layer.feedforward.weight.detach()
    assert torch.allclose(weight.norm(dim=1), torch.ones(64), atol=1e-5) and torch.equal(weight != 0, mask.bool())
    assert (weight - initial).norm(dim=1).mean() > 0.15  # the rows turned (0.002 at proximal_lr 1e-5)


def test_only_local_rules_give_the_maps_a_group_and_bad_settings_are_named():
    plain, proximal = PredictiveStack(20, **SMALL), PredictiveStack(20, proximal_ahead=2, **SMALL)
    for stack in (plain, proximal):
        params = list(stack.parameters())
        assert Frozen().parameter_groups(stack, params) == [{"params": params}]
    params = list(plain.parameters())
    assert Local().parameter_groups(plain, params) == [{"params": params}]
    with pytest.raises(ValueError, match="proximal_ahead must be an integer >= 0"):
        PredictiveStack(20, proximal_ahead=-1, **SMALL)
    with pytest.raises(ValueError, match="proximal_lr must be > 0"):
        Local(proximal_lr=0)


def test_with_proximal_chunks_the_map_learns_from_the_first_chunks_alone():
    torch.manual_seed(0)
    stack = PredictiveStack(20, proximal_ahead=2, **SMALL)
    layer, rule = stack.layers[0], Local(proximal_chunks=2, new_synapses=4)
    optimizer = torch.optim.Adam(rule.parameter_groups(stack, list(stack.parameters())), lr=0.01)
    weights = []
    for _ in range(4):
        out, _ = stack(torch.randn(2, 10, 20), stack.initial_state(2), learning=rule)
        if out.local_loss.requires_grad:  # not once the maps stay
            optimizer.zero_grad()
            out.local_loss.backward()
            optimizer.step()
        weights.append(layer.feedforward.dense_weight.detach().clone())
    assert layer.map_updates.item() == 2 and layer.input_steps.item() == 2 * 2 * 10
    assert not torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])
    assert torch.equal(weights[2], weights[3]) and out.local_loss.item() == 0.0 and not out.local_loss.requires_grad
    with pytest.raises(ValueError, match="proximal_chunks must be an integer >= 0"):
        Local(proximal_chunks=-1)
