"""Sparse activations and sparse weights.

`KWinners` keeps the k strongest units per sample (k-winners-take-all) with homeostatic
boosting, as in nupic.torch; `SparseLinear` is a linear map with a fixed random mask of zeros.
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


def resolve_count(k: int | float, n: int, name: str = "k") -> int:
    """A count given as an int, or as a fraction of `n` in (0, 1]; checked against `n`."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{name} must be a count or a fraction, got {k!r}")
    if isinstance(k, float) and k <= 1.0:
        if not 0.0 < k:
            raise ValueError(f"{name} must be > 0, got {k}")
        k = max(1, round(k * n))
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"{name}={k} must be between 1 and the number of units ({n})")
    return k


def check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_flags(**flags) -> None:
    """On/off settings must be true or false (a string such as "no" would read as true)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")


def boost_factors(duty_cycle: torch.Tensor, density: float, strength: torch.Tensor) -> torch.Tensor:
    """exp((target density - duty cycle) * strength): rarely active units get a higher factor."""
    return torch.exp((density - duty_cycle) * strength)


def kwinners_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask of the `k` largest entries along `dim`: exactly k; of entries equal to the
    k-th largest, the first ones (topk picks any of them, and not the same on every device,
    while the compiled local step, predictive.fused, takes the first)."""
    idx = scores.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, idx, True)


def kwinners(
    x: torch.Tensor, k: int, boost: torch.Tensor | None = None, dim: int = -1
) -> torch.Tensor:
    """Keep the k winners of `x` along `dim` (chosen on x * boost), zero the rest.

    Boosting only changes who wins, never the values passed on; losers get zero gradient.
    """
    scores = x if boost is None else x.detach() * boost
    return x * kwinners_mask(scores, k, dim)


