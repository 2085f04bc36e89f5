"""Dendritic segments: per-unit sets of sparse weight vectors over a context.

Two forms of one idea:
- `DendriticSegments`: dense weights under a fixed sparse mask, for a context vector of
  moderate width (active dendrites, Iyer et al. 2022): y = t * sigmoid(u_j* . c).
- `DistalSegments`: a fixed fan-in of synapses per segment, each an (index, permanence) pair
  over a wide, sparse activity (HTM's distal segments). The cost of a step grows with the
  number of synapses, not with the square of the number of cells, and learning re-targets
  synapses to recently active cells (`grow`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from predictive.sparse import check_positive, random_mask


def select_segment(responses: torch.Tensor) -> torch.Tensor:
    """The response of each unit's strongest segment by absolute value.

    responses: (B, N, S) -> (B, N)
    """
    j = responses.abs().argmax(dim=-1, keepdim=True)
    return responses.gather(-1, j).squeeze(-1)


def dendritic_gate(t: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Active-dendrites gate: t * sigmoid(u_j* . c), j* = argmax_j |u_j . c|.

    t: (B, N) feedforward values, responses: (B, N, S) -> (B, N)
    """
    return t * torch.sigmoid(select_segment(responses))


class DendriticSegments(nn.Module):
    """N units x S segments, each a sparse weight vector over a context of `context_size`."""

    def __init__(self, num_units: int, num_segments: int, context_size: int, sparsity: float = 0.5):
        super().__init__()
        check_positive(num_units=num_units, num_segments=num_segments, context_size=context_size)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.num_units, self.num_segments, self.context_size = num_units, num_segments, context_size
        self.sparsity = sparsity
        self.weight = nn.Parameter(torch.empty(num_units, num_segments, context_size))
        mask = random_mask(num_units * num_segments, context_size, sparsity)
        self.register_buffer("mask", mask.view_as(self.weight))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / max(1.0, (1.0 - self.sparsity) * self.context_size) ** 0.5
        with torch.no_grad():
            self.weight.uniform_(-bound, bound).mul_(self.mask)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        # context: (B, context_size) -> responses (B, N, S)
        if context.shape[-1] != self.context_size:
            raise ValueError(f"context has width {context.shape[-1]}, expected context_size={self.context_size}")
        return torch.einsum("bc,nsc->bns", context, self.weight * self.mask)

    def extra_repr(self) -> str:
        return (
            f"num_units={self.num_units}, num_segments={self.num_segments}, "
            f"context_size={self.context_size}, sparsity={self.sparsity}"
        )


