import pytest
import torch

from predictive.dendrites import DendriticSegments, DistalSegments, dendritic_gate, select_segment


def test_selected_segment_is_the_absolute_max():
    r = torch.tensor([[[0.2, -0.9, 0.5], [0.1, 0.3, -0.2]]])
    assert torch.allclose(select_segment(r), torch.tensor([[-0.9, 0.3]]))


def test_active_dendrites_gate_formula():
    torch.manual_seed(0)
    seg = DendriticSegments(num_units=6, num_segments=3, context_size=10, sparsity=0.5)
    c, t = torch.randn(4, 10), torch.randn(4, 6)
    r = seg(c)
    assert r.shape == (4, 6, 3)
    u = seg.weight * seg.mask
    manual = torch.einsum("bc,nsc->bns", c, u)
    j = manual.abs().argmax(-1, keepdim=True)
    expected = t * torch.sigmoid(manual.gather(-1, j).squeeze(-1))
    assert torch.allclose(dendritic_gate(t, r), expected, atol=1e-6)
    assert ((seg.weight * seg.mask) == 0).float().mean() == pytest.approx(0.5, abs=0.02)


def test_distal_overlaps_count_connected_and_potential_synapses():
    seg = DistalSegments(num_cells=4, num_segments=1, synapses=3)
    with torch.no_grad():
        seg.presynaptic.copy_(torch.tensor([[0, 1, 2], [1, 2, 3], [0, 0, 0], [3, 3, 3]]))
        seg.permanence.copy_(torch.tensor([[0.6, 0.6, 0.2], [0.9, 0.0, 0.5], [0.0, 0.0, 0.0], [0.4, 0.5, 0.7]]))
    for batch in (1, 8):  # both code paths (gather and embedding_bag)
        activity = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(batch, 4)
        active, potential = seg(activity), seg.potential_overlap(activity)
        assert active[0, :, 0].tolist() == [2.0, 1.0, 0.0, 0.0]
        assert potential[0, :, 0].tolist() == [3.0, 1.0, 0.0, 0.0]


def test_cached_synapse_masks_follow_every_change_of_the_permanences():
    torch.manual_seed(0)
    seg = DistalSegments(num_cells=16, num_segments=2, synapses=6)
    activity = (torch.rand(1, 16) > 0.5).float()

    def fresh():  # what the overlaps must be, computed without any cache
        p = seg.permanence.detach()
        gathered = activity[0, seg.presynaptic]
        return (gathered * (p >= 0.5)).sum(-1), (gathered * (p > 0)).sum(-1)

    with torch.no_grad():
        seg.permanence.uniform_(0.0, 1.0)  # in place: a new version, the cache is rebuilt
        for _ in range(2):
            active, potential = seg.overlaps(activity)
            assert torch.equal(active.flatten(), fresh()[0]) and torch.equal(potential.flatten(), fresh()[1])
            opt = torch.optim.SGD([seg.permanence], lr=1.0)
            seg.permanence.grad = torch.full_like(seg.permanence, 0.3)
            opt.step()  # an optimizer step invalidates it too
        # A learning rule that changed some rows refreshes only those.
        version, rows = seg.permanence._version, torch.tensor([0, 5])
        seg.permanence[rows] = 0.55
        seg.synapse_masks(rows, since=version)
        assert torch.equal(seg.overlaps(activity)[0].flatten(), fresh()[0])


@pytest.mark.parametrize("batch", [2, 8])  # both code paths (gather and embedding_bag)
def test_distal_overlap_is_differentiable_in_permanence_and_activity(batch):
    torch.manual_seed(0)
    seg = DistalSegments(num_cells=5, num_segments=2, synapses=4)
    with torch.no_grad():
        seg.permanence.uniform_(0.3, 0.8)
    a = torch.rand(batch, 5, requires_grad=True)
    weight = torch.rand(batch, 5, 2)

    def gradients(potential):
        seg.permanence.grad, a.grad = None, None
        active, pot = seg.overlaps(a, potential=potential)
        (active * weight).sum().backward()
        return seg.permanence.grad, a.grad, pot

    p_grad, a_grad, _ = gradients(potential=False)
    assert p_grad.abs().sum() > 0 and a_grad.abs().sum() > 0
    # With the potential overlap beside it (the layer's step), the gradient is the same and the
    # potential overlap carries none.
    p_grad2, a_grad2, pot = gradients(potential=True)
    assert torch.equal(p_grad2, p_grad) and torch.equal(a_grad2, a_grad)
    assert not pot.requires_grad and pot.sum() > 0


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="num_segments"):
        DendriticSegments(4, 0, 8)
    with pytest.raises(ValueError, match="sparsity"):
        DendriticSegments(4, 2, 8, sparsity=1.2)
    with pytest.raises(ValueError, match="context_size"):
        DendriticSegments(4, 2, 8)(torch.randn(1, 7))
    with pytest.raises(ValueError, match="connected_permanence"):
        DistalSegments(4, 2, 8, connected_permanence=1.5)