class KWinners(nn.Module):
    """k-winners-take-all over the last dimension, with homeostatic boosting.

    Args:
        n: number of units.
        k: winners per sample, a count or a fraction of n.
        k_inference_factor: k is multiplied by this in eval mode (nupic.torch uses 1.5).
        boost_strength: how strongly rarely used units are favoured (0 disables boosting).
        boost_strength_factor: boost_strength is multiplied by this after every training batch.
        duty_cycle_period: horizon (in samples) of the running duty cycle.
    """

    def __init__(
        self,
        n: int,
        k: int | float,
        k_inference_factor: float = 1.0,
        boost_strength: float = 1.0,
        boost_strength_factor: float = 1.0,
        duty_cycle_period: int = 1000,
    ):
        super().__init__()
        check_positive(n=n, duty_cycle_period=duty_cycle_period)
        if boost_strength < 0:
            raise ValueError(f"boost_strength must be >= 0, got {boost_strength}")
        if k_inference_factor < 1.0:
            raise ValueError(f"k_inference_factor must be >= 1, got {k_inference_factor}")
        if not 0.0 < boost_strength_factor <= 1.0:
            raise ValueError(f"boost_strength_factor must be in (0, 1], got {boost_strength_factor}")
        self.n = n
        self.k = resolve_count(k, n)
        self.k_inference = min(n, math.ceil(self.k * k_inference_factor))
        self.boost_strength_factor = boost_strength_factor
        self.duty_cycle_period = duty_cycle_period
        self.register_buffer("boost_strength", torch.tensor(float(boost_strength)))
        self.register_buffer("duty_cycle", torch.zeros(n))
        self.register_buffer("learning_iterations", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        self.duty_cycle.zero_()
        self.learning_iterations.zero_()

    @property
    def density(self) -> float:
        return self.k / self.n

    def winners(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean winner mask for x (..., n); updates duty cycles in training mode."""
        k = self.k if self.training else self.k_inference
        scores = x.detach() * boost_factors(self.duty_cycle, self.density, self.boost_strength)
        mask = kwinners_mask(scores, k)
        if self.training:
            self.update_duty_cycle(mask)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., n) -> (..., n) with k non-zeros per sample
        return x * self.winners(x)

    @torch.no_grad()
    def update_duty_cycle(self, mask: torch.Tensor) -> None:
        active = mask.reshape(-1, self.n).float()
        batch = active.shape[0]
        self.learning_iterations += batch
        period = self.learning_iterations.clamp(max=self.duty_cycle_period)  # no host sync
        self.duty_cycle.mul_(period - batch).add_(active.sum(0)).div_(period)
        self.boost_strength.mul_(self.boost_strength_factor)

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, k={self.k}, k_inference={self.k_inference}, "
            f"boost_strength={float(self.boost_strength):.3g}"
        )


class KWinnersLocal(KWinners):
    """k-WTA per location: x (B, C, *locations) keeps k of C channels at every location.

    For time-frequency maps or images: each location has its own winners, while duty
    cycles and boosting are shared per channel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, *locations) -> same shape
        moved = x.movedim(1, -1)
        return (moved * self.winners(moved)).movedim(-1, 1)


class FixedMask(nn.Module):
    """Parametrization that multiplies a weight by a fixed 0/1 mask (a buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def random_mask(out_features: int, in_features: int, sparsity: float, generator=None) -> torch.Tensor:
    """A 0/1 mask with exactly round(sparsity * in_features) zeros in every row."""
    zeros = round(sparsity * in_features)
    order = torch.rand(out_features, in_features, generator=generator).argsort(dim=1)
    return (order >= zeros).float()


def mask_weights(module: nn.Module, sparsity: float) -> None:
    """Give `module.weight` (out, ...) a fixed random mask with round(sparsity x fan-in) zeros
    per output unit, as a parametrization: no optimizer step can make a masked weight non-zero."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    weight = module.weight
    mask = random_mask(weight.shape[0], weight[0].numel(), sparsity).view_as(weight)
    parametrize.register_parametrization(module, "weight", FixedMask(mask))


class SparseLinear(nn.Linear):
    """nn.Linear whose weight has a fixed fraction of zeros per output unit.

    The mask is a parametrization, so `self.weight` is always masked: an optimizer step on
    the underlying parameter can never make a masked weight non-zero.
    """

    def __init__(self, in_features: int, out_features: int, sparsity: float = 0.5, bias: bool = True):
        check_positive(in_features=in_features, out_features=out_features)
        self.sparsity = sparsity
        super().__init__(in_features, out_features, bias=bias)
        mask_weights(self, sparsity)
        self._columns, self._columns_key = None, None  # the masked weight (in, out), while unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        if torch.is_grad_enabled() and self.dense_weight.requires_grad:
            return super().forward(x)  # nn.Linear's, through the mask's parametrization
        out = x @ self.masked_columns()
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def masked_columns(self) -> torch.Tensor:
        """The masked weight transposed, (in, out) and contiguous, computed once while neither
        the stored weights nor the mask change (their version counters): a local layer scores
        every chunk with it, and a product with the contiguous transpose is the faster one."""
        key = (self.dense_weight._version, self.mask._version, self.dense_weight.device, self.dense_weight.dtype)
        if key != self._columns_key:
            self._columns, self._columns_key = self.weight.t().contiguous(), key
        return self._columns

    @property
    def mask(self) -> torch.Tensor:
        return self.parametrizations.weight[0].mask

    @property
    def dense_weight(self) -> nn.Parameter:
        """The stored (out, in) weights, before the mask: what a local rule moves (the mask
        keeps masked weights at zero in `weight` whatever it does)."""
        return self.parametrizations.weight.original

    def reset_parameters(self) -> None:
        if not parametrize.is_parametrized(self, "weight"):  # inside nn.Linear.__init__
            return super().reset_parameters()
        with torch.no_grad():
            weight = self.dense_weight
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            weight.mul_(self.mask)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sparsity={self.sparsity}"
