"""The dense baselines keep the stack's surface: chunks carry state exactly, outputs see only
the past, and settings they cannot honour fail with the setting named."""

import pytest
import torch

from predictive.baselines import ConvNet, LSTMModel
from predictive.learning import build


def test_cnn_reads_maps_of_frequency_bins_and_is_causal_across_chunks():
    torch.manual_seed(0)
    cnn = ConvNet(input_size=4 * 20, channels=8, kernel_size=5, layers=2, frequency_bins=20).eval()
    assert cnn.output_size == 8 * 5 and cnn.convs[0].in_channels == 4  # 20 bins -> 10 -> 5 after two poolings
    x = torch.randn(3, 30, 80)
    whole, state = cnn(x, cnn.initial_state(3))
    assert whole.cells.shape == (3, 30, 40) and whole.prediction.shape == (3, 30, 80)
    # Two chunks through the carried state give the same outputs as one.
    first, mid = cnn(x[:, :7], cnn.initial_state(3))
    second, end = cnn(x[:, 7:], mid)
    assert torch.equal(torch.cat([first.cells, second.cells], 1), whole.cells)
    assert torch.equal(end["history"], state["history"]) and state["history"].shape == (3, 8, 80)
    # The output at t does not depend on inputs after t, and does on those up to 8 steps before.
    later = x.clone()
    later[:, 20] += 1.0
    moved = (cnn(later, cnn.initial_state(3))[0].cells - whole.cells).abs().amax((0, 2))
    assert (moved[:20] == 0).all() and (moved[20:29] > 0).all() and moved[29] == 0
    # A reset at the first step forgets the previous chunk, as a fresh state does.
    reset = torch.zeros(3, 23, dtype=torch.bool)
    reset[:, 0] = True
    assert torch.equal(cnn(x[:, 7:], mid, reset=reset)[0].cells, cnn(x[:, 7:], cnn.initial_state(3))[0].cells)


def test_cnn_learns_by_gradient_only_and_rejects_impossible_settings():
    cnn = ConvNet(input_size=40, channels=4, frequency_bins=20)
    x = torch.randn(2, 10, 40)
    out, _ = cnn(x, cnn.initial_state(2), learning=build("backprop"))
    out.cells.sum().backward()
    assert cnn.convs[0].weight.grad.abs().sum() > 0
    hybrid, _ = cnn(x, cnn.initial_state(2), learning=build("hybrid"))
    assert hybrid.local_loss > 0  # the next-input loss hybrid adds
    with pytest.raises(ValueError, match="model=cnn has no local learning rule"):
        cnn(x, cnn.initial_state(2), learning=build("local"))
    with pytest.raises(ValueError, match="model=cnn has no local learning rule"):
        build("local").check(cnn)  # before any training (PredictiveModule calls it)
    build("hybrid").check(cnn)
    reset = torch.zeros(2, 10, dtype=torch.bool)
    reset[:, 5] = True
    with pytest.raises(ValueError, match="reset after the first step"):
        cnn(x, cnn.initial_state(2), reset=reset)
    for bins in (30, 2):  # does not divide 40; leaves no bin after two poolings
        with pytest.raises(ValueError, match="model.frequency_bins"):
            ConvNet(input_size=40, frequency_bins=bins)
    with pytest.raises(ValueError, match="channels"):
        ConvNet(input_size=40, channels=0)


@pytest.mark.parametrize("reset_at", [[0], [0, 11]])
def test_lstm_resets_match_a_step_by_step_run(reset_at):
    """Resets at the first step only (each clip starts) take the one fused call; a reset in
    the middle steps through time. Both clear exactly the streams and steps asked."""
    torch.manual_seed(0)
    lstm = LSTMModel(input_size=6, hidden_size=5)
    x = torch.randn(3, 20, 6)
    state = {name: torch.randn_like(v) for name, v in lstm.initial_state(3).items()}
    reset = torch.zeros(3, 20, dtype=torch.bool)
    reset[:2, reset_at] = True  # streams 0 and 1 reset, stream 2 carries its state on
    out, end = lstm(x, state, reset=reset)
    h, c, expected = state["h"], state["c"], []
    for t in range(20):
        keep = (~reset[:, t]).float().view(1, -1, 1)
        step, (h, c) = lstm.lstm(x[:, t : t + 1], (h * keep, c * keep))
        expected.append(step)
    assert torch.allclose(out.cells, torch.cat(expected, 1), atol=1e-6) and torch.allclose(end["h"], h, atol=1e-6)
    assert not torch.allclose(out.cells, lstm(x, state)[0].cells)  # the resets mattered


def test_sparse_cnn_keeps_k_winners_per_step_and_its_masked_weights_zero():
    """model=sparse_cnn (Ahmad & Scheinkman's sparse CNN): each step keeps exactly k of a layer's
    maps x bins, the masked weights stay zero through an optimizer step, and the dense CNN's
    parameters keep their names (old checkpoints load)."""
    torch.manual_seed(0)
    cnn = ConvNet(40, channels=8, frequency_bins=20, activity=[0.1, 0.25], weight_sparsity=[0.5, 0.8], hidden=30)
    x = torch.randn(3, 12, 40)
    out, _ = cnn(x, cnn.initial_state(3), learning=build("backprop"))
    assert out.cells.shape == (3, 12, 30) and ((out.cells != 0).sum(-1) == 3).all()  # 10% of 30 hidden units
    first = cnn.convs[:4](x.view(3, 12, 2, 20).transpose(1, 2))  # (B, maps, T, bins) after the first k-WTA
    assert ((first != 0).sum((1, 3)) == round(0.1 * 8 * 10)).all()  # k of 8 maps x 10 bins at every step
    masks = [cnn.convs[0].parametrizations.weight[0].mask, cnn.convs[4].parametrizations.weight[0].mask]
    assert [round(1 - float(m.mean()), 2) for m in masks] == [0.5, 0.8]
    optimizer = torch.optim.SGD(cnn.parameters(), lr=0.1)
    out.cells.pow(2).sum().backward()
    optimizer.step()
    assert (cnn.convs[4].weight[masks[1] == 0] == 0).all() and (cnn.dense.weight[cnn.dense.mask == 0] == 0).all()
    dense = ConvNet(40, channels=8, frequency_bins=20)
    assert not dense.sparse and [n for n, _ in dense.named_parameters()][:2] == ["convs.0.weight", "convs.0.bias"]
    with pytest.raises(ValueError, match="model.activity must be one value or 2"):
        ConvNet(40, frequency_bins=20, activity=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="model.hidden"):
        ConvNet(40, frequency_bins=20, hidden=-1)
    bad = {"activity": [0.1, 0.0], "weight_sparsity": 1.0, "hidden_activity": 1.5, "hidden_weight_sparsity": "0.9"}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=rf"model.{name} must be in"):
            ConvNet(40, frequency_bins=20, hidden=10, **{name: value})
    assert ConvNet(40, frequency_bins=20, activity=[None, 0.5]).sparse  # a k-WTA in the second layer only
