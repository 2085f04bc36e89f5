"""Learning modes: what trains what, and where gradients stop.

| mode     | stack learns from                          | head learns from          | gradient path              |
|----------|--------------------------------------------|---------------------------|----------------------------|
| local    | each layer's own next-input prediction     | task loss, detached input | none across layers or time |
| backprop | the task loss through all layers (BPTT)    | task loss                 | end to end                 |
| hybrid   | task loss + lambda x layers' local losses, | task loss                 | end to end above the       |
|          | bottom `local_layers` layers local         |                           | local layers               |

A rule is a small object the stack asks three things: is layer i local (explicit updates,
input and state detached), how much do the layers' local losses weigh, and does the task
loss reach the model. A new rule (e-prop, another HTM variant) subclasses `LearningRule`
and, if it learns by explicit updates, overrides `update`; the layers stay as they are.
"""

from dataclasses import dataclass

import torch

from predictive.memory import LayerStep, TemporalMemory, draws_by_rank
from predictive.sparse import check_flags

WEAKEN_ELEMENTS = 1 << 25  # synapses x streams that `weaken` holds at once (128 MB of float32)


def entries(mask: torch.Tensor, capacity: int, fixed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The true entries of `mask` (B, G), at most `capacity` per row, as flat lists row by row:
    (rows, columns, valid). `fixed`: of length B x min(capacity, G) whatever the mask holds,
    padded with invalid entries, so that how many there are is never read on the host (no
    sync on a GPU); else just the true entries (`nonzero`: cheaper on a CPU)."""
    if not fixed:
        rows, columns = mask.nonzero(as_tuple=True)
        return rows, columns, torch.ones_like(rows, dtype=torch.bool)
    b, g = mask.shape
    if capacity >= g:
        columns, valid = torch.arange(g, device=mask.device).expand(b, g), mask
    else:
        valid, columns = mask.to(torch.uint8).topk(capacity, dim=-1)
    rows = torch.arange(b, device=mask.device).unsqueeze(1).expand_as(columns)
    return rows.reshape(-1), columns.reshape(-1), valid.reshape(-1).bool()


def last_taken(targets: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """For each write i to `targets[i]` (a flat index), the write that an ordered indexed
    assignment of the `taken` writes leaves there: the last taken write to the same target
    (or the last write to it, untaken, when none is taken). Every write to a target then
    stores one outcome, so that the order in which they land does not matter. By a sort of
    the writes alone: no buffer the size of the target tensor."""
    n = targets.numel()
    order = torch.arange(n, device=targets.device)
    if n == 0:
        return order
    ranked = ((targets * 2 + taken.long()) * n + order).argsort()  # by target, untaken first, in order
    ordered = targets[ranked]
    run_end = torch.ones(n, dtype=torch.bool, device=targets.device)
    run_end[:-1] = ordered[1:] != ordered[:-1]
    end = torch.where(run_end, order, n).flip(0).cummin(0).values.flip(0)  # each run's last place
    return torch.empty_like(ranked).scatter_(0, ranked, ranked[end])


def segments_in(segments: torch.Tensor, valid: torch.Tensor, seg) -> torch.Tensor:
    """(G,) bool: the segments named by the `valid` entries of the list `segments`."""
    counts = torch.zeros(seg.permanence.shape[0], dtype=torch.long, device=segments.device)
    return counts.index_add_(0, segments, valid.long()) > 0


@dataclass
class PredictiveHebbian:
    """HTM-style local updates of a temporal-memory layer, from what it saw at t-1 and t
    (docs/core.md walks through each; docs/results.md has what each choice measured).

    - Presynaptic activity: the cells that fired at t-1 and its winners (in a column that a
      known context predicted through another context's cells, the winner carries this
      context and must be reinforced when seen again, not weakened for not firing).
    - Reinforced: segments that predicted a winner, and the best matching segment of a novel
      column's winner (+`permanence_increment` on synapses from active cells,
      -`permanence_decrement` on the others). The novel winner's segment also grows synapses
      to the winners of t-1, up to `new_synapses` active ones; a novel column with no
      matching segment starts a new segment on its winner. A grown synapse starts at
      `initial_permanence`, below connected: a transition is predicted once seen twice, so
      chance links (towards never-repeating noise) do not fire in other contexts and merge
      them. `grow_predicted` lets correctly predicting segments grow too (HTM's rule; after a
      burst it spreads one context into another).
    - Permanences stay at most `max_permanence`: a link reinforced a hundred times is then
      as easy to unlearn as one reinforced twice, and a continuation that stopped coming stops
      being predicted after (max_permanence - connected) / decrement failures, however long
      it held before (three failures with the defaults; 1.0, HTM's ceiling: seven).
    - Weakened: active segments of cells in columns that stayed inactive, by
      `predicted_decrement` when the context at t-1 was predicted (a confident prediction
      failed; in a known context only its winners' predictions count), by `burst_decrement`
      after a burst (0 by default: a burst fires every cell of its columns, and any
      decrement there wears down contexts that are right). With the defaults a context
      followed by either of two symbols keeps both; one that stopped coming fades as the
      ceiling above says.
    - The decoder learns the next input from the predicted columns (normalised delta rule)
      and, at `decoder_code_rate`, the current input from the active columns (a column
      decodes to its input from its first activity). Not from a known context's
      prediction: those columns are other contexts'. Its bias (the mean input, a frequency
      prior) learns only with `decoder_bias`.
    - The feedforward map moves each active column's weights toward its input at
      `feedforward_rate` (0: the column code stays fixed).
    - A new segment takes its cell's least recently learned slot, a segment with a connected
      synapse counting as `connected_grace` steps younger: links seen once and never again
      go before established ones of about the same age (with many streams such links come
      many times faster than any stream's sequences recur).
    - `fixed_shapes`: the segments that learn are listed in lists of fixed length, padded
      (True), or as found (False: `nonzero`, which reads their number on the host). The same
      updates either way; fixed shapes never wait for a GPU, the lists as found are cheaper on
      a CPU. None: fixed on every device but the CPU.
    """

    permanence_increment: float = 0.12
    permanence_decrement: float = 0.02
    predicted_decrement: float = 0.08
    burst_decrement: float = 0.0
    initial_permanence: float = 0.45
    max_permanence: float = 0.7
    new_synapses: int = 10
    grow_predicted: bool = False
    decoder_rate: float = 0.5
    decoder_code_rate: float = 0.5
    decoder_bias: bool = False
    feedforward_rate: float = 0.0
    connected_grace: int = 30
    fixed_shapes: bool | None = None

    def __post_init__(self):
        rates = ("permanence_increment", "permanence_decrement", "predicted_decrement", "burst_decrement")
        for name in (*rates, "decoder_rate", "decoder_code_rate", "feedforward_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < self.initial_permanence <= 1.0:
            raise ValueError(f"initial_permanence must be in (0, 1], got {self.initial_permanence}")
        if not self.initial_permanence <= self.max_permanence <= 1.0:
            raise ValueError(f"max_permanence must be in [initial_permanence={self.initial_permanence}, 1], "
                             f"got {self.max_permanence}")
        if isinstance(self.new_synapses, bool) or not isinstance(self.new_synapses, int) or self.new_synapses < 1:
            raise ValueError(f"new_synapses must be an integer >= 1, got {self.new_synapses!r}")
        grace = self.connected_grace
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
            raise ValueError(f"connected_grace must be an integer >= 0, got {self.connected_grace!r}")
        check_flags(grow_predicted=self.grow_predicted, decoder_bias=self.decoder_bias)
        if self.fixed_shapes is not None:
            check_flags(fixed_shapes=self.fixed_shapes)

    def fixed(self, x: torch.Tensor) -> bool:
        """Does a step on `x`'s device list what learns in lists of fixed length (`fixed_shapes`)?"""
        return self.fixed_shapes if self.fixed_shapes is not None else x.device.type != "cpu"

    def check(self, layer: TemporalMemory) -> None:
        """Raise ValueError if the rule cannot train `layer`: a segment grows at most
        `new_synapses` synapses, onto distinct cells. Cheap: run at every learning step."""
        if self.new_synapses > layer.segments.synapses:
            raise ValueError(f"new_synapses={self.new_synapses} exceeds the layer's synapses={layer.segments.synapses}")
        if self.max_permanence < layer.segments.connected_permanence:
            raise ValueError(f"max_permanence={self.max_permanence} is below the layer's connected_permanence="
                             f"{layer.segments.connected_permanence}: no synapse would ever connect")
        if self.new_synapses > layer.output_size:
            raise ValueError(f"new_synapses={self.new_synapses} exceeds the layer's cells={layer.output_size} "
                             "(columns x cells)")

    @torch.no_grad()
    def __call__(self, layer: TemporalMemory, step: LayerStep) -> None:
        layer.learning_steps += 1
        self.learn_segments(layer, step)
        self.learn_decoder(layer, step)
        if self.feedforward_rate > 0:
            self.learn_feedforward(layer, step)

    def learn_segments(self, layer: TemporalMemory, step: LayerStep) -> None:
        """With `fixed_shapes` the step never reads a tensor value on the host (no sync on a
        GPU), whatever learns. A stream with nothing active at t-1 (after a reset) has no
        overlaps, so none of its segments learns or grows."""
        self.check(layer)
        seg, prev = layer.segments, step.prev
        b, c, m, s = step.x.shape[0], layer.columns, layer.cells_per_column, seg.num_segments
        prev_active = (prev.cells > 0) | (prev.winners > 0)  # (B, N): fired or won at t-1
        prev_winners = prev.winners > 0
        # Drawn at every step, used or not, so that the random stream does not depend on what
        # was learned: one number for each winner a step can have.
        sample_noise = draws_by_rank(prev_winners, layer.max_active * m).squeeze(-1)
        potential = prev.potential_overlap  # (B, N, S)

        # Segments that predicted a winner of a column that is now active (and not novel).
        predicted_cell = (step.winners.view(b, c, m) & ~step.novel.unsqueeze(-1)).view(b, -1, 1)
        learning = (prev.active_overlap >= layer.activation_threshold) & predicted_cell
        # Novel columns: the winner's best matching segment learns, or a new one starts.
        winner = (step.winners.view(b, c, m) & step.novel.unsqueeze(-1)).view(b, -1)
        matched_cell = winner & step.matched.repeat_interleave(m, dim=1)
        best = potential.argmax(-1, keepdim=True)
        learning.scatter_(-1, best, learning.gather(-1, best) | matched_cell.unsqueeze(-1))
        # A start's context is unknown (`TemporalMemory.starts`): its first cells grow no
        # segment towards t-1 (noise), which would bind them into whatever context came before.
        new_cell = winner & ~matched_cell & (prev_winners.any(-1) & ~step.start).unsqueeze(-1)

        # Wrong predictions: segments that predicted a cell of a column that stayed inactive.
        inactive_cells = (~step.columns).repeat_interleave(m, dim=1).unsqueeze(-1)
        wrong = (prev.active_overlap >= layer.activation_threshold) & inactive_cells
        # In a known context the cells that fired beside what its winners predict belong to
        # other contexts (a burst's union): their failure says nothing against them.
        own = torch.where((prev.diverted > 0).unsqueeze(-1), prev.context_predicted > 0, True)
        wrong = (wrong & own.unsqueeze(-1)).view(b, -1)

        # Only cells of active columns learn: at most `active` x M x S segments per stream, and
        # one new segment per active column. How many segments failed has no such bound.
        fixed = self.fixed(step.x)
        active = layer.max_active
        learn = entries(learning.view(b, -1), active * m * s, fixed)
        version = seg.permanence._version
        ceiling = self.max_permanence
        self.adapt(seg, prev_active, learn, self.permanence_increment, -self.permanence_decrement, ceiling)
        decrement = torch.where(prev.anomaly > 0, self.burst_decrement, self.predicted_decrement)
        if fixed:
            self.weaken(seg, prev_active, wrong, decrement, ceiling)
        else:
            failed = entries(wrong, wrong.shape[1], fixed)
            self.adapt(seg, prev_active, failed, -decrement, 0.0, ceiling)

        new_b, new_cell_idx, new_valid = entries(new_cell, active, fixed)
        # The least recently learned slot of each new winner (an established segment counted
        # `connected_grace` steps younger) becomes a fresh segment.
        age = seg.last_learned.view(-1, s)[new_cell_idx]  # (K, S)
        established = (seg.permanence.view(-1, s, seg.synapses)[new_cell_idx] >= seg.connected_permanence).any(-1)
        slots = (age + self.connected_grace * established).argmin(-1)
        new_segment = new_cell_idx * s + slots
        fresh = segments_in(new_segment, new_valid, seg)[new_segment].unsqueeze(-1)  # alike for a segment listed twice
        seg.permanence.index_put_((new_segment,), torch.where(fresh, 0.0, seg.permanence[new_segment]))
        # Grow towards the previous winners up to `new_synapses` synapses onto active cells:
        # a segment already fully matched by a burst grows nothing, so contexts stay apart.
        learn_b, learn_segment, learn_valid = learn
        missing = self.new_synapses - potential.view(b, -1)[learn_b, learn_segment]
        if not self.grow_predicted:
            burst_segment = torch.zeros_like(potential, dtype=torch.bool).scatter_(-1, best, matched_cell.unsqueeze(-1))
            missing = torch.where(burst_segment.view(b, -1)[learn_b, learn_segment], missing, 0)
        missing = torch.cat([missing, torch.full_like(slots, self.new_synapses, dtype=missing.dtype)])
        grow_b, grow_segment = torch.cat([learn_b, new_b]), torch.cat([learn_segment, new_segment])
        grow_valid = torch.cat([learn_valid, new_valid])
        self.grow(seg, prev_winners, sample_noise, grow_b, grow_segment, missing.clamp(min=0).long() * grow_valid)
        # Every reinforced segment is in grow_segment (some grow nothing).
        grown = segments_in(grow_segment, grow_valid, seg)
        seg.last_learned.copy_(torch.where(grown, layer.learning_steps, seg.last_learned))
        if not fixed:  # the lists are short: refresh the cached masks of these segments alone
            seg.synapse_masks(torch.cat([failed[1], grow_segment]).unique(), since=version)

    @staticmethod
    def adapt(seg, prev_active, listed, active_delta, inactive_delta: float, ceiling: float) -> None:
        """Add `active_delta` (a float or one per stream) to the potential synapses of the
        `listed` segments (`entries`) whose presynaptic cell was active, `inactive_delta` to
        the others, and keep them in [0, `ceiling`]. A segment listed by several streams adds
        their changes in stream order."""
        bi, gi, valid = listed
        perm = seg.permanence
        if torch.is_tensor(active_delta):
            active_delta = active_delta[bi].unsqueeze(1)
        was_active = prev_active[bi.unsqueeze(1), seg.presynaptic[gi]]  # (P, F)
        delta = torch.where(was_active, active_delta, inactive_delta) * ((perm[gi] > 0) & valid.unsqueeze(1))
        perm.index_put_((gi,), delta.to(perm.dtype), accumulate=True)
        perm.index_put_((gi,), perm[gi].clamp(0.0, ceiling))  # the listed rows alone (a row listed twice: the same)

    @staticmethod
    def weaken(seg, prev_active, wrong, decrement, ceiling: float) -> None:
        """`adapt` of the `wrong` segments (B, G) by -`decrement` (B,) on synapses onto active
        cells, over every segment of every stream, a few streams at a time: how many segments
        failed has no bound, so no list of fixed length holds them. In stream order, as `adapt`."""
        perm = seg.permanence
        g, f = perm.shape
        potential = perm > 0  # before any stream's change, as in `adapt`
        rows = torch.arange(g, device=perm.device)
        group = max(1, WEAKEN_ELEMENTS // (g * f))
        for start in range(0, wrong.shape[0], group):
            streams = slice(start, start + group)
            onto_active = prev_active[streams].to(perm.dtype).index_select(1, seg.presynaptic.view(-1))
            scale = wrong[streams].to(perm.dtype) * -decrement[streams].to(perm.dtype).view(-1, 1)
            delta = onto_active.view(-1, g, f) * scale.unsqueeze(-1) * potential
            perm.index_put_((rows.repeat(delta.shape[0]),), delta.view(-1, f), accumulate=True)
        perm.copy_(torch.where(wrong.any(0).unsqueeze(1), perm.clamp(0.0, ceiling), perm))  # as `adapt`: failed rows

    def grow(self, seg, prev_winners, noise, bi, gi, missing) -> None:
        """Point up to `missing` weakest synapses of each segment at winners of t-1 that it
        does not reach yet, at the initial permanence; `noise` (B, N) in [0, 1) picks which.
        Where two streams pick one synapse, the later stream's winner takes it."""
        k = self.new_synapses
        # A random sample of k winners per stream (fewer when fewer won).
        scores = prev_winners.to(seg.permanence.dtype) * noise
        sample_score, sample = scores.topk(k, dim=-1)
        candidates, valid = sample[bi], sample_score[bi] > 0  # (P, k)
        perm, presynaptic = seg.permanence, seg.presynaptic
        present = (presynaptic[gi].unsqueeze(-1) == candidates.unsqueeze(1)) & (perm[gi] > 0).unsqueeze(-1)
        valid &= ~present.any(1)
        rank = valid.long().cumsum(-1) - 1
        take = valid & (rank < missing.unsqueeze(-1))
        weakest = perm[gi].argsort(dim=-1, stable=True)  # (P, F): empty slots (0) first
        synapse = gi.unsqueeze(-1) * seg.synapses + weakest.gather(-1, rank.clamp(min=0))  # (P, k), flat
        flat_presynaptic, flat_perm = presynaptic.view(-1), perm.view(-1)
        synapse, take, candidates = synapse.view(-1), take.view(-1), candidates.view(-1)
        last = last_taken(synapse, take)
        grown = take[last]
        flat_presynaptic.index_put_((synapse,), torch.where(grown, candidates[last], flat_presynaptic[synapse]))
        flat_perm.index_put_((synapse,), torch.where(grown, self.initial_permanence, flat_perm[synapse]))

    @torch.no_grad()
    def learn_decoder(self, layer: TemporalMemory, step: LayerStep) -> None:
        prev = step.prev
        # Not from a known context's prediction: it is other contexts' (a burst's union) or links
        # seen once, and what follows is this context's input; learning that pair teaches the
        # decoder that other contexts' columns mean this input (the same reason as `own` above).
        settled = (prev.diverted == 0).to(step.x.dtype).unsqueeze(-1)
        error = (step.x - prev.prediction) * settled  # zero error: no weight or bias moves
        scaled = self.delta_rule(layer, prev.predicted_columns, error, self.decoder_rate)
        if self.decoder_bias:
            layer.decoder.bias += scaled.sum(0)
        if self.decoder_code_rate > 0:  # the current input from the active columns
            columns = step.columns.to(step.x.dtype)  # (B, C)
            self.delta_rule(layer, columns, step.x - layer.decode(columns), self.decoder_code_rate)

    @torch.no_grad()
    def delta_rule(self, layer: TemporalMemory, columns: torch.Tensor, error: torch.Tensor, rate: float):
        """Add each stream's `error` (B, D), scaled by rate / (its active columns + 1) and
        averaged over the streams, to the decoder weights of its `columns` (B, C): the rows of
        columns active in some stream (all rows, with `fixed_shapes`). Returns the scaled error."""
        scaled = error * (rate / (columns.sum(-1, keepdim=True) + 1.0)) / error.shape[0]
        _, used, _ = entries(columns.any(0, keepdim=True), columns.shape[1], self.fixed(columns))
        layer.decoder_rows.index_add_(0, used, columns.index_select(1, used).t() @ scaled)
        return scaled

    @torch.no_grad()
    def learn_feedforward(self, layer: TemporalMemory, step: LayerStep) -> None:
        weight = layer.feedforward.dense_weight  # (C, D)
        active = step.columns.to(weight.dtype)  # (B, C)
        counts = active.sum(0).unsqueeze(-1)
        target = active.t() @ step.x  # (C, D): sum of the inputs each column won
        weight += self.feedforward_rate * (target - counts * weight) / step.x.shape[0]


class LearningRule:
    """Base rule: nothing local, the task loss trains everything (see `Backprop`)."""

    name = "base"
    local_loss_weight = 0.0
    task_loss_trains_model = True
    trains_model = True  # False: the model stays as initialised (`Frozen`)
    grows_segments = False  # do gradient-trained layers also grow segments (structural_update)?
    # On a CPU the compiled steps (predictive.fused) may run a chunk: a rule that changes no
    # layer (inference), or, for a rule that `updates_layers`, its `hebbian` in every layer.
    fused = True
    updates_layers = False  # does `update` or `structural_update` change the layers?

    def learns_map(self, layer_index: int, layer: TemporalMemory) -> bool:
        """Does layer `layer_index` learn its feedforward map by its own loss from this chunk
        (`TemporalMemory.proximal_loss`, `Local`)?"""
        return False

    def is_local(self, layer_index: int) -> bool:
        """Does layer `layer_index` (0 = bottom) learn by explicit local updates, cut off from
        the gradients of the layers above and of earlier steps?"""
        return False

    def update(self, layer: TemporalMemory, step: LayerStep) -> None:
        """Explicit update of a local layer after its activation at step t."""

    def structural_update(self, layer: TemporalMemory, step: LayerStep) -> None:
        """Explicit update of a gradient-trained layer at step t, for what a gradient cannot
        do (which cells a segment listens to); nothing by default."""

    def check(self, model: torch.nn.Module) -> None:
        """Raise ValueError, naming the setting, if the rule cannot train `model`; changes
        nothing. A layer that the gradient alone trains (no local updates, no segment growth)
        needs random initial synapses (`TemporalMemory.initial_segments`): an empty segment
        has no gradient to grow from. A model that cannot learn by a rule says so in its
        `check_rule` (the CNN, under local)."""
        if hasattr(model, "check_rule"):
            model.check_rule(self)
        layers = [m for m in model.modules() if isinstance(m, TemporalMemory)]
        for i, layer in enumerate(layers):
            if self.is_local(i) or self.grows_segments:
                continue
            if layer.initial_segments == "empty" and not (layer.segments.last_learned >= 0).any():
                raise ValueError(
                    f"model.initial_segments=empty: layer {i} learns by gradient alone under learning={self.name} "
                    "and an empty segment has no gradient to grow from; use initial_segments=random"
                )

    def head_features(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.task_loss_trains_model else features.detach()

    def parameter_groups(self, model: torch.nn.Module, parameters: list) -> list[dict]:
        """The optimizer's parameter groups for `parameters` (the trainable ones of the model,
        the head and the encoder): one group, at the optimizer's settings."""
        return [{"params": parameters}]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Local(LearningRule):
    """Every layer learns on its own, online, at every step; the head on detached features."""

    name = "local"
    task_loss_trains_model = False
    local_loss_weight = 1.0  # models that learn through a loss (the LSTM) use their own
    updates_layers = True

    def __init__(self, fused: bool = True, proximal_lr: float = 1e-3, proximal_chunks: int = 0, **hebbian):
        """fused: on a CPU, run each layer's chunk in one compiled loop (predictive.fused),
        the same steps as the torch ops at a fraction of their dispatch cost.
        The feedforward map of a layer built with `proximal_ahead` > 0 learns by its own
        contrastive predictive loss (`TemporalMemory.proximal_loss`) through the optimizer that
        trains the head: the loss is the model's `local_loss`, its gradient stays in the layer.
        proximal_lr: the learning rate of the maps and their predictors (their own parameter
        group: the head's rate moves a unit-norm map too far per step).
        proximal_chunks: 0, the maps learn from every training chunk; n > 0, from their first n
        (`TemporalMemory.map_updates`), then stay: a head trained beside a map that keeps
        moving reads a code that changes under it."""
        check_flags(fused=fused)
        if not proximal_lr > 0:
            raise ValueError(f"proximal_lr must be > 0, got {proximal_lr}")
        if isinstance(proximal_chunks, bool) or not isinstance(proximal_chunks, int) or proximal_chunks < 0:
            raise ValueError(f"proximal_chunks must be an integer >= 0, got {proximal_chunks!r}")
        self.hebbian = PredictiveHebbian(**hebbian)
        self.fused = fused
        self.proximal_lr, self.proximal_chunks = proximal_lr, proximal_chunks

    def is_local(self, layer_index: int) -> bool:
        return True

    def update(self, layer: TemporalMemory, step: LayerStep) -> None:
        self.hebbian(layer, step)

    def check(self, model: torch.nn.Module) -> None:
        super().check(model)
        for layer in model.modules():
            if isinstance(layer, TemporalMemory):
                self.hebbian.check(layer)

    def learns_map(self, layer_index: int, layer: TemporalMemory) -> bool:
        if not layer.proximal_ahead or not self.is_local(layer_index):
            return False
        return self.proximal_chunks == 0 or int(layer.map_updates) < self.proximal_chunks  # one read per chunk

    def parameter_groups(self, model: torch.nn.Module, parameters: list) -> list[dict]:
        """The feedforward maps and code predictors of the local layers with `proximal_ahead`
        in a group of their own, at `proximal_lr` and no weight decay (the maps' rows are unit norm)."""
        layers = [m for m in model.modules() if isinstance(m, TemporalMemory)]
        own = {id(p) for i, layer in enumerate(layers) if self.is_local(i) and layer.proximal_ahead
               for p in (layer.feedforward.dense_weight, layer.code_predictor)}
        groups = [{"params": [p for p in parameters if id(p) not in own]},
                  {"params": [p for p in parameters if id(p) in own], "lr": self.proximal_lr, "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def __repr__(self) -> str:
        return (f"Local({self.hebbian}, fused={self.fused}, proximal_lr={self.proximal_lr}, "
                f"proximal_chunks={self.proximal_chunks})")


class Backprop(LearningRule):
    """The task loss trains every layer, end to end over the chunk (truncated BPTT)."""

    name = "backprop"


class Hybrid(Local):
    """Task loss end to end plus `local_loss_weight` x the layers' local losses; the bottom
    `local_layers` layers learn locally (explicit updates) and pass no gradient down."""

    name = "hybrid"
    task_loss_trains_model = True

    def __init__(
        self, local_loss_weight: float = 0.1, local_layers: int = 0, grow_segments: bool = True, fused: bool = False,
        **hebbian,
    ):
        if fused is not False:  # its gradient layers run step by step, between the local ones
            raise ValueError(f"fused must be false for learning=hybrid (it applies to learning=local), got {fused!r}")
        super().__init__(fused=False, **hebbian)
        if local_loss_weight < 0:
            raise ValueError(f"local_loss_weight must be >= 0, got {local_loss_weight}")
        if local_layers < 0:
            raise ValueError(f"local_layers must be >= 0, got {local_layers}")
        check_flags(grow_segments=grow_segments)
        self.local_loss_weight = local_loss_weight
        self.local_layers = local_layers
        self.grows_segments = grow_segments

    def is_local(self, layer_index: int) -> bool:
        return layer_index < self.local_layers

    @torch.no_grad()
    def structural_update(self, layer: TemporalMemory, step: LayerStep) -> None:
        """With `grow_segments`, the gradient-trained layers also grow and adapt their
        segments by the local rule (the gradient then tunes permanences and decoder): a
        gradient cannot choose which cells a synapse listens to, so from random synapses over
        sparse activity it has almost nothing to follow."""
        if self.grows_segments:
            layer.learning_steps += 1
            self.hebbian.learn_segments(layer, step)

    def __repr__(self) -> str:
        return (
            f"Hybrid(local_loss_weight={self.local_loss_weight}, local_layers={self.local_layers}, "
            f"grow_segments={self.grows_segments})"
        )


class Frozen(LearningRule):
    """The layers keep their initialisation: no local update, no gradient, no running
    statistics (the harness keeps the model in eval mode). The head and the encoder learn
    as under `Local`, from detached features: the floor that local learning must rise above."""

    name = "frozen"
    task_loss_trains_model = False
    trains_model = False

    def __init__(self, fused: bool = True):
        """fused: on a CPU, run each layer's chunk in one compiled loop (predictive.fused)."""
        check_flags(fused=fused)
        self.fused = fused

    def is_local(self, layer_index: int) -> bool:
        return True  # input and state detached, no update (`update` does nothing)


RULES = {rule.name: rule for rule in (Local, Backprop, Hybrid, Frozen)}


def build(name: str = "local", **settings) -> LearningRule:
    """A learning rule by name: local | backprop | hybrid | frozen."""
    if name not in RULES:
        raise ValueError(f"learning rule must be one of {sorted(RULES)}, got {name!r}")
    return RULES[name](**settings)
