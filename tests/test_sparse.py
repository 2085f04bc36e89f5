import pytest
import torch

from predictive.sparse import KWinners, KWinnersLocal, SparseLinear, kwinners


def test_exactly_k_winners_per_sample_even_with_ties():
    x = torch.zeros(4, 10)
    x[:, :6] = 1.0  # six-way tie for k=3
    kw = KWinners(10, 3, boost_strength=0.0)
    assert ((kw(x) != 0).sum(1) == 3).all()
    assert ((kwinners(torch.randn(5, 20), 4) != 0).sum(1) == 4).all()


def test_ties_at_the_kth_score_go_to_the_first_units():
    # What the compiled local step (predictive.fused) does: topk alone picks any of the tied.
    x = torch.tensor([[0.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 0.5]] * 2)
    x[1] = x[1].flip(0)
    mask = kwinners(x, 4) != 0
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert mask[1].nonzero().flatten().tolist() == [1, 2, 3, 6]
    per_location = KWinnersLocal(8, 4, boost_strength=0.0)(x.t().unsqueeze(0)) != 0  # (1, C=8, L=2)
    assert per_location[0, :, 0].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_k_as_fraction_and_inference_factor():
    kw = KWinners(100, 0.1, k_inference_factor=1.5)
    assert kw.k == 10 and kw.k_inference == 15
    kw.eval()
    assert ((kw(torch.rand(3, 100) + 0.1) != 0).sum(1) == 15).all()


def test_losers_get_zero_gradient_and_winners_keep_their_values():
    x = torch.randn(6, 12, requires_grad=True)
    y = KWinners(12, 4, boost_strength=2.0)(x)
    (y * torch.arange(12.0)).sum().backward()
    winners = y != 0
    assert torch.equal(y[winners], x[winners])  # boosting chooses, never scales
    assert (x.grad[~winners] == 0).all()
    assert torch.equal(x.grad[winners], torch.arange(12.0).expand(6, 12)[winners])


def test_boosting_evens_out_duty_cycles_on_skewed_input():
    torch.manual_seed(0)
    skew = torch.linspace(1.0, 0.0, 50)  # low-index units would always win unboosted

    def duty_spread(strength):
        kw = KWinners(50, 5, boost_strength=strength, duty_cycle_period=200)
        for _ in range(300):
            kw(torch.rand(16, 50) * 0.3 + skew)
        return kw.duty_cycle

    plain, boosted = duty_spread(0.0), duty_spread(20.0)
    assert (plain > 0).sum() <= 20  # without boosting the low-index units do everything
    assert (boosted > 0).sum() >= 45  # with boosting almost all get used
    assert boosted.std() < 0.5 * plain.std()


def test_duty_cycle_and_boost_strength_are_saved_in_state_dict():
    kw = KWinners(8, 2, boost_strength=1.5)
    kw(torch.randn(4, 8))
    state = kw.state_dict()
    assert {"duty_cycle", "boost_strength", "learning_iterations"} <= set(state)
    other = KWinners(8, 2)
    other.load_state_dict(state)
    assert torch.equal(other.duty_cycle, kw.duty_cycle) and float(other.boost_strength) == 1.5


def test_per_location_variant_keeps_k_channels_at_every_location():
    y = KWinnersLocal(16, 3)(torch.randn(2, 16, 5, 7))
    assert y.shape == (2, 16, 5, 7)
    assert ((y != 0).sum(1) == 3).all()


def test_sparse_linear_zero_fraction_is_exact_and_survives_adam():
    torch.manual_seed(0)
    layer = SparseLinear(40, 30, sparsity=0.75)
    zeros_per_row = (layer.weight == 0).sum(1)
    assert (zeros_per_row == 30).all()
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        layer(torch.randn(8, 40)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(layer.weight == 0, layer.mask == 0)
    assert ((layer.weight == 0).sum(1) == 30).all()


def test_sparse_linear_without_gradients_follows_every_change_of_its_weights():
    layer = SparseLinear(8, 4)
    x = torch.rand(3, 8)
    expected = lambda: x @ (layer.dense_weight * layer.mask).t() + layer.bias  # noqa: E731
    with torch.no_grad():
        first = layer(x)  # the masked weights, cached from here on
        assert torch.equal(layer(x), first)
        layer.dense_weight.add_(1.0)  # a local rule's in-place step
        assert torch.allclose(layer(x), expected()) and not torch.allclose(layer(x), first)
        other = SparseLinear(8, 4)
        layer.load_state_dict(other.state_dict())  # new weights and a new mask
        assert torch.allclose(layer(x), other(x))
    out = layer(x)  # with gradients: through the parametrization, to the stored weights
    out.sum().backward()
    assert layer.dense_weight.grad is not None and torch.equal(layer.dense_weight.grad == 0, layer.mask == 0)


@pytest.mark.parametrize(
    "make, setting",
    [
        (lambda: KWinners(10, 11), "k"),
        (lambda: KWinners(10, 0), "k"),
        (lambda: KWinners(0, 1), "n"),
        (lambda: SparseLinear(10, 5, sparsity=1.0), "sparsity"),
        (lambda: SparseLinear(10, 5, sparsity=-0.1), "sparsity"),
        (lambda: SparseLinear(0, 5), "in_features"),
    ],
)
def test_bad_settings_name_the_setting(make, setting):
    with pytest.raises(ValueError, match=setting):
        make()
