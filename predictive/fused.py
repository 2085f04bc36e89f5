"""Local learning of a temporal-memory layer, compiled: a whole chunk in one loop.

On a CPU with one or a few streams, a step of `TemporalMemory` under the `PredictiveHebbian`
rule is several hundred small torch ops whose dispatch, not their arithmetic, is the cost.
`run_layer` runs the very same steps (activation, learning rule, prediction) for all T steps
of a chunk in one numba-compiled loop, on the layer's own tensors (shared memory, no copies).
In local mode a layer sees nothing of the layers above it, so a stack runs layer by layer,
each over the whole chunk.

Each compiled function mirrors one torch method and names it in its docstring: a change to
one is a change to its twin. Given the same random numbers (`TemporalMemory.choose_winners`'
tie-break, then the growth sample of `PredictiveHebbian.learn_segments`, per step), the
segments, cells, winners and overlaps are those of the torch step bit for bit; the decoder
and its prediction agree to float rounding (its sums run in another order).
tests/test_fused.py checks both over random settings.
"""

import weakref
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import literal_unroll

from predictive.learning import PredictiveHebbian
from predictive.memory import LayerState, TemporalMemory

INDEX_SLACK = 32  # free places per cell in the reverse index for synapses grown within a chunk (doubled when full)


class Settings(NamedTuple):
    """A layer's and its rule's settings as the compiled steps read them. The rates are float32:
    the torch steps compare them with, and add them to, float32 tensors."""

    k_select: int  # columns a step activates: KWinners.k, or k_inference in eval mode
    k: int  # TemporalMemory.k, the anomaly's denominator
    cells_per_column: int
    segments: int  # per cell
    activation_threshold: int
    matching_threshold: int
    connected_permanence: np.float32
    recall: bool
    fresh_steps: int
    start_cells: bool
    training: bool  # KWinners in training mode: duty cycles and boosting move
    duty_cycle_period: int
    density: np.float32
    boost_strength_factor: np.float32
    predicted_bias: np.float32  # TemporalMemory.predicted_bias
    new_synapses: int
    grow_predicted: bool
    connected_grace: int
    permanence_increment: np.float32
    permanence_decrement: np.float32
    predicted_decrement: np.float32
    burst_decrement: np.float32
    initial_permanence: np.float32
    max_permanence: np.float32
    decoder_rate: np.float32
    decoder_code_rate: np.float32
    decoder_bias: bool
    learn: bool  # False: inference, the steps of a rule that changes nothing (the rest above is unused)


class Chunk(NamedTuple):
    """A chunk's inputs: column scores (B, T, C), input (B, T, D), resets (B, T) bool, and each
    step's random numbers (T, 2, B, A * M), A = `TemporalMemory.max_active`: the winners'
    tie-break (`predictive.memory.draws_by_rank`), then the growth sample (T, 1, B, A * M without
    learning: the tie-break alone, as the torch steps draw them)."""

    scores: np.ndarray
    x: np.ndarray
    reset: np.ndarray
    noise: np.ndarray


class State(NamedTuple):
    """`memory.LayerState` as (B, ...) float32 arrays (the same fields, in order), updated in place."""

    cells: np.ndarray
    winners: np.ndarray
    columns: np.ndarray
    predicted: np.ndarray
    active_overlap: np.ndarray
    potential_overlap: np.ndarray
    context_predicted: np.ndarray
    diverted: np.ndarray
    matching_columns: np.ndarray
    predicted_columns: np.ndarray
    prediction: np.ndarray
    anomaly: np.ndarray


class Outputs(NamedTuple):
    """What `run_layer` returns of every step: (B, T, ...) float32."""

    cells: np.ndarray  # (B, T, N) activity at t
    predicted: np.ndarray  # (B, T, N) cells predicted for t+1
    prediction: np.ndarray  # (B, T, D) decoded prediction of x[t+1]
    anomaly: np.ndarray  # (B, T)


class Segments(NamedTuple):
    """`DistalSegments`' tensors, and the layer's learning step that `last_learned` counts in."""

    permanence: np.ndarray  # (G, F) float32, G = N * S segments
    presynaptic: np.ndarray  # (G, F) int64
    last_learned: np.ndarray  # (G,) int64
    learning_steps: np.ndarray  # (1,) int64, TemporalMemory.learning_steps


class Decoder(NamedTuple):
    """`TemporalMemory.decoder`: weights as stored, a row per column (`decoder_rows`), and bias."""

    rows: np.ndarray  # (C, D) float32
    bias: np.ndarray  # (D,) float32


class Boosting(NamedTuple):
    """`KWinners`' buffers."""

    duty_cycle: np.ndarray  # (C,) float32
    boost_strength: np.ndarray  # (1,) float32
    learning_iterations: np.ndarray  # (1,) int64


class Layer(NamedTuple):
    """What a layer learns: the layer's own tensors, written in place."""

    segments: Segments
    decoder: Decoder
    boosting: Boosting


class Step(NamedTuple):
    """`LayerStep` of one time step, every stream: rewritten at each step."""

    columns: np.ndarray  # (B, C) bool
    bursting: np.ndarray  # (B, C) bool
    novel: np.ndarray  # (B, C) bool
    matched: np.ndarray  # (B, C) bool
    cells: np.ndarray  # (B, N) float32
    winners: np.ndarray  # (B, N) bool
    anomaly: np.ndarray  # (B,) float32
    prev_active: np.ndarray  # (B, N) bool: fired or won at t-1, what segments learn from
    start: np.ndarray  # (B,) bool: the step starts a context (`TemporalMemory.starts`)