def segment_overlap(activity: torch.Tensor, presynaptic: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted overlaps of every segment with an activity vector, for W weightings at once.

    activity: (B, cells); presynaptic: (G, F) cell indices; weights: (W, G, F) -> (W, B, G).
    Cost is B * G * F whichever way; for a few streams a gather (shared by the W weightings)
    is fastest, for many embedding_bag, which sums without a (B, G, F) intermediate.
    """
    b, (g, f) = activity.shape[0], presynaptic.shape
    if b <= 4:
        gathered = activity.index_select(1, presynaptic.reshape(-1)).view(1, b, g, f)
        return (gathered * weights.unsqueeze(1)).sum(-1)
    table = activity.t().contiguous()  # (cells, B): one "embedding" row per presynaptic cell
    return torch.stack(
        [F.embedding_bag(presynaptic, table, per_sample_weights=w, mode="sum").t() for w in weights]
    )


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value `hard`, gradient of `soft`."""
    if not soft.requires_grad:  # nothing to carry (local mode, evaluation): skip two ops
        return hard
    return hard + (soft - soft.detach())


class DistalSegments(nn.Module):
    """S segments on each of N cells; each segment has `synapses` (index, permanence) slots.

    A synapse is *connected* when its permanence is at least `connected_permanence`, and
    *potential* when its permanence is above zero (an empty slot has permanence 0).
    """

    def __init__(
        self,
        num_cells: int,
        num_segments: int,
        synapses: int,
        presynaptic_cells: int | None = None,
        connected_permanence: float = 0.5,
    ):
        super().__init__()
        check_positive(num_cells=num_cells, num_segments=num_segments, synapses=synapses)
        if not 0.0 < connected_permanence < 1.0:
            raise ValueError(f"connected_permanence must be in (0, 1), got {connected_permanence}")
        self.num_cells, self.num_segments, self.synapses = num_cells, num_segments, synapses
        self.presynaptic_cells = presynaptic_cells or num_cells
        self.connected_permanence = connected_permanence
        g = num_cells * num_segments
        self.permanence = nn.Parameter(torch.zeros(g, synapses))
        self.register_buffer("presynaptic", torch.zeros(g, synapses, dtype=torch.long))
        # Step at which each segment last learned (-1: never used, all permanences 0); picks slots for
        # new segments.
        self.register_buffer("last_learned", torch.full((g,), -1, dtype=torch.long))
        self._masks, self._masks_version = None, -1  # cache of synapse_masks()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Empty segments: all permanences 0, synapse slots pointing at random cells."""
        with torch.no_grad():
            self.permanence.zero_()
            self.presynaptic.random_(0, self.presynaptic_cells)
            self.last_learned.fill_(-1)

    @torch.no_grad()
    def randomize(self) -> None:
        """Random permanences in [0, 1) on random cells: about half the synapses connected,
        the starting point for learning by gradient (local learning starts empty and grows)."""
        self.permanence.uniform_(0.0, 1.0)
        self.presynaptic.random_(0, self.presynaptic_cells)
        self.last_learned.fill_(0)  # every segment now holds synapses

    def forward(self, activity: torch.Tensor) -> torch.Tensor:
        """Connected overlap of every segment with `activity`: the number of connected synapses
        onto active cells (weighted by activity). Differentiable in permanence and activity,
        straight-through at the connection threshold.

        activity: (B, presynaptic_cells) -> (B, N, S)
        """
        return self.overlaps(activity, potential=False)[0]

    @torch.no_grad()
    def potential_overlap(self, activity: torch.Tensor) -> torch.Tensor:
        """Number of potential synapses (permanence > 0) onto active cells: (B, N, S)."""
        return self.overlaps(activity)[1]

    def overlaps(self, activity: torch.Tensor, potential: bool = True):
        """(connected overlap, potential overlap or None), each (B, N, S). Without a gradient,
        from one gather of the activity at every synapse (the dominant cost of a step, paid once
        for both); with one, the gradient reaches the connected overlap alone, and the potential
        one is a second pass outside the graph, so that backward (most of a gradient step's
        time) skips it."""
        p, presynaptic, masks = self.permanence, self.presynaptic, self.synapse_masks()
        shape = self.shape(activity)
        if not (torch.is_grad_enabled() and (p.requires_grad or activity.requires_grad)):
            overlap = segment_overlap(activity, presynaptic, masks[: 2 if potential else 1])
            return overlap[0].view(shape), overlap[1].view(shape) if potential else None
        weights = straight_through(masks[0], p).unsqueeze(0)
        presynaptic_now = presynaptic.clone()  # saved for backward; growth may re-target it in place
        connected = segment_overlap(activity, presynaptic_now, weights)[0].view(shape)
        if not potential:
            return connected, None
        with torch.no_grad():
            return connected, segment_overlap(activity, presynaptic, masks[1:2])[0].view(shape)

    @torch.no_grad()
    def synapse_masks(self, rows: torch.Tensor | None = None, since: int | None = None) -> torch.Tensor:
        """(2, G, F) float: connected and potential synapses. Cached, because recomputing them
        from every permanence costs more than the overlap itself; any in-place change of the
        permanences (optimizer, load_state_dict) bumps their version and invalidates the cache.
        A learning rule that changed only the segments `rows`, starting from permanence
        version `since`, passes both, and only those rows are recomputed."""
        p = self.permanence
        stale = self._masks is None or self._masks.device != p.device or self._masks.dtype != p.dtype
        if stale or self._masks_version != (p._version if rows is None else since):
            self._masks = torch.stack([p >= self.connected_permanence, p > 0]).to(p.dtype)
        elif rows is not None:
            self._masks[:, rows] = torch.stack([p[rows] >= self.connected_permanence, p[rows] > 0]).to(p.dtype)
        self._masks_version = p._version
        return self._masks

    def synapse_masks_changed(self) -> None:
        """Permanences were written without torch seeing it (through numpy, predictive.fused):
        drop the cached masks."""
        self._masks = None

    def shape(self, activity: torch.Tensor) -> tuple[int, int, int]:
        return (activity.shape[0], self.num_cells, self.num_segments)

    def extra_repr(self) -> str:
        return (
            f"num_cells={self.num_cells}, num_segments={self.num_segments}, synapses={self.synapses}, "
            f"connected_permanence={self.connected_permanence}"
        )
