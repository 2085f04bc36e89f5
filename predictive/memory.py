"""The temporal-memory layer: one recurrent, predictive, sparse layer.

Columns x cells. At step t the layer (1) takes the cells predicted at t-1 by its distal
segments, (2) picks k active columns from the input with k-WTA, (3) fires the predicted cells
of active columns, or bursts a column (all its cells) when none was predicted and picks one
winner cell to learn the new context, and (4) predicts the cells of t+1 from the activity of t
and decodes that prediction into the input space. Learning is not done here: a learning rule
(predictive.learning) is called between activation and prediction, and sees a `LayerStep`.

The forward pass is differentiable end to end for backprop through time: straight-through at
the k-WTA winners and at the segments' thresholds, soft gating where cells are selected. Its
forward values are exactly the binary HTM activity.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from predictive.dendrites import DistalSegments, straight_through
from predictive.proximal import contrastive_predictive_loss
from predictive.sparse import KWinners, SparseLinear, check_flags, check_positive, kwinners_mask, resolve_count


class LayerState(NamedTuple):
    """What a layer carries from step t to t+1, per stream (B, ...). A NamedTuple of tensors:
    `_asdict()` gives a plain dict for checkpoints (they load with weights_only=True)."""

    cells: torch.Tensor  # (B, N) activity at t
    winners: torch.Tensor  # (B, N) cells that learned the context at t
    columns: torch.Tensor  # (B, C) active columns at t
    predicted: torch.Tensor  # (B, N) cells predicted for t+1
    active_overlap: torch.Tensor  # (B, N, S) segment overlaps with `cells` (connected), for learning
    potential_overlap: torch.Tensor  # (B, N, S) ... (potential)
    context_predicted: torch.Tensor  # (B, N) cells the context alone predicts (see predict)
    diverted: torch.Tensor  # (B,) 0: none; 1: this step's winners alone stand for its context; 2: ... after a burst;
    # 3: ... the start of a context (`start_cells`)
    matching_columns: torch.Tensor  # (B, C) columns with a segment matching `cells`
    predicted_columns: torch.Tensor  # (B, C) what the decoder decodes
    prediction: torch.Tensor  # (B, D) decoded prediction of the coming input
    anomaly: torch.Tensor  # (B,) share of the active columns at t that were not predicted


def column_activity(cells: torch.Tensor, cells_per_column: int) -> torch.Tensor:
    """(..., C * M) cell activity -> (..., C): each column's strongest cell (a column is
    active, or predicted, when any of its cells is)."""
    return cells.unflatten(-1, (-1, cells_per_column)).amax(-1)


class ColumnRows(nn.Module):
    """Parametrization that stores a decoder's weight (D, C) transposed, as (C, D): each
    column's decoding in one contiguous row. The local rules read and write the rows of a
    few columns at a time, and `predictive.fused` works on them in place, where the (D, C)
    layout cost two full transposed copies per chunk. `weight` stays nn.Linear's (D, C), a view."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t()

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t().contiguous()


@dataclass
class LayerStep:
    """What one step of a layer produced, and what it saw (for learning rules)."""

    x: torch.Tensor  # (B, D) input at t
    prev: LayerState  # the layer's state at t-1
    columns: torch.Tensor  # (B, C) bool, active columns
    bursting: torch.Tensor  # (B, C) bool, active columns with no predicted cell
    novel: torch.Tensor  # (B, C) bool, active columns that learn a new context (choose_winners)
    cells: torch.Tensor  # (B, N) activity at t (0/1 forward values)
    winners: torch.Tensor  # (B, N) bool, cells that learn this context
    matched: torch.Tensor  # (B, C) bool, novel column whose winner has a matching segment
    anomaly: torch.Tensor  # (B,) share of active columns that were not predicted
    start: torch.Tensor  # (B,) bool, the step starts a context (`starts`)