class Ranking(NamedTuple):
    """`kwinners`' buffers."""

    factors: np.ndarray  # (C,) boost factors
    boosted: np.ndarray  # (C,) one stream's boosted scores
    scratch: np.ndarray  # (C,) the same, reordered to find the k-th


class Learning(NamedTuple):
    """`learn_segments`' buffers: the (stream, segment) rows a step touches, and what they need."""

    rows: np.ndarray  # (B * G, 2) int64
    missing: np.ndarray  # (B * G,) int64, synapses each row may grow
    active_delta: np.ndarray  # (B * G,) float32
    inactive_delta: np.ndarray  # (B * G,) float32
    had_winners: np.ndarray  # (B,) bool, a stream had winners at t-1
    sample: np.ndarray  # (B, new_synapses) int64, winners of t-1 to grow towards
    sample_valid: np.ndarray  # (B, new_synapses) bool
    used: np.ndarray  # (N,) float32, segments in use per cell (`choose_winners`)


class Overlaps(NamedTuple):
    """`predict`'s buffers for one stream."""

    connected: np.ndarray  # (G,) float32
    potential: np.ndarray  # (G,) float32
    touched: np.ndarray  # (G + 1,) int64: the segments `connected` / `potential` are non-zero on; [-1]: how many
    recall: np.ndarray  # (N,) bool, cells a known context's winners predict or match
    once: np.ndarray  # (N,) bool, cells not predicted that a fresh link matches (`seen_once`)


class Errors(NamedTuple):
    """`learn_decoder`'s buffers."""

    scaled: np.ndarray  # (D,) float32, one stream's scaled error
    code: np.ndarray  # (B, D) float32, every stream's scaled error of the code


class Work(NamedTuple):
    """The step and the buffers of the compiled steps, allocated once a chunk."""

    step: Step
    ranking: Ranking
    learning: Learning
    overlaps: Overlaps
    errors: Errors


class Index(NamedTuple):
    """For each presynaptic cell, the potential synapses onto it (segment * F + slot): cell i's
    are entries[start[i] : start[i] + fill[i]]. An entry counts only while `position` of its
    synapse points at it."""

    start: np.ndarray
    fill: np.ndarray
    entries: np.ndarray
    position: np.ndarray


def settings(layer: TemporalMemory, hebbian) -> Settings:
    """The settings of `layer` learning by `hebbian` (a `PredictiveHebbian`; None: inference)."""
    kw, h, f32 = layer.kwinners, hebbian or PredictiveHebbian(), np.float32
    return Settings(
        k_select=int(kw.k if kw.training else kw.k_inference), k=int(layer.k),
        cells_per_column=int(layer.cells_per_column), segments=int(layer.segments.num_segments),
        activation_threshold=int(layer.activation_threshold), matching_threshold=int(layer.matching_threshold),
        connected_permanence=f32(layer.segments.connected_permanence), recall=bool(layer.recall),
        fresh_steps=int(layer.fresh_steps), start_cells=bool(layer.start_cells), training=bool(kw.training),
        duty_cycle_period=int(kw.duty_cycle_period), density=f32(kw.density),
        boost_strength_factor=f32(kw.boost_strength_factor), predicted_bias=f32(layer.predicted_bias),
        new_synapses=int(h.new_synapses), grow_predicted=bool(h.grow_predicted), connected_grace=int(h.connected_grace),
        permanence_increment=f32(h.permanence_increment), permanence_decrement=f32(h.permanence_decrement),
        predicted_decrement=f32(h.predicted_decrement), burst_decrement=f32(h.burst_decrement),
        initial_permanence=f32(h.initial_permanence), max_permanence=f32(h.max_permanence),
        decoder_rate=f32(h.decoder_rate), decoder_code_rate=f32(h.decoder_code_rate), decoder_bias=bool(h.decoder_bias),
        learn=hebbian is not None,
    )


def tensors(layer: TemporalMemory) -> Layer:
    """Numpy views of the layer's learned tensors and counters (shared memory)."""
    seg, kw = layer.segments, layer.kwinners
    return Layer(
        Segments(seg.permanence.detach().numpy(), seg.presynaptic.numpy(), seg.last_learned.numpy(),
                 layer.learning_steps.view(1).numpy()),
        Decoder(layer.decoder_rows.detach().numpy(), layer.decoder.bias.detach().numpy()),
        Boosting(kw.duty_cycle.numpy(), kw.boost_strength.view(1).numpy(), kw.learning_iterations.view(1).numpy()),
    )


def buffers(cfg: Settings, b: int, c: int, n: int, d: int) -> Work:
    """The step and buffers of a chunk of `b` streams."""
    g, k = n * cfg.segments, cfg.new_synapses
    bools = lambda *shape: np.zeros(shape, dtype=np.bool_)  # noqa: E731
    floats = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    ints = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
    return Work(
        Step(bools(b, c), bools(b, c), bools(b, c), bools(b, c), floats(b, n), bools(b, n), floats(b), bools(b, n),
             bools(b)),
        Ranking(floats(c), floats(c), floats(c)),
        Learning(ints(b * g, 2), ints(b * g), floats(b * g), floats(b * g), bools(b), ints(b, k),
                 bools(b, k), floats(n)),
        Overlaps(floats(g), floats(g), ints(g + 1), bools(n), bools(n)),
        Errors(floats(d), floats(b, d)),
    )


