"""Sparse binary encoders for discrete symbols and scalars (HTM-style SDRs).

Each encoder maps integer or float tensors of any shape (..., ) to float tensors (..., size)
with exactly `active` ones per item. Codes are fixed (no parameters): a model learns on top of
them, and the same seed always gives the same codes. Code tables are non-persistent buffers,
rebuilt from the seed, so checkpoints stay small.
"""

import torch
from torch import nn


def _check_sizes(size: int, active: int, name: str):
    if size < 1:
        raise ValueError(f"{name}: size must be >= 1, got {size}")
    if not 1 <= active <= size:
        raise ValueError(f"{name}: active must be in [1, size={size}], got {active}")


def _scatter_ones(indices: torch.Tensor, size: int) -> torch.Tensor:
    """(..., w) bit indices -> (..., size) float 0/1."""
    out = torch.zeros(*indices.shape[:-1], size, device=indices.device)
    return out.scatter_(-1, indices, 1.0)


class SymbolEncoder(nn.Module):
    """A fixed random code per symbol: `active` of `size` bits on (default 41/2048, as HTM's
    SDRCategoryEncoder), drawn independently per symbol, so two symbols share about
    active^2/size bits (under 1 here) and their codes are nearly orthogonal."""

    def __init__(self, num_symbols: int, size: int = 2048, active: int = 41, seed: int = 0):
        super().__init__()
        if num_symbols < 1:
            raise ValueError(f"SymbolEncoder: num_symbols must be >= 1, got {num_symbols}")
        _check_sizes(size, active, "SymbolEncoder")
        self.num_symbols, self.size, self.active = num_symbols, size, active
        g = torch.Generator().manual_seed(seed)
        bits = torch.rand(num_symbols, size, generator=g).topk(active, dim=1).indices
        self.register_buffer("bits", bits.sort(dim=1).values, persistent=False)

    def codes(self, symbols: torch.Tensor | None = None) -> torch.Tensor:
        """Dense codes (n, size) of `symbols` (default: all)."""
        bits = self.bits if symbols is None else self.bits[symbols]
        return _scatter_ones(bits, self.size)

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        if symbols.dtype.is_floating_point:
            raise TypeError(f"SymbolEncoder expects integer symbols, got {symbols.dtype}")
        if symbols.numel() and (symbols.min() < 0 or symbols.max() >= self.num_symbols):
            raise ValueError(
                f"SymbolEncoder: symbols must be in [0, {self.num_symbols}), "
                f"got [{int(symbols.min())}, {int(symbols.max())}]"
            )
        return _scatter_ones(self.bits[symbols], self.size)


class ScalarEncoder(nn.Module):
    """A block of `active` contiguous bits whose position follows the value (HTM's
    ScalarEncoder): values closer than one block width share bits in proportion to their
    distance, so similar values get similar codes. Values outside [minimum, maximum] are
    clipped. With `periodic=True` the block wraps around and `maximum` equals `minimum`
    (time of day: 0 and 24 h are the same point)."""

    def __init__(self, minimum: float, maximum: float, size: int = 400, active: int = 21, periodic: bool = False):
        super().__init__()
        _check_sizes(size, active, "ScalarEncoder")
        if not maximum > minimum:
            raise ValueError(f"ScalarEncoder: maximum ({maximum}) must be > minimum ({minimum})")
        self.minimum, self.maximum = float(minimum), float(maximum)
        self.size, self.active, self.periodic = size, active, periodic
        # Number of distinct block positions: all `size` around a ring, else size-active+1.
        self.positions = size if periodic else size - active + 1
        self.register_buffer("offsets", torch.arange(active), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(values).all():
            raise ValueError("ScalarEncoder: values contain NaN or inf")
        unit = (values.double() - self.minimum) / (self.maximum - self.minimum)
        if self.periodic:
            start = torch.floor(torch.remainder(unit, 1.0) * self.positions).long() % self.positions
            bits = (start.unsqueeze(-1) + self.offsets) % self.size
        else:
            start = torch.round(unit.clamp(0.0, 1.0) * (self.positions - 1)).long()
            bits = start.unsqueeze(-1) + self.offsets
        return _scatter_ones(bits, self.size)


def time_of_day_encoder(size: int = 240, active: int = 21) -> ScalarEncoder:
    """Minutes since midnight on a ring of 24 h (about 2.6 h per block at the defaults, as
    HTM's taxi model's 9.5 h radius would be too coarse for 30-minute records)."""
    return ScalarEncoder(0.0, 24 * 60.0, size=size, active=active, periodic=True)


def day_of_week_encoder(size: int = 7 * 21, active: int = 21) -> ScalarEncoder:
    """Day 0-6 on a ring, one disjoint block per day at the defaults (weekday vs weekend is
    what matters for taxi demand; neighbouring days need not share bits)."""
    return ScalarEncoder(0.0, 7.0, size=size, active=active, periodic=True)