def draws_by_rank(mask: torch.Tensor, slots: int, width: int = 1) -> torch.Tensor:
    """(B, K) bool -> (B, K, width) random numbers in [0, 1): `slots` rows of `width` drawn per
    stream, the i-th true entry of `mask` (in index order) takes row i. A step's draw then
    scales with what is active, not with the layer, and `predictive.fused` draws a chunk's
    numbers at once, the same ones."""
    draws = torch.rand(mask.shape[0], slots, width, device=mask.device)
    row = (mask.long().cumsum(-1) - 1).clamp(0, slots - 1)
    return draws.gather(1, row.unsqueeze(-1).expand(-1, -1, width))


class TemporalMemory(nn.Module):
    """A sparse temporal memory over an input of width `input_size`.

    Args:
        input_size: width D of the input (and of the decoded prediction).
        columns: number of columns C.
        cells: cells per column M; the layer's output has N = C * M units.
        active_columns: k, columns active per step (a count or a fraction of C).
        segments: distal segments per cell S.
        synapses: synapse slots per segment (fixed fan-in).
        activation_threshold: connected active synapses that make a segment active (predictive).
        matching_threshold: potential active synapses that make a segment *match* (best-match
            for learning in a bursting column).
        connected_permanence: permanence at which a synapse counts as connected.
        feedforward_sparsity: fraction of zero weights in each column's feedforward map.
        boost_strength: homeostatic boosting of column selection (0: off).
        predicted_bias: a column the layer predicted for this step (one of its cells is
            predicted) ranks in the k-WTA with its score raised by this many standard deviations
            of the step's column scores: the temporal context moves the column code, and so
            what a head on the columns reads. 0: off. A layer that predicts nothing (frozen at
            its initialisation) is unaffected.
        duty_cycle_period: horizon of the column duty cycles used by boosting.
        sharpness: slope of the soft threshold that carries gradients in backprop mode.
        first_order_fallback: an unpredicted column fires the cells that any cell of the last
            step's columns predicts, instead of all its cells (off by default: on the
            high-order stream with never-repeating noise it merged contexts, see docs/core.md).
        soft_kwta: 0: the k-WTA passes gradient to the winners' scores only; > 0: to every
            column's score, through a sigmoid of its distance to the k-WTA boundary with this
            temperature (in standard deviations of the scores). Forward values stay binary.
        recall: a known context's decoded prediction is what its winners' segments match
            (`predict`), and in the next step only the cells they predict fire (`activate`);
            False: the burst's union, both times. Segments that only a gradient trains are
            random and recall nothing: turn it off for layers that a gradient alone trains
            (configs/learning/backprop.yaml does).
        fresh_steps: when a known context's winners recall nothing (new cells: a split laid
            down on this pass), it recalls the links of the cells that fired which match
            without connecting and were learned within this many steps: a continuation seen
            once, lately; a link that faded after the stream changed is older. 0: off (for
            layers whose decoder a gradient trains: it learns whatever columns are decoded).
        start_cells: a step that nothing predicted at all (after noise, or a reset) starts a
            context: its bursting columns learn on their first cell, not a random one, and
            the next step goes on from those cells alone (a known context, `predict`), not
            from the burst's union. The same symbol then starts the same code on every pass,
            so what follows it learns one cell per start, apart from the contexts where
            that symbol comes in a middle, which never learn on a first cell (docs/core.md).
            False: a random least-used cell, any cell of the column.
        initial_segments: "empty" (local learning grows synapses where contexts need them) or
            "random" (random permanences on random cells: a layer trained by gradient alone
            needs them, an empty segment has no gradient to grow from).
        proximal_ahead: 0, the feedforward map has no loss of its own; n > 0, it has one
            (`proximal_loss`): its code predicts its code n steps on, through a (C, C)
            `code_predictor`. A local rule may learn by it (`Local.proximal_lr`); frozen and
            gradient rules leave it unused.
    """

    def __init__(
        self,
        input_size: int,
        columns: int = 256,
        cells: int = 16,
        active_columns: int | float = 10,
        segments: int = 4,
        synapses: int = 24,
        activation_threshold: int = 6,
        matching_threshold: int = 6,
        connected_permanence: float = 0.5,
        feedforward_sparsity: float = 0.5,
        boost_strength: float = 0.0,
        duty_cycle_period: int = 1000,
        sharpness: float = 2.0,
        first_order_fallback: bool = False,
        soft_kwta: float = 0.0,
        recall: bool = True,
        fresh_steps: int = 300,
        start_cells: bool = True,
        initial_segments: str = "empty",
        proximal_ahead: int = 0,
        predicted_bias: float = 0.0,
    ):
        super().__init__()
        check_positive(input_size=input_size, columns=columns, cells=cells, segments=segments, synapses=synapses)
        self.input_size, self.columns, self.cells_per_column = input_size, columns, cells
        self.k = resolve_count(active_columns, columns, "active_columns")
        for name, value in (("activation_threshold", activation_threshold), ("matching_threshold", matching_threshold)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= synapses:
                raise ValueError(f"{name}={value!r} must be an integer between 1 and synapses={synapses}")
        if sharpness <= 0:
            raise ValueError(f"sharpness must be > 0, got {sharpness}")
        self.activation_threshold = activation_threshold
        self.matching_threshold = matching_threshold
        self.sharpness = sharpness
        self.first_order_fallback = first_order_fallback
        if soft_kwta < 0:
            raise ValueError(f"soft_kwta must be >= 0, got {soft_kwta}")
        self.soft_kwta = soft_kwta
        check_flags(first_order_fallback=first_order_fallback, recall=recall, start_cells=start_cells)
        self.recall, self.start_cells = recall, start_cells
        if isinstance(fresh_steps, bool) or not isinstance(fresh_steps, int) or fresh_steps < 0:
            raise ValueError(f"fresh_steps must be an integer >= 0, got {fresh_steps!r}")
        self.fresh_steps = fresh_steps
        if initial_segments not in ("empty", "random"):
            raise ValueError(f"initial_segments must be 'empty' or 'random', got {initial_segments!r}")
        self.initial_segments = initial_segments
        if isinstance(proximal_ahead, bool) or not isinstance(proximal_ahead, int) or proximal_ahead < 0:
            raise ValueError(f"proximal_ahead must be an integer >= 0, got {proximal_ahead!r}")
        self.proximal_ahead = proximal_ahead
        if isinstance(predicted_bias, bool) or not isinstance(predicted_bias, (int, float)) or not predicted_bias >= 0:
            raise ValueError(f"predicted_bias must be a number >= 0, got {predicted_bias!r}")
        self.predicted_bias = float(predicted_bias)
        self.feedforward = SparseLinear(input_size, columns, sparsity=feedforward_sparsity, bias=False)
        self.kwinners = KWinners(columns, self.k, boost_strength=boost_strength, duty_cycle_period=duty_cycle_period)
        self.segments = DistalSegments(columns * cells, segments, synapses, connected_permanence=connected_permanence)
        self.decoder = nn.Linear(columns, input_size)
        parametrize.register_parametrization(self.decoder, "weight", ColumnRows())
        # Proximal learning (`proximal_loss`): the code at t predicts the code ahead through
        # this map, and the columns score the input less its mean over what the layer has seen.
        self.code_predictor = nn.Parameter(torch.empty(columns, columns)) if proximal_ahead else None
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("map_updates", torch.zeros((), dtype=torch.long))  # chunks the map learned from
        self.register_buffer("learning_steps", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    @property
    def output_size(self) -> int:
        return self.columns * self.cells_per_column

    @property
    def decoder_rows(self) -> nn.Parameter:
        """The decoder's weights as stored, (C, D): column c decodes to row c (`ColumnRows`)."""
        return self.decoder.parametrizations.weight.original

    def reset_parameters(self) -> None:
        self.feedforward.reset_parameters()
        self.kwinners.reset_parameters()
        self.segments.reset_parameters()
        with torch.no_grad():
            self.decoder_rows.zero_()  # predicts nothing until it has seen something
            self.decoder.bias.zero_()
            if self.code_predictor is not None:
                self.code_predictor.copy_(0.1 * torch.eye(self.columns))
        self.input_mean.zero_()
        self.input_steps.zero_()
        self.map_updates.zero_()
        self.learning_steps.zero_()
        if self.initial_segments == "random":
            self.segments.randomize()

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> LayerState:
        n, s, c = self.output_size, self.segments.num_segments, self.columns
        shapes = ((n,), (n,), (c,), (n,), (n, s), (n, s), (n,), (), (c,), (c,), (self.input_size,), ())
        return LayerState(*(torch.zeros(batch_size, *shape, device=device) for shape in shapes))

    def forward(
        self,
        x: torch.Tensor,
        state: LayerState,
        reset: torch.Tensor | None = None,
        learn: Callable[["TemporalMemory", LayerStep], None] | None = None,
    ) -> tuple[LayerStep, LayerState]:
        """One time step.

        x: (B, D); state: from `initial_state` or the previous step; reset: (B,) bool, clears
        those streams' state first; learn: a local rule, called after activation and before
        the prediction of t+1 is made. Returns the step and the new state.
        """
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"input has shape {tuple(x.shape)}, expected (batch, input_size={self.input_size})")
        if reset is not None:
            keep = (~reset).to(x.dtype)
            state = LayerState(*(value * keep.view(-1, *([1] * (value.dim() - 1))) for value in state))
        step = self.activate(x, state)
        if learn is not None:
            learn(self, step)
        return step, self.predict(step)

    def activate(self, x: torch.Tensor, state: LayerState) -> LayerStep:
        b, c, m = x.shape[0], self.columns, self.cells_per_column
        scores = self.column_scores(x)  # (B, C)
        columns = self.kwinners.winners(self.biased(scores, state))
        column_gate = straight_through(columns.to(x.dtype), self.column_gradient(scores, columns))
        predicted = state.predicted.view(b, c, m)
        # In a column that a known context predicts, only predicted cells that the context
        # predicts too fire, not those the rest of an earlier burst predicts (a column left
        # with none bursts): otherwise the next step predicts from every context the burst
        # held again, and the majority ending wins. Not known: context == predicted, no change.
        context = state.context_predicted.view(b, c, m)
        narrow = (state.diverted > 0).view(b, 1, 1) & (context.amax(-1, keepdim=True) > 0) & self.recall
        predicted = torch.where(narrow, predicted * context, predicted)
        column_predicted = predicted.amax(-1)
        bursting = columns & (column_predicted.detach() == 0)
        if self.first_order_fallback:
            predicted = predicted + self.fallback(state, bursting)
            column_predicted = predicted.amax(-1)
        # Predicted cells fire; an active column with no predicted cell bursts: its fallback
        # cells fire, or all its cells when there are none.
        cells = column_gate.unsqueeze(-1) * (predicted + (1.0 - column_predicted).unsqueeze(-1))
        start = self.starts(state)
        winners, matched, novel = self.choose_winners(state, columns, cells.detach() > 0, start)
        hits = (columns & ~bursting).sum(-1)
        anomaly = 1.0 - hits.to(x.dtype) / self.k
        return LayerStep(x, state, columns, bursting, novel, cells.view(b, -1), winners, matched, anomaly, start)

    def biased(self, scores: torch.Tensor, state: LayerState) -> torch.Tensor:
        """The scores (B, C) the k-WTA ranks: those of the columns predicted for this step
        raised by `predicted_bias` standard deviations of each stream's scores (computed in
        float64, as the compiled steps do, so both round to the same float32)."""
        if not self.predicted_bias:
            return scores
        predicted = column_activity(state.predicted.detach(), self.cells_per_column) > 0
        spread = scores.detach().double().std(-1, correction=0, keepdim=True).float()
        return scores.detach() + (self.predicted_bias * spread) * predicted

    def column_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., C): each column's feedforward score of the input (less its mean,
        which stays zero unless the map learns: `proximal_loss`)."""
        return self.feedforward(x - self.input_mean)

    def proximal_loss(self, x: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """The feedforward map's own loss over a chunk x (B, T, D) (`predictive.proximal`): its
        code at t predicts its code `proximal_ahead` steps on. First, without gradient, the input mean
        takes in the chunk and each column's weights go back to unit norm (the mask's zeros
        stay), so no column wins by its scale. The gradient reaches the map and
        `code_predictor` alone: x is detached."""
        if not self.proximal_ahead:
            raise ValueError("proximal_loss needs a layer built with proximal_ahead > 0")
        x = x.detach()
        with torch.no_grad():
            frames = x.reshape(-1, self.input_size)
            self.map_updates += 1
            self.input_steps += frames.shape[0]
            self.input_mean += (frames.sum(0) - frames.shape[0] * self.input_mean) / self.input_steps
            weight = self.feedforward.dense_weight
            weight.copy_(F.normalize(weight * self.feedforward.mask, dim=1))
        scores = self.column_scores(x)  # (B, T, C)
        code = scores * kwinners_mask(scores.detach(), self.k)
        return contrastive_predictive_loss(code, self.code_predictor, self.proximal_ahead, reset)

    def column_gradient(self, scores: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """What carries the gradient of the k-WTA gate (its forward value is 0/1). By default
        the winners' scores alone, so a column that lost never learns to win; with
        `soft_kwta` > 0 every column's score, through a sigmoid of its distance to the k-WTA
        boundary in units of `soft_kwta` x the scores' standard deviation."""
        if self.soft_kwta == 0 or not scores.requires_grad:
            return scores * columns
        with torch.no_grad():
            top = scores.topk(min(self.k + 1, self.columns), dim=-1).values
            boundary = top[..., -2:].mean(-1, keepdim=True)
            scale = self.soft_kwta * scores.std(-1, keepdim=True).clamp(min=1e-6)
        return torch.sigmoid((scores - boundary) / scale)

    def fallback(self, state: LayerState, bursting: torch.Tensor) -> torch.Tensor:
        """Cells of the bursting columns predicted by *any* cell of the previous step's columns.

        A specific context the layer has not learned yet (a symbol first seen after some noise
        element) predicts nothing; the same symbol in any of its known contexts does. Firing
        those cells keeps the first-order link, instead of a burst that would predict the union
        of every sequence passing through this column. The column still counts as anomalous.
        """
        b, c, m = bursting.shape[0], self.columns, self.cells_per_column
        context = state.columns.repeat_interleave(m, dim=1)  # every cell of the last columns
        predicted = self.soft_threshold(self.segments(context).amax(-1)).view(b, c, m)
        return predicted * bursting.unsqueeze(-1)

    @torch.no_grad()
    def choose_winners(self, state: LayerState, columns: torch.Tensor, cells: torch.Tensor, start: torch.Tensor):
        """The cells that learn this context: in an active column, the cells the context
        predicted; in a *novel* column, one that the context did not predict, one winner: the
        cell with the best matching segment, else the least used cell (random tie-break), so
        that a new context gets a new cell, or at the start of a context its first cell
        (`starts`). Novel columns are the bursting ones, and those predicted only through the
        cells that fired in a burst beside its winner (`predict`).
        Returns (winners (B, N), matched (B, C), novel (B, C))."""
        b, c, m = columns.shape[0], self.columns, self.cells_per_column
        context = state.context_predicted.view(b, c, m) > 0
        predicted = cells.view(b, c, m) & context & columns.unsqueeze(-1)
        novel = columns & ~predicted.any(-1)

        best = state.potential_overlap.amax(-1).view(b, c, m)
        best_value, best_cell = best.max(-1)
        matched = novel & (best_value >= self.matching_threshold)
        used = (self.segments.last_learned >= 0).view(c, m, -1).sum(-1).to(best.dtype)
        if self.start_cells and m > 1:  # a start's cell carries no other context
            used[:, 0] = torch.inf
        tie_break = draws_by_rank(columns, self.max_active, m)  # (B, C, M)
        least_used = (used.unsqueeze(0) + tie_break).argmin(-1)
        chosen = torch.where(matched, best_cell, torch.where(start.unsqueeze(-1), 0, least_used))
        new_winner = (chosen.unsqueeze(-1) == torch.arange(m, device=chosen.device)) & novel.unsqueeze(-1)
        return (predicted | new_winner).view(b, -1), matched, novel

    @property
    def max_active(self) -> int:
        """The most columns active in a step (k, or k in eval mode if larger)."""
        return max(self.k, self.kwinners.k_inference)

    def starts(self, state: LayerState) -> torch.Tensor:
        """(B,) bool: does the step after `state` start a context (`start_cells`)? Nothing was
        predicted for it, after a step that was mostly not predicted either (most columns
        burst: noise, which may hit a predicted column by chance), or no step (a reset). Not
        after a predicted step whose cells predict nothing yet (a context learned on new cells
        last pass), nor after a start itself: early in a stream, a symbol that predicts
        nothing yet would start a chain of first cells."""
        unpredicted = (state.anomaly > 0.5) | (state.columns.amax(-1) == 0)
        return (state.predicted.amax(-1) == 0) & unpredicted & (state.diverted != 3) & self.start_cells

    def predict(self, step: LayerStep) -> LayerState:
        """Cells predicted for t+1 from the activity at t, and their decoding into input space."""
        active, potential = self.segments.overlaps(step.cells)
        # After a column burst into a context it has seen (its winner matched), the winner
        # stands for that context; the rest of the burst is the union of every context the
        # column knows. A column the burst predicts through those other cells alone is then
        # novel: it learns the context on a new cell, this very step, instead of waiting until
        # the burst column is predicted and the split reaches it one step per pass. The
        # context stays *diverted* while columns keep firing old cells but learn on new
        # winners: the new winners alone carry it on, so a split runs down a whole shared
        # middle in one pass instead of one element per pass. It also runs on through a
        # column that bursts although one of its segments matched the cells of t-1
        # (`matching_columns`: a transition seen before, not connected yet), but not through
        # two such bursts in a row (with four endings per context that spread contexts over
        # new cells); a burst that nothing matched (noise) ends it. A step that nothing
        # predicted starts a known context on its columns' first cells (`start_cells`).
        predicted = self.soft_threshold(active.amax(-1))
        context = predicted.detach()
        diverted = step.prev.diverted > 0
        carried = step.matched.any(-1) | (diverted & (step.novel & ~step.bursting).any(-1))
        relearning = step.bursting & (step.prev.matching_columns > 0) & (step.prev.diverted == 1).unsqueeze(-1)
        through_burst = diverted & ~carried & relearning.any(-1)
        known = carried | through_burst | step.start
        matching_columns = column_activity(potential.amax(-1) >= self.matching_threshold, self.cells_per_column)
        predicted_columns = column_activity(predicted, self.cells_per_column)
        # Computed for every stream, known context or not, and selected by `known`: the step
        # never reads a tensor value on the host (no sync on a GPU), whatever the data.
        with torch.no_grad():
            winner_active, winner_potential = self.segments.overlaps(step.winners.to(step.cells.dtype))
        by_winners = (winner_active.amax(-1) >= self.activation_threshold).to(context.dtype)
        fired_potential = potential
        context = torch.where(known.unsqueeze(-1), by_winners, context)
        potential = torch.where(known.view(-1, 1, 1), winner_potential, potential)
        if self.recall:
            # A known context *recalls* what followed it: the decoded prediction is the columns
            # its winners' segments match (connected or not) rather than the burst's union, so a
            # context seen once is predicted right when it comes again, a pass before its links
            # connect; winners that recall nothing yet recall the fired cells' fresh links
            # (`seen_once`). Forward values only: the gradient is the union's.
            matching = (winner_potential.amax(-1) >= self.matching_threshold).to(context.dtype)
            recalled_columns = column_activity(torch.maximum(matching, by_winners), self.cells_per_column)
            recalled = known & (recalled_columns > 0).any(-1)
            once_columns = self.seen_once(fired_potential, predicted.detach())
            once_only = known & ~recalled & (once_columns > 0).any(-1)
            recalled_columns = torch.where(once_only.unsqueeze(-1), once_columns, recalled_columns)
            recalled = (recalled | once_only).unsqueeze(-1)
            predicted_columns = torch.where(recalled, straight_through(recalled_columns, predicted_columns),
                                            predicted_columns)
        return LayerState(
            cells=step.cells,
            winners=step.winners.to(step.cells.dtype),
            columns=step.columns.to(step.cells.dtype),
            predicted=predicted,
            active_overlap=active.detach(),
            potential_overlap=potential,
            context_predicted=context,
            diverted=torch.where(step.start, 3.0, known.to(step.cells.dtype) + through_burst.to(step.cells.dtype)),
            matching_columns=matching_columns.to(step.cells.dtype),
            predicted_columns=predicted_columns,
            prediction=self.decode(predicted_columns),
            anomaly=step.anomaly.detach(),
        )

    def seen_once(self, potential: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """(B, C) columns of the cells that `potential` (B, N, S) matches, that are not
        `predicted` (B, N), through a segment learned within `fresh_steps` steps.

        Winners that recall nothing are new cells (a split laid down on this pass). A context
        that first ran along another one's cells learned its continuation there, seen once,
        while their connected links are the other context's: a known context recalls that."""
        if self.fresh_steps == 0:
            return predicted.new_zeros(predicted.shape[0], self.columns)
        fresh = self.segments.last_learned.view(1, self.output_size, -1) >= self.learning_steps - self.fresh_steps
        once = ((potential >= self.matching_threshold) & fresh).any(-1) & (predicted == 0)
        return column_activity(once.to(predicted.dtype), self.cells_per_column)

    def decode(self, predicted_columns: torch.Tensor) -> torch.Tensor:
        """The predicted columns (B, C) decoded into input space (B, D): nn.Linear's product
        on the stored rows (`ColumnRows`), without building the transposed weight."""
        return torch.addmm(self.decoder.bias, predicted_columns, self.decoder_rows)

    def soft_threshold(self, overlap: torch.Tensor) -> torch.Tensor:
        """1 where overlap >= activation_threshold (forward), sigmoid slope for the gradient."""
        hard = (overlap >= self.activation_threshold).to(overlap.dtype)
        if not overlap.requires_grad:
            return hard  # skip the sigmoid
        soft = torch.sigmoid((overlap - self.activation_threshold + 0.5) * self.sharpness)
        return straight_through(hard, soft)

    def local_loss(self, step: LayerStep) -> torch.Tensor:
        """This layer's own next-input prediction error, confined to the layer.

        The previous activity and the input are detached, so the gradient reaches only this
        layer's segments and decoder, and goes one step back in time at most: the segments
        learn to predict the winners of t from the cells of t-1, the decoder to turn that
        prediction into x[t].
        """
        b = step.x.shape[0]
        active = self.segments(step.prev.cells.detach())
        p = torch.sigmoid((active.amax(-1) - self.activation_threshold + 0.5) * self.sharpness)
        target = step.winners.to(p.dtype)
        segment_loss = F.binary_cross_entropy(p, target, reduction="sum") / (b * self.k)
        predicted_columns = p.view(b, self.columns, -1).amax(-1)
        decoder_loss = F.mse_loss(self.decode(predicted_columns), step.x.detach())
        return segment_loss + decoder_loss

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, columns={self.columns}, cells={self.cells_per_column}, "
            f"active_columns={self.k}, activation_threshold={self.activation_threshold}, "
            f"matching_threshold={self.matching_threshold}, recall={self.recall}, fresh_steps={self.fresh_steps}, "
            f"start_cells={self.start_cells}, "
            f"initial_segments={self.initial_segments!r}, proximal_ahead={self.proximal_ahead}, "
            f"predicted_bias={self.predicted_bias:g}"
        )