@torch.no_grad()
def run_layer(layer: TemporalMemory, hebbian, x: torch.Tensor, state: LayerState, reset: torch.Tensor | None):
    """T steps of `layer` learning by `hebbian` (a `PredictiveHebbian`; None: inference, the
    layer changes nothing but its duty cycles in training mode, as under `LearningRule`).

    x: (B, T, D); state: the layer's state (not modified); reset: (B, T) bool or None.
    Returns (cells (B, T, N), predicted (B, T, N), prediction (B, T, D), anomaly (B, T), state).
    """
    if hebbian is not None:
        hebbian.check(layer)
    b, t_len, _ = x.shape
    n, c = layer.output_size, layer.columns
    x = x.detach().contiguous()
    scores = layer.column_scores(x).contiguous()  # (B, T, C): the masked weights are fixed within a chunk
    # Per step: the winners' tie-break, the growth sample (`Chunk`).
    noise = torch.rand(t_len, 1 + (hebbian is not None), b, layer.max_active * layer.cells_per_column)
    state = LayerState(*(value.detach().clone().contiguous() for value in state))
    outputs = [torch.zeros(b, t_len, n), torch.zeros(b, t_len, n), torch.zeros(b, t_len, layer.input_size),
               torch.zeros(b, t_len)]
    reset = torch.zeros(b, t_len, dtype=torch.bool) if reset is None else reset.contiguous()
    cfg = settings(layer, hebbian)
    tensors_ = tensors(layer)
    index = chunk(
        cfg, Chunk(scores.numpy(), x.numpy(), reset.numpy(), noise.numpy()),
        State(*(value.numpy() for value in state)), tensors_,
        buffers(cfg, b, c, n, layer.input_size), Outputs(*(o.numpy() for o in outputs)), cached_index(layer, tensors_),
    )
    INDEXES[layer] = (segments_version(layer), index)
    if hebbian is not None:
        layer.segments.synapse_masks_changed()  # written through numpy: the permanence version did not move
    return (*outputs, state)


# Each layer's reverse index as the last chunk left it, with the version of the segments it
# indexes: the next chunk goes on with it unless something else changed the segments since
# (the torch steps, a checkpoint loaded; the compiled steps write through numpy and keep it).
INDEXES = weakref.WeakKeyDictionary()


def segments_version(layer: TemporalMemory) -> tuple:
    seg = layer.segments
    return tuple((t.data_ptr(), t._version) for t in (seg.permanence, seg.presynaptic, seg.last_learned))


def cached_index(layer: TemporalMemory, tensors_: Layer) -> Index:
    version, index = INDEXES.get(layer, (None, None))
    if version != segments_version(layer):
        index = reverse_index(tensors_.segments, layer.output_size, INDEX_SLACK)
    return index


@numba.njit(cache=True)
def chunk(cfg, inputs, state, layer, work, out, index):
    """T steps of `TemporalMemory.forward` with `PredictiveHebbian.__call__` as its rule (none:
    `cfg.learn` false), on the reverse `index` of the segments; returns it as it leaves it."""
    segments, decoder, boosting = layer
    step, learning, overlaps = work.step, work.learning, work.overlaps
    n_len, slack = state.cells.shape[1], INDEX_SLACK
    segments_in_use(segments.last_learned, learning.used)
    for t in range(inputs.x.shape[1]):
        for b in range(inputs.reset.shape[0]):
            if inputs.reset[b, t]:
                reset_stream(state, b)
        kwinners(cfg, inputs.scores[:, t], state.predicted, boosting, step.columns, work.ranking)
        activate(cfg, state, step)
        choose_winners(cfg, state, step, inputs.noise[t, 0], learning.used)
        if cfg.learn:  # PredictiveHebbian.__call__: the segments, then the decoder.
            segments.learning_steps[0] += 1
            if not learn_segments(cfg, state, segments, step, inputs.noise[t, 1], index, learning):
                slack *= 2  # a cell's list in the reverse index was full: rebuild it with more room
                index = reverse_index(segments, n_len, slack)
            learn_decoder(cfg, state, decoder, step, inputs.x[:, t], work.errors)
        predict(cfg, state, segments, decoder, step, index, overlaps, out, t)
    return index


@numba.njit(cache=True)
def reset_stream(state, b):
    """`TemporalMemory.forward`'s reset: stream b's state is cleared first."""
    for value in literal_unroll((  # literal_unroll must be called by this name
        state.cells, state.winners, state.columns, state.predicted, state.active_overlap, state.potential_overlap,
        state.context_predicted, state.diverted, state.matching_columns, state.predicted_columns, state.prediction,
        state.anomaly,
    )):
        value[b] = 0.0


@numba.njit(cache=True)
def kwinners(cfg, scores, predicted, boosting, columns, ranking):
    """`KWinners.winners` of `TemporalMemory.biased`: the `k_select` largest boosted scores (B, C)
    of each stream, those of the columns `predicted` (B, N) raised first, ties by lowest index,
    into `columns`; in training mode the duty cycles follow."""
    b_len, c_len = scores.shape
    k, m, duty, boost = cfg.k_select, cfg.cells_per_column, boosting.duty_cycle, boosting.boost_strength
    factors, boosted = ranking.factors, ranking.boosted
    for c in range(c_len):
        factors[c] = np.float32(np.exp(np.float32((cfg.density - duty[c]) * boost[0])))
    for b in range(b_len):
        bias = np.float32(cfg.predicted_bias * spread(scores[b])) if cfg.predicted_bias else np.float32(0.0)
        for c in range(c_len):
            score = scores[b, c]
            if bias and predicted[b, c * m:(c + 1) * m].max() > 0:
                score = score + bias
            boosted[c] = score * factors[c]
        # The k largest: every score above the k-th, then ties at it by lowest index.
        kth = kth_smallest(boosted, c_len - k, ranking.scratch)
        taken = 0
        for c in range(c_len):
            columns[b, c] = boosted[c] > kth
            taken += columns[b, c]
        for c in range(c_len):
            if taken < k and boosted[c] == kth:
                columns[b, c] = True
                taken += 1
    if cfg.training:
        update_duty_cycle(cfg, columns, boosting)


