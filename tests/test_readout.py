"""Readouts that learn by counting: what they learn of one class stays when others come."""

import pytest
import torch

from predictive.readout import ClassMeans, LinearDiscriminant


def test_class_means_learn_each_class_apart():
    readout = ClassMeans(3, 4)
    x = torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]])
    readout.learn(x[:3], torch.tensor([0, 0, 1]))
    assert torch.allclose(readout.prototypes[:2], torch.eye(3)[:2]) and readout.counts.tolist() == [2, 1, 0, 0]
    scores = readout(torch.tensor([[0.0, 1.0, 1.0]]))
    assert scores.argmax().item() == 1 and scores[0, 2] == scores[0, 3] == -readout.sharpness  # unseen: lowest
    kept = readout.sums[:2].clone()
    readout.learn(x[3:], torch.tensor([2]))  # a new class moves no old prototype
    assert torch.equal(readout.sums[:2], kept) and readout(x[3:]).argmax().item() == 2
    # The mean, not the last examples: 10 examples of a drifted class 0 leave one share of the old.
    readout.learn(torch.tensor([[1.0, 1.0, 0]]).expand(10, 3), torch.zeros(10, dtype=torch.long))
    assert readout(torch.tensor([[1.0, 0.2, 0]])).argmax().item() == 0


def shared_noise(n: int, label: int, generator) -> torch.Tensor:
    """Class `label` is x0 - x1 = label; both coordinates carry the same large noise."""
    noise = 10 * torch.randn(n, 1, generator=generator)
    return torch.cat([noise + label, noise], 1) + 0.05 * torch.randn(n, 2, generator=generator)


def test_the_discriminant_weighs_features_by_the_shared_covariance_and_forgets_nothing():
    g = torch.Generator().manual_seed(0)
    train = [(shared_noise(200, c, g), torch.full((200,), c)) for c in (0, 1)]
    test = torch.cat([shared_noise(100, c, g) for c in (0, 1)])
    truth = torch.arange(2).repeat_interleave(100)
    lda, means = LinearDiscriminant(2, 3, shrinkage=1e-3), ClassMeans(2, 3)  # 2 features: no need to shrink
    lda.eval()
    for x, y in train:
        lda.learn(x, y)
        means.learn(x, y)
    assert (lda(test).argmax(-1) == truth).float().mean() > 0.97  # the noise direction is discounted
    assert (means(test).argmax(-1) == truth).float().mean() < 0.8  # the means alone cannot
    assert (lda(test).argmax(-1) != 2).all()  # a class with no example is never the answer
    # Sums of every example: learnt in any order or batching, the same solution. In float64: float32
    # sums round by order, and this covariance (noise 10 against a difference of 0.05) magnifies it.
    one, again = (LinearDiscriminant(2, 3, shrinkage=1e-3).double().eval() for _ in range(2))
    for x, y in train:
        one.learn(x.double(), y)
    again.learn(torch.cat([train[1][0], train[0][0]]).double(), torch.cat([train[1][1], train[0][1]]))
    assert torch.allclose(again(test.double()), one(test.double()), rtol=0, atol=1e-9)


def test_the_discriminant_solves_again_in_eval_at_once_and_in_training_every_refresh_steps():
    g = torch.Generator().manual_seed(1)
    lda = LinearDiscriminant(2, 2, shrinkage=1e-3, refresh=3)
    x0, x1 = shared_noise(50, 0, g), shared_noise(50, 1, g)
    lda.learn(x0, torch.zeros(50, dtype=torch.long))
    lda(x0)
    first = lda._solution
    for step in range(3):  # training mode: solved again at the third learn since the last solve
        lda.learn(x1[step:step + 1], torch.ones(1, dtype=torch.long))
        lda(x1)
        assert (lda._solution is first) == (step < 2)
    lda.learn(x1, torch.ones(50, dtype=torch.long))
    lda.eval()
    assert (lda(x1).argmax(-1) == 1).float().mean() > 0.9  # eval: solved at once
    solved = lda._solution
    lda(x0)
    assert lda._solution is solved  # nothing learnt since: not solved again


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="shrinkage"):
        LinearDiscriminant(4, 2, shrinkage=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassMeans(4, 1)
