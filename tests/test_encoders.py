import pytest
import torch

from tasks.encoders import ScalarEncoder, SymbolEncoder, day_of_week_encoder, time_of_day_encoder


def test_symbol_codes_are_sparse_fixed_and_nearly_orthogonal():
    enc = SymbolEncoder(100, size=2048, active=41, seed=3)
    x = enc(torch.arange(100))
    assert x.shape == (100, 2048)
    assert torch.all(x.sum(1) == 41)
    overlap = x @ x.T
    off = overlap[~torch.eye(100, dtype=torch.bool)]
    # Expected overlap of two random 41/2048 codes is 41*41/2048 = 0.82 bits.
    assert off.max() <= 6 and 0.5 < off.mean() < 1.2
    assert torch.equal(SymbolEncoder(100, seed=3)(torch.tensor([7, 7])), x[[7, 7]])
    assert not torch.equal(SymbolEncoder(100, seed=4)(torch.tensor([7])), x[[7]])
    assert torch.equal(enc.codes(torch.tensor([1, 2])), x[1:3])


def test_symbol_encoder_batched_shape_and_bad_input():
    enc = SymbolEncoder(10, size=64, active=4)
    assert enc(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, 64)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        enc(torch.tensor([10]))
    with pytest.raises(TypeError, match="integer"):
        enc(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="active"):
        SymbolEncoder(10, size=8, active=9)


def test_scalar_encoder_blocks_overlap_by_distance_and_clip():
    enc = ScalarEncoder(0.0, 100.0, size=120, active=21)  # 100 positions: one bit per unit
    x = enc(torch.tensor([0.0, 1.0, 10.0, 50.0, 100.0, 500.0, -3.0]))
    assert torch.all(x.sum(1) == 21)
    assert torch.equal(torch.nonzero(x[0]).flatten(), torch.arange(21))
    assert (x[0] @ x[1]).item() == 20  # one unit apart: one bit moved
    assert (x[0] @ x[2]).item() == 11
    assert (x[0] @ x[3]).item() == 0
    assert torch.equal(torch.nonzero(x[4]).flatten(), torch.arange(99, 120))
    assert torch.equal(x[5], x[4]) and torch.equal(x[6], x[0])  # clipped
    with pytest.raises(ValueError, match="NaN"):
        enc(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="maximum"):
        ScalarEncoder(1.0, 1.0)


def test_periodic_encoders_wrap_around():
    tod = time_of_day_encoder(size=240, active=21)  # 6 minutes per bit
    x = tod(torch.tensor([0.0, 24 * 60.0, 23 * 60 + 54.0, 12 * 60.0]))
    assert torch.equal(x[0], x[1])  # midnight is midnight
    assert (x[0] @ x[2]).item() == 20  # 23:54 is one bit before 0:00 on the ring
    assert (x[0] @ x[3]).item() == 0
    dow = day_of_week_encoder()
    d = dow(torch.arange(7.0))
    assert torch.all(d.sum(1) == 21) and torch.all((d @ d.T) == 21 * torch.eye(7))