@numba.njit(cache=True)
def spread(scores):
    """The standard deviation of one stream's scores (C,), in float64, as float32."""
    mean = 0.0
    for value in scores:
        mean += np.float64(value)
    mean /= scores.shape[0]
    variance = 0.0
    for value in scores:
        variance += (np.float64(value) - mean) ** 2
    return np.float32(np.sqrt(variance / scores.shape[0]))


@numba.njit(cache=True)
def kth_smallest(values, k, scratch):
    """np.partition(values, k)[k], by quickselect in `scratch` (numpy's takes ~10 s to compile)."""
    scratch[:] = values
    lo, hi = 0, scratch.shape[0] - 1
    while lo < hi:
        pivot = scratch[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:  # Hoare: [lo, j] <= pivot <= [i, hi], and what lies between equals it
            while scratch[i] < pivot:
                i += 1
            while scratch[j] > pivot:
                j -= 1
            if i <= j:
                scratch[i], scratch[j] = scratch[j], scratch[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return scratch[k]


@numba.njit(cache=True)
def update_duty_cycle(cfg, columns, boosting):
    """`KWinners.update_duty_cycle`: each column's running share of active steps, and the
    boost strength's decay."""
    b_len, c_len = columns.shape
    duty, iterations, boost = boosting.duty_cycle, boosting.learning_iterations, boosting.boost_strength
    iterations[0] += b_len
    period = min(iterations[0], cfg.duty_cycle_period)
    for c in range(c_len):
        count = 0
        for b in range(b_len):
            count += columns[b, c]
        duty[c] = (duty[c] * np.float32(period - b_len) + np.float32(count)) / np.float32(period)
    boost[0] = boost[0] * cfg.boost_strength_factor


@numba.njit(cache=True)
def activate(cfg, state, step):
    """`TemporalMemory.activate`: in each active column the predicted cells fire, or all its
    cells when none was predicted (a burst). In a column a known context predicts, only the
    cells it predicts count as predicted. Also the anomaly and the activity of t-1."""
    columns, bursting, cells, prev_active = step.columns, step.bursting, step.cells, step.prev_active
    predicted, context = state.predicted, state.context_predicted
    b_len, c_len = columns.shape
    n_len, m = cells.shape[1], cfg.cells_per_column
    for b in range(b_len):
        hits = 0
        nothing_predicted = True
        for n in range(n_len):
            prev_active[b, n] = state.cells[b, n] > 0 or state.winners[b, n] > 0  # fired or won at t-1
            cells[b, n] = 0.0
            nothing_predicted &= predicted[b, n] <= 0
        step.start[b] = cfg.start_cells and nothing_predicted and state.diverted[b] != 3  # `TemporalMemory.starts`
        if step.start[b] and state.anomaly[b] <= 0.5:  # ... and after a step mostly not predicted, or none
            for c in range(c_len):
                step.start[b] &= state.columns[b, c] <= 0
        for c in range(c_len):
            bursting[b, c] = False
            if not columns[b, c]:
                continue
            in_context = False
            if cfg.recall and state.diverted[b] > 0:
                for n in range(c * m, (c + 1) * m):
                    in_context |= context[b, n] > 0
            column_predicted = False
            for n in range(c * m, (c + 1) * m):
                cells[b, n] = predicted[b, n] * context[b, n] if in_context else predicted[b, n]
                column_predicted |= cells[b, n] > 0
            bursting[b, c] = not column_predicted
            hits += column_predicted
            if not column_predicted:
                cells[b, c * m:(c + 1) * m] = 1.0
        step.anomaly[b] = np.float32(1.0) - np.float32(hits) / np.float32(cfg.k)


@numba.njit(cache=True)
def choose_winners(cfg, state, step, noise, used):
    """`TemporalMemory.choose_winners`: the fired cells the context predicted win; a novel
    column (none did) takes one winner, the cell with the best matching segment, else its
    first cell at a start, else the least `used` cell (`noise` (B, N) breaks ties)."""
    columns, cells, winners, novel, matched = step.columns, step.cells, step.winners, step.novel, step.matched
    context, potential = state.context_predicted, state.potential_overlap
    b_len, c_len = columns.shape
    m = cfg.cells_per_column
    slots = noise.shape[1] // m
    skip = 1 if cfg.start_cells and m > 1 else 0  # a start's cell carries no other context
    for b in range(b_len):
        winners[b] = False
        start = step.start[b]
        row = -1  # the active column's row of `noise` (`draws_by_rank`)
        for c in range(c_len):
            novel[b, c] = False
            matched[b, c] = False
            if not columns[b, c]:
                continue
            row = min(row + 1, slots - 1)
            any_winner = False
            for n in range(c * m, (c + 1) * m):
                if cells[b, n] > 0 and context[b, n] > 0:
                    winners[b, n] = True
                    any_winner = True
            if any_winner:
                continue
            novel[b, c] = True
            best_value, best_cell = np.float32(-1.0), 0
            for n in range(c * m, (c + 1) * m):
                for s in range(potential.shape[2]):
                    if potential[b, n, s] > best_value:
                        best_value, best_cell = potential[b, n, s], n
            matched[b, c] = best_value >= cfg.matching_threshold
            if matched[b, c]:
                winners[b, best_cell] = True
            else:  # a new context: a start's first cell, else the least used
                chosen = c * m if start else least_used(used, noise[b, row * m + skip:(row + 1) * m], c * m + skip)
                winners[b, chosen] = True


@numba.njit(cache=True)
def segments_in_use(last_learned, used):
    """`TemporalMemory.choose_winners`' `used`: each cell's segments that ever learned (at the
    start of a chunk; `learn_segments` counts the segments it starts)."""
    s_len = last_learned.shape[0] // used.shape[0]
    for cell in range(used.shape[0]):
        count = 0
        for g in range(cell * s_len, (cell + 1) * s_len):
            count += last_learned[g] >= 0
        used[cell] = count


@numba.njit(cache=True)
def least_used(used, noise, first):
    """`TemporalMemory.choose_winners`' fallback: of the cells first.. of a column, the one
    with the fewest segments in use, `noise` (M,) breaking ties."""
    chosen, lowest = first, np.float32(np.inf)
    for n in range(first, first + noise.shape[0]):
        value = used[n] + noise[n - first]
        if value < lowest:
            chosen, lowest = n, value
    return chosen


@numba.njit(cache=True)
def learn_segments(cfg, state, segments, step, noise, index, learning):
    """`PredictiveHebbian.learn_segments`: segments that predicted a winner are reinforced,
    those that predicted a column that stayed inactive weakened; a novel column's matched
    winner grows its best matching segment, an unmatched one starts a new segment, towards a
    sample (`noise` (B, N)) of the winners of t-1. False when the reverse index ran full."""
    if not step.prev_active.any():
        return True  # first step after a reset: no context to learn from
    perm, presyn, last_learned = segments.permanence, segments.presynaptic, segments.last_learned
    rows, active_delta, inactive_delta = learning.rows, learning.active_delta, learning.inactive_delta
    for b in range(state.winners.shape[0]):
        learning.had_winners[b] = state.winners[b].any()
    reinforced = reinforced_rows(cfg, state, step, learning)
    adapt(rows, active_delta, inactive_delta, reinforced, perm, presyn, step.prev_active, cfg.max_permanence)
    wrong = wrong_rows(cfg, state, step, learning, reinforced)
    adapt(rows[reinforced:], active_delta[reinforced:], inactive_delta[reinforced:], wrong, perm, presyn,
          step.prev_active, cfg.max_permanence)
    count = growth_rows(cfg, state, segments, step, learning, reinforced)
    for i in range(reinforced, count):
        perm[rows[i, 1]] = 0.0
    fits = True
    if count > 0 and learning.had_winners.any():
        sample_winners(state.winners, noise, learning.sample, learning.sample_valid)
        fits = grow(rows, learning.missing, count, learning.sample, learning.sample_valid, perm, presyn,
                    cfg.initial_permanence, index)
    for i in range(count):
        g = rows[i, 1]
        if last_learned[g] < 0:
            learning.used[g // cfg.segments] += 1
        last_learned[g] = segments.learning_steps[0]
    return fits


@numba.njit(cache=True)
def best_segment(potential, b, n):
    """`PredictiveHebbian.learn_segments`' `best` for cell n of stream b: its segment with the
    most potential synapses (B, N, S) on the cells of t-1 (the first of equals)."""
    best = 0
    for s in range(1, potential.shape[2]):
        if potential[b, n, s] > potential[b, n, best]:
            best = s
    return best


@numba.njit(cache=True)
def reinforced_rows(cfg, state, step, learning):
    """`PredictiveHebbian.learn_segments`' `learning`: segments that predicted a winner of a
    column that is not novel, and the best matching segment of a novel column's matched
    winner, as rows with their deltas. Returns their count."""
    active, winners, novel, matched = state.active_overlap, step.winners, step.novel, step.matched
    rows = learning.rows
    b_len, n_len, s_len = active.shape
    m, count = cfg.cells_per_column, 0
    for b in range(b_len):
        for n in range(n_len):
            if not winners[b, n]:
                continue
            c = n // m
            best = best_segment(state.potential_overlap, b, n) if novel[b, c] and matched[b, c] else -1
            for s in range(s_len):
                if novel[b, c]:
                    take = s == best
                else:
                    take = active[b, n, s] >= cfg.activation_threshold
                if take:
                    rows[count, 0], rows[count, 1] = b, n * s_len + s
                    learning.active_delta[count] = cfg.permanence_increment
                    learning.inactive_delta[count] = -cfg.permanence_decrement
                    count += 1
    return count


@numba.njit(cache=True)
def wrong_rows(cfg, state, step, learning, first):
    """`PredictiveHebbian.learn_segments`' `wrong`: segments that predicted a cell of a column
    that stayed inactive (in a known context, only the cells its winners predicted), as rows
    from `first` on. Returns their count."""
    active, predicted, context, columns = state.active_overlap, state.predicted, state.context_predicted, step.columns
    rows = learning.rows
    b_len, n_len, s_len = active.shape
    m, count = cfg.cells_per_column, first
    for b in range(b_len):
        decrement = cfg.burst_decrement if state.anomaly[b] > 0 else cfg.predicted_decrement
        for n in range(n_len):
            if predicted[b, n] <= 0 or columns[b, n // m]:
                continue
            if state.diverted[b] > 0 and context[b, n] <= 0:
                continue  # another context's cell in a known one (learning.py)
            for s in range(s_len):
                if active[b, n, s] >= cfg.activation_threshold:
                    rows[count, 0], rows[count, 1] = b, n * s_len + s
                    learning.active_delta[count], learning.inactive_delta[count] = -decrement, 0.0
                    count += 1
    return count - first


@numba.njit(cache=True)
def growth_rows(cfg, state, segments, step, learning, reinforced):
    """`PredictiveHebbian.learn_segments`' `grow_segment` and `missing`: the reinforced rows
    (only a novel column's matched segment grows unless `grow_predicted`), then a new segment
    on each unmatched novel winner of a stream that had winners, and does not start a
    context. Returns the rows' count."""
    winners, novel, matched, rows, missing = step.winners, step.novel, step.matched, learning.rows, learning.missing
    s_len, m = cfg.segments, cfg.cells_per_column
    for i in range(reinforced):
        b, g = rows[i, 0], rows[i, 1]
        n, s = g // s_len, g % s_len
        grows = cfg.grow_predicted or (novel[b, n // m] and matched[b, n // m])
        missing[i] = max(cfg.new_synapses - int(state.potential_overlap[b, n, s]), 0) if grows else 0
    count = reinforced
    for b in range(winners.shape[0]):
        if not learning.had_winners[b] or step.start[b]:
            continue
        for n in range(winners.shape[1]):
            c = n // m
            if winners[b, n] and novel[b, c] and not matched[b, c]:
                rows[count, 0], rows[count, 1] = b, n * s_len + new_segment_slot(cfg, segments, n)
                missing[count] = cfg.new_synapses
                count += 1
    return count


@numba.njit(cache=True)
def new_segment_slot(cfg, segments, cell):
    """`PredictiveHebbian.learn_segments`' `slots`: the cell's least recently learned segment,
    an established one (with a connected synapse) counted `connected_grace` steps younger."""
    perm, last_learned = segments.permanence, segments.last_learned
    slot, oldest = 0, np.int64(0)
    for s in range(cfg.segments):
        g = cell * cfg.segments + s
        key = last_learned[g]
        for j in range(perm.shape[1]):
            if perm[g, j] >= cfg.connected_permanence:
                key += cfg.connected_grace
                break
        if s == 0 or key < oldest:
            slot, oldest = s, key
    return slot


@numba.njit(cache=True)
def sample_winners(winners, noise, sample, valid):
    """`PredictiveHebbian.grow`'s sample: per stream, up to `new_synapses` winners of t-1
    (`winners` (B, N)), highest `noise` first (the i-th winner's is noise[b, i])."""
    for b in range(winners.shape[0]):
        candidates = np.flatnonzero(winners[b] > 0)
        drawn = noise[b, np.minimum(np.arange(candidates.size), noise.shape[1] - 1)]
        kept = drawn > 0
        candidates, drawn = candidates[kept], drawn[kept]
        order = candidates[np.argsort(-drawn, kind="mergesort")]
        for j in range(sample.shape[1]):
            valid[b, j] = j < order.size
            sample[b, j] = order[j] if j < order.size else 0


@numba.njit(cache=True)
def adapt(rows, deltas_active, deltas_inactive, count, perm, presyn, prev_active, ceiling):
    """`PredictiveHebbian.adapt` on `count` rows (stream, segment): every delta is computed from
    the permanences before any is added (as the vectorized rule does), then rows are clamped
    to [0, ceiling]."""
    f_len = perm.shape[1]
    delta = np.zeros((count, f_len), dtype=np.float32)
    for i in range(count):
        b, g = rows[i, 0], rows[i, 1]
        for f in range(f_len):
            if perm[g, f] > 0:
                delta[i, f] = deltas_active[i] if prev_active[b, presyn[g, f]] else deltas_inactive[i]
    for i in range(count):
        g = rows[i, 1]
        for f in range(f_len):
            perm[g, f] += delta[i, f]
    for i in range(count):
        g = rows[i, 1]
        for f in range(f_len):
            perm[g, f] = min(max(perm[g, f], np.float32(0.0)), ceiling)


@numba.njit(cache=True)
def grow(rows, missing, count, sample, sample_valid, perm, presyn, initial, index):
    """`PredictiveHebbian.grow`: each row's segment points up to `missing` of its weakest slots
    at sampled winners of t-1 it does not reach yet; all rows decided before any is written.
    The reverse index gets the new synapses; returns False when a cell's list was full (the
    index must then be rebuilt)."""
    k, f_len = sample.shape[1], perm.shape[1]
    write_slot = np.full((count, k), -1, dtype=np.int64)
    for i in range(count):
        b, g = rows[i, 0], rows[i, 1]
        weakest = np.argsort(perm[g], kind="mergesort")
        rank = 0
        for j in range(k):
            if not sample_valid[b, j]:
                continue
            present = False
            for f in range(f_len):
                if presyn[g, f] == sample[b, j] and perm[g, f] > 0:
                    present = True
            if present:
                continue
            if rank < missing[i]:
                write_slot[i, j] = weakest[rank]
            rank += 1
    fits, position = True, index.position
    for i in range(count):
        b, g = rows[i, 0], rows[i, 1]
        for j in range(k):
            slot = write_slot[i, j]
            if slot < 0:
                continue
            cell, synapse = sample[b, j], g * f_len + slot
            listed = position[synapse] >= 0 and presyn[g, slot] == cell
            presyn[g, slot], perm[g, slot] = cell, initial
            if not listed:
                fits &= index_synapse(index, synapse, cell)
    return fits


@numba.njit(cache=True)
def index_synapse(index, synapse, cell):
    """A synapse grown onto `cell` enters the cell's list in the reverse index. False when the
    list is full (the synapse is then left out until the index is rebuilt)."""
    start, fill = index.start, index.fill
    place = start[cell] + fill[cell]
    if place == start[cell + 1]:
        return False
    index.entries[place] = synapse
    index.position[synapse] = place
    fill[cell] += 1
    return True


@numba.njit(cache=True)
def learn_decoder(cfg, state, decoder, step, x, errors):
    """`PredictiveHebbian.learn_decoder`: the normalized delta rule on the prediction made at
    t-1, on the predicted columns' weights (not in a known context), then, at
    `decoder_code_rate`, on the current input x (B, D) from the active columns."""
    predicted_columns, prediction, rows, bias = state.predicted_columns, state.prediction, decoder.rows, decoder.bias
    scaled, code = errors.scaled, errors.code
    b_len, d_len = x.shape
    for b in range(b_len):
        if state.diverted[b] > 0:
            continue  # a known context's prediction teaches the decoder nothing (learning.py)
        total = np.float32(0.0)
        for c in range(predicted_columns.shape[1]):
            total += predicted_columns[b, c]
        rate = cfg.decoder_rate / (total + np.float32(1.0))
        for d in range(d_len):
            scaled[d] = (x[b, d] - prediction[b, d]) * rate / np.float32(b_len)
        if cfg.decoder_bias:
            for d in range(d_len):
                bias[d] += scaled[d]
        add_delta(predicted_columns[b], scaled, rows)
    if cfg.decoder_code_rate > 0:
        # Every stream's error is taken before any stream's update, as the batched rule does.
        rate = cfg.decoder_code_rate / np.float32(cfg.k_select + 1)
        for b in range(b_len):
            decode(step.columns[b], bias, rows, code[b])
            for d in range(d_len):
                code[b, d] = (x[b, d] - code[b, d]) * rate / np.float32(b_len)
        for b in range(b_len):
            add_delta(step.columns[b], code[b], rows)


@numba.njit(cache=True)
def add_delta(columns, scaled, rows):
    """The weight step of `PredictiveHebbian.delta_rule` for one stream: each active column's
    decoder row (`rows`, C x D) moves by the scaled error (D,) times its activity (C,)."""
    for c in np.flatnonzero(columns):
        for d in range(scaled.shape[0]):
            rows[c, d] += scaled[d] * np.float32(columns[c])


@numba.njit(cache=True)
def decode(columns, bias, rows, out):
    """`TemporalMemory.decode` of one stream's column activity (C,) into `out` (D,): the bias
    plus each active column's row (`rows`, C x D) times its activity."""
    out[:] = bias
    for c in np.flatnonzero(columns):
        for d in range(out.shape[0]):
            out[d] += np.float32(columns[c]) * rows[c, d]


@numba.njit(cache=True)
def predict(cfg, state, segments, decoder, step, index, overlaps, out, t):
    """`TemporalMemory.predict`: the step becomes the state; the cells predicted for t+1 from
    the cells of t, a known context's recall, and their decoding; into the state and into
    step t of the chunk's outputs `out`."""
    predicted, predicted_columns, recall_cells = state.predicted, state.predicted_columns, overlaps.recall
    m = cfg.cells_per_column
    for b in range(step.cells.shape[0]):
        known, through_burst = carried_on(step.matched[b], step.novel[b], step.bursting[b],
                                          state.matching_columns[b], state.diverted[b])
        start = step.start[b]
        known |= start
        for n in range(step.cells.shape[1]):
            state.winners[b, n] = step.winners[b, n]
            state.cells[b, n] = out.cells[b, t, n] = step.cells[b, n]
        state.columns[b] = step.columns[b]
        predict_cells(cfg, state, segments, b, index, overlaps, out.predicted[b, t])
        recalled = recall(cfg, state, segments, b, index, overlaps) if known else False
        state.diverted[b] = 3.0 if start else 2.0 if through_burst else 1.0 if known else 0.0
        for c in range(predicted_columns.shape[1]):  # a known context's recall stands in for the burst's union
            top = np.float32(0.0)
            for n in range(c * m, (c + 1) * m):
                top = max(top, np.float32(recall_cells[n]) if recalled else predicted[b, n])
            predicted_columns[b, c] = top
        decode(predicted_columns[b], decoder.bias, decoder.rows, state.prediction[b])
        out.prediction[b, t] = state.prediction[b]
        state.anomaly[b] = out.anomaly[b, t] = step.anomaly[b]


@numba.njit(cache=True)
def carried_on(matched, novel, bursting, matching_columns, diverted):
    """`TemporalMemory.predict`'s `known` and `through_burst` for one stream (C,): does its
    context go on as a known one (a matched winner, a novel column that fired in a known
    context), or through a burst of a column whose segment matched the cells of t-1?"""
    known, through_burst = False, False
    for c in range(matched.shape[0]):
        known |= matched[c] or (diverted > 0 and novel[c] and not bursting[c])
        through_burst |= bursting[c] and matching_columns[c] > 0 and diverted == 1
    through_burst &= not known
    return known or through_burst, through_burst


@numba.njit(cache=True)
def predict_cells(cfg, state, segments, b, index, overlaps, predicted_out):
    """`TemporalMemory.predict`'s first half for stream b: the segments' overlaps with the
    cells of t, the predicted cells (also the context's, unless a known context's winners
    replace them; and into `predicted_out`), the columns with a matching segment, and the
    cells not predicted that a fresh link matches (`seen_once`). Only the segments the cells
    reach are visited (`segment_overlaps`' `touched`); the rest of the state is cleared."""
    active, potential, matching = state.active_overlap, state.potential_overlap, state.matching_columns
    predicted, context, once = state.predicted, state.context_predicted, overlaps.once
    connected_g, potential_g, touched = overlaps.connected, overlaps.potential, overlaps.touched
    last_learned = segments.last_learned
    s_len, m, now = cfg.segments, cfg.cells_per_column, segments.learning_steps[0]
    segment_overlaps(state.cells[b], segments.permanence, index, cfg.connected_permanence, connected_g, potential_g,
                     touched)
    active[b] = 0.0
    potential[b] = 0.0
    matching[b] = 0.0
    predicted[b] = 0.0
    context[b] = 0.0
    once[:] = False
    for i in range(touched[-1]):
        g = touched[i]
        n, s = g // s_len, g % s_len
        active[b, n, s] = connected_g[g]
        potential[b, n, s] = potential_g[g]
        if connected_g[g] >= cfg.activation_threshold:
            predicted[b, n] = context[b, n] = predicted_out[n] = 1.0
        if potential_g[g] >= cfg.matching_threshold:
            matching[b, n // m] = 1.0
            once[n] |= seen_once(cfg, last_learned, now, g)
    for i in range(touched[-1]):
        n = touched[i] // s_len
        once[n] &= predicted[b, n] == 0


@numba.njit(cache=True)
def seen_once(cfg, last_learned, now, segment):
    """`TemporalMemory.seen_once` for a segment that matches the cells of t: was it learned
    within `fresh_steps` steps of step `now`?"""
    return cfg.fresh_steps > 0 and last_learned[segment] >= now - cfg.fresh_steps


@numba.njit(cache=True)
def recall(cfg, state, segments, b, index, overlaps):
    """`TemporalMemory.predict` in a known context, stream b: what its winners predict (the
    context's cells) and match (the overlap learning reads), and with `recall` the cells they
    recall into `overlaps.recall`, else the fired cells' links seen once. True when it recalls."""
    potential, context, recall_cells, once = (state.potential_overlap, state.context_predicted, overlaps.recall,
                                              overlaps.once)
    connected_g, potential_g, touched = overlaps.connected, overlaps.potential, overlaps.touched
    s_len = cfg.segments
    segment_overlaps(state.winners[b], segments.permanence, index, cfg.connected_permanence, connected_g, potential_g,
                     touched)
    potential[b] = 0.0  # the winners' potential overlaps replace the cells'
    context[b] = 0.0
    recall_cells[:] = False
    recalled = False
    for i in range(touched[-1]):
        g = touched[i]
        n = g // s_len
        potential[b, n, g % s_len] = potential_g[g]
        if connected_g[g] >= cfg.activation_threshold:
            context[b, n] = 1.0
        recall_cells[n] |= connected_g[g] >= cfg.activation_threshold or potential_g[g] >= cfg.matching_threshold
        recalled |= recall_cells[n] and cfg.recall
    if cfg.recall and not recalled:  # new winners: the fired cells' links seen once
        recall_cells[:] = once
        recalled = once.any()
    return recalled


@numba.njit(cache=True)
def reverse_index(segments, n_len, slack):
    """The `Index` of the potential synapses onto `n_len` cells, with `slack` free places per
    cell for synapses grown later: an overlap then visits the synapses of the active cells
    alone. A synapse re-targeted to another cell leaves a stale entry behind, never a second
    count."""
    perm, presyn, last_learned = segments.permanence, segments.presynaptic, segments.last_learned
    g_len, f_len = perm.shape
    count = np.zeros(n_len, dtype=np.int64)
    for g in range(g_len):
        if last_learned[g] >= 0:  # never grown: every permanence is 0
            for f in range(f_len):
                if perm[g, f] > 0:
                    count[presyn[g, f]] += 1
    start = np.zeros(n_len + 1, dtype=np.int64)
    for n in range(n_len):
        start[n + 1] = start[n] + count[n] + slack
    index = Index(start, np.zeros(n_len, dtype=np.int64), np.empty(start[n_len], dtype=np.int64),
                  np.full(g_len * f_len, -1, dtype=np.int64))
    for g in range(g_len):
        if last_learned[g] >= 0:
            for f in range(f_len):
                if perm[g, f] > 0:
                    index_synapse(index, g * f_len + f, presyn[g, f])
    return index


@numba.njit(cache=True)
def segment_overlaps(activity, perm, index, connected_permanence, connected, potential, touched):
    """`DistalSegments.overlaps` with a 0/1 activity (N,): each segment's connected and
    potential synapses onto active cells, into `connected` and `potential` (G,), and the
    segments they are non-zero on into `touched` (their count last): only those are cleared
    at the next call, not all G."""
    start, fill, entries, position = index
    f_len = perm.shape[1]
    for i in range(touched[-1]):
        connected[touched[i]] = 0.0
        potential[touched[i]] = 0.0
    count = 0
    for cell in np.flatnonzero(activity > 0):
        for place in range(start[cell], start[cell] + fill[cell]):
            synapse = entries[place]
            if position[synapse] != place:
                continue
            g = synapse // f_len
            w = perm[g, synapse - g * f_len]
            if w > 0:
                if potential[g] == 0:
                    touched[count] = g
                    count += 1
                potential[g] += 1
                if w >= connected_permanence:
                    connected[g] += 1
    touched[-1] = count
