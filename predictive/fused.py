"""Local learning of a temporal-memory layer, compiled: a whole chunk in one loop.

On a CPU with one or a few streams, a step of `TemporalMemory` under the `PredictiveHebbian`
rule is some 850 small torch ops whose dispatch, not their arithmetic, is the cost (about
1,150 us per step on the high-order task). `run_layer` runs the very same steps (activation,
learning rule, prediction) for all T steps of a chunk in one numba-compiled loop, on the
layer's own tensors (shared memory, no copies). In local mode a layer sees nothing of the
layers above it, so a stack runs layer by layer, each over the whole chunk.

Given the same random numbers (`TemporalMemory.choose_winners`' tie-break, then the growth
sample of `PredictiveHebbian.learn_segments`, per step), the segments, cells, winners and
overlaps are those of the torch step bit for bit; the decoder and its prediction agree to
float rounding (its sums run in another order). tests/test_fused.py checks both.
"""

import numba
import numpy as np
import torch

from predictive.memory import TemporalMemory

INDEX_SLACK = 32  # free places per cell in the reverse index for synapses grown within a chunk (doubled when full)
STATE = ("cells", "winners", "columns", "predicted", "active_overlap", "potential_overlap", "context_predicted",
         "diverted", "matching_columns", "predicted_columns", "prediction", "anomaly")


@torch.no_grad()
def run_layer(layer: TemporalMemory, hebbian, x: torch.Tensor, state: dict, reset: torch.Tensor | None):
    """T steps of `layer` learning by `hebbian` (a `PredictiveHebbian`).

    x: (B, T, D); state: the layer's state (not modified); reset: (B, T) bool or None.
    Returns (cells (B, T, N), predicted (B, T, N), prediction (B, T, D), anomaly (B, T), state).
    """
    b, t_len, _ = x.shape
    n, seg = layer.output_size, layer.segments
    x = x.detach().contiguous()
    scores = layer.feedforward(x).contiguous()  # (B, T, C): the masked weights are fixed within a chunk
    noise = torch.rand(t_len, 2, b, n)  # per step: winners' tie-break, then the growth sample
    state = {name: value.detach().clone().contiguous() for name, value in state.items()}
    outputs = [torch.zeros(b, t_len, n), torch.zeros(b, t_len, n), torch.zeros(b, t_len, layer.input_size),
               torch.zeros(b, t_len)]
    reset = torch.zeros(b, t_len, dtype=torch.bool) if reset is None else reset.contiguous()
    kw = layer.kwinners
    counters = torch.stack([layer.learning_steps, kw.learning_iterations])
    boost = kw.boost_strength.view(1).clone()
    settings = np.array([
        kw.k if kw.training else kw.k_inference, layer.k, layer.cells_per_column, seg.num_segments,
        layer.activation_threshold, layer.matching_threshold, hebbian.new_synapses, hebbian.grow_predicted,
        hebbian.decoder_bias, kw.training, kw.duty_cycle_period, layer.recall, hebbian.connected_grace,
        layer.fresh_steps,
    ], dtype=np.int64)
    rates = np.array([
        seg.connected_permanence, hebbian.permanence_increment, hebbian.permanence_decrement,
        hebbian.predicted_decrement, hebbian.burst_decrement, hebbian.initial_permanence, hebbian.decoder_rate,
        kw.density, kw.boost_strength_factor, hebbian.decoder_code_rate,
    ], dtype=np.float32)
    chunk(
        scores.numpy(), x.numpy(), reset.numpy(), noise.numpy(), *(state[k].numpy() for k in STATE),
        *(o.numpy() for o in outputs), seg.permanence.detach().numpy(), seg.presynaptic.numpy(),
        seg.last_learned.numpy(), layer.decoder_rows.detach().numpy(), layer.decoder.bias.detach().numpy(),
        kw.duty_cycle.numpy(), boost.numpy(), counters.numpy(), settings, rates,
    )
    layer.learning_steps.copy_(counters[0])
    kw.learning_iterations.copy_(counters[1])
    kw.boost_strength.copy_(boost[0])
    seg.synapse_masks_changed()  # written through numpy: the permanence version did not move
    return (*outputs, state)


@numba.njit(cache=True)
def reverse_index(perm, presyn, last_learned, n_len, slack):
    """For each presynaptic cell, the potential synapses onto it (segment * F + slot), with
    `slack` free places for synapses grown later: an overlap then visits the synapses of the
    active cells alone. An entry counts only while `position` of its synapse points at it, so
    a synapse re-targeted to another cell leaves a stale entry behind, never a second count."""
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
    entries = np.empty(start[n_len], dtype=np.int64)
    fill = np.zeros(n_len, dtype=np.int64)
    position = np.full(g_len * f_len, -1, dtype=np.int64)
    for g in range(g_len):
        if last_learned[g] >= 0:
            for f in range(f_len):
                if perm[g, f] > 0:
                    cell = presyn[g, f]
                    place = start[cell] + fill[cell]
                    entries[place] = g * f_len + f
                    position[g * f_len + f] = place
                    fill[cell] += 1
    return start, fill, entries, position


@numba.njit(cache=True)
def overlaps(activity, perm, index, conn, connected_out, potential_out):
    """Connected and potential overlaps of every segment with a 0/1 activity (N,)."""
    start, fill, entries, position = index
    f_len = perm.shape[1]
    connected_out[:] = 0.0
    potential_out[:] = 0.0
    for cell in np.flatnonzero(activity > 0):
        for place in range(start[cell], start[cell] + fill[cell]):
            synapse = entries[place]
            if position[synapse] != place:
                continue
            g = synapse // f_len
            w = perm[g, synapse - g * f_len]
            if w > 0:
                potential_out[g] += 1
                if w >= conn:
                    connected_out[g] += 1


@numba.njit(cache=True)
def decode(columns, dec_b, dec_wt, out):
    """TemporalMemory.decode of one stream's column activity (C,) into `out` (D,): the bias plus
    each active column's weights (`dec_wt`, C x D) times its activity."""
    out[:] = dec_b
    for c in np.flatnonzero(columns):
        for d in range(out.shape[0]):
            out[d] += np.float32(columns[c]) * dec_wt[c, d]


@numba.njit(cache=True)
def add_delta(columns, scaled, dec_wt):
    """The weight step of PredictiveHebbian.delta_rule for one stream: each active column's
    decoder weights (`dec_wt`, C x D) move by the scaled error (D,) times its activity (C,)."""
    for c in np.flatnonzero(columns):
        for d in range(scaled.shape[0]):
            dec_wt[c, d] += scaled[d] * np.float32(columns[c])


@numba.njit(cache=True)
def adapt(rows, deltas_active, deltas_inactive, count, perm, presyn, prev_active):
    """PredictiveHebbian.adapt on `count` rows (stream, segment): every delta is computed from
    the permanences before any is added (as the vectorized rule does), then rows are clamped."""
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
            perm[g, f] = min(max(perm[g, f], np.float32(0.0)), np.float32(1.0))


@numba.njit(cache=True)
def grow(rows, missing, count, sample, sample_valid, perm, presyn, initial, index):
    """PredictiveHebbian.grow: each row's segment points up to `missing` of its weakest slots
    at sampled winners of t-1 it does not reach yet; all rows decided before any is written.
    The reverse index gets the new synapses; returns False when a cell's list was full (the
    index must then be rebuilt)."""
    start, fill, entries, position = index
    k = sample.shape[1]
    f_len = perm.shape[1]
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
    fits = True
    for i in range(count):
        b, g = rows[i, 0], rows[i, 1]
        for j in range(k):
            slot = write_slot[i, j]
            if slot < 0:
                continue
            cell, synapse = sample[b, j], g * f_len + slot
            listed = position[synapse] >= 0 and presyn[g, slot] == cell
            presyn[g, slot] = cell
            perm[g, slot] = initial
            if listed:
                continue
            if start[cell] + fill[cell] == start[cell + 1]:
                fits = False
                continue
            place = start[cell] + fill[cell]
            entries[place] = synapse
            position[synapse] = place
            fill[cell] += 1
    return fits


@numba.njit(cache=True)
def chunk(scores, x, reset, noise,
          cells, winners, columns, predicted, active_overlap, potential_overlap, context_predicted,
          diverted, matching_columns, predicted_columns, prediction, anomaly,
          cells_out, predicted_out, prediction_out, anomaly_out,
          perm, presyn, last_learned, dec_wt, dec_b, duty, boost, counters, settings, rates):
    b_len, t_len, c_len = scores.shape
    n_len, d_len = cells.shape[1], x.shape[2]
    k_select, k, m, s_len = settings[0], settings[1], settings[2], settings[3]
    act_thr, match_thr, new_synapses = settings[4], settings[5], settings[6]
    grow_predicted, decoder_bias, training, period_max = settings[7] > 0, settings[8] > 0, settings[9] > 0, settings[10]
    recall_on, grace, fresh_steps = settings[11] > 0, settings[12], settings[13]
    conn, inc, dec, pred_dec, burst_dec, initial, decoder_rate, density, boost_factor, code_rate = (
        rates[0], rates[1], rates[2], rates[3], rates[4], rates[5], rates[6], rates[7], rates[8], rates[9])
    g_len = n_len * s_len
    active_cols = np.zeros((b_len, c_len), dtype=np.bool_)
    bursting = np.zeros((b_len, c_len), dtype=np.bool_)
    novel = np.zeros((b_len, c_len), dtype=np.bool_)
    matched = np.zeros((b_len, c_len), dtype=np.bool_)
    new_cells = np.zeros((b_len, n_len), dtype=np.float32)
    new_winners = np.zeros((b_len, n_len), dtype=np.bool_)
    prev_active = np.zeros((b_len, n_len), dtype=np.bool_)
    best_segment = np.zeros((b_len, n_len), dtype=np.int64)
    boost_values = np.empty(c_len, dtype=np.float32)
    boosted = np.empty(c_len, dtype=np.float32)
    used = np.empty(n_len, dtype=np.float32)
    fire = np.empty(n_len, dtype=np.float32)  # cells of one stream that fire, before bursts
    rows = np.empty((b_len * g_len, 2), dtype=np.int64)
    row_missing = np.empty(b_len * g_len, dtype=np.int64)
    deltas_a = np.empty(b_len * g_len, dtype=np.float32)
    deltas_i = np.empty(b_len * g_len, dtype=np.float32)
    sample = np.zeros((b_len, new_synapses), dtype=np.int64)
    sample_valid = np.zeros((b_len, new_synapses), dtype=np.bool_)
    conn_buf = np.empty(g_len, dtype=np.float32)
    pot_buf = np.empty(g_len, dtype=np.float32)
    known = np.zeros(b_len, dtype=np.bool_)
    recall = np.zeros(n_len, dtype=np.bool_)  # cells the winners of a known context predict or match
    once = np.zeros(n_len, dtype=np.bool_)  # fired cells' links that match without connecting
    had_winners = np.zeros(b_len, dtype=np.bool_)  # a stream had winners at t-1
    scaled = np.empty(d_len, dtype=np.float32)
    code_error = np.empty((b_len, d_len), dtype=np.float32)
    slack = INDEX_SLACK
    index = reverse_index(perm, presyn, last_learned, n_len, slack)

    for t in range(t_len):
        for b in range(b_len):
            if reset[b, t]:
                cells[b] = 0.0
                winners[b] = 0.0
                columns[b] = 0.0
                predicted[b] = 0.0
                active_overlap[b] = 0.0
                potential_overlap[b] = 0.0
                context_predicted[b] = 0.0
                diverted[b] = 0.0
                matching_columns[b] = 0.0
                predicted_columns[b] = 0.0
                prediction[b] = 0.0
                anomaly[b] = 0.0

        # Column selection: k-WTA on boosted scores, then the duty cycles (KWinners.winners).
        for c in range(c_len):
            boost_values[c] = np.float32(np.exp(np.float32((np.float32(density) - duty[c]) * boost[0])))
        for b in range(b_len):
            for c in range(c_len):
                boosted[c] = scores[b, t, c] * boost_values[c]
            # The k largest: every score above the k-th, then ties at it by lowest index.
            kth = np.partition(boosted, c_len - k_select)[c_len - k_select]
            taken = 0
            for c in range(c_len):
                active_cols[b, c] = boosted[c] > kth
                taken += active_cols[b, c]
            for c in range(c_len):
                if taken < k_select and boosted[c] == kth:
                    active_cols[b, c] = True
                    taken += 1
        if training:
            counters[1] += b_len
            period = min(counters[1], period_max)
            for c in range(c_len):
                count = 0
                for b in range(b_len):
                    count += active_cols[b, c]
                duty[c] = (duty[c] * np.float32(period - b_len) + np.float32(count)) / np.float32(period)
            boost[0] = boost[0] * boost_factor

        # Cells: predicted cells of active columns fire, an unpredicted column bursts; winners
        # (TemporalMemory.activate and choose_winners).
        for cell in range(n_len):
            u = 0
            for s in range(s_len):
                u += last_learned[cell * s_len + s] >= 0
            used[cell] = u
        for b in range(b_len):
            hits = 0
            for n in range(n_len):
                prev_active[b, n] = cells[b, n] > 0 or winners[b, n] > 0  # fired or won at t-1
                new_cells[b, n] = 0.0
                new_winners[b, n] = False
            for c in range(c_len):
                novel[b, c] = False
                matched[b, c] = False
                bursting[b, c] = False
                if not active_cols[b, c]:
                    continue
                # A known context fires only the cells it predicts in a column it predicts
                # (TemporalMemory.activate); a column left with none bursts.
                in_context = False
                if recall_on and diverted[b] > 0:
                    for i in range(m):
                        in_context |= context_predicted[b, c * m + i] > 0
                column_predicted = False
                for i in range(m):
                    n = c * m + i
                    fire[n] = predicted[b, n] * context_predicted[b, n] if in_context else predicted[b, n]
                    column_predicted |= fire[n] > 0
                bursting[b, c] = not column_predicted
                hits += column_predicted
                any_winner = False
                for i in range(m):
                    n = c * m + i
                    new_cells[b, n] = fire[n] if column_predicted else 1.0
                    if new_cells[b, n] > 0 and context_predicted[b, n] > 0:
                        new_winners[b, n] = True
                        any_winner = True
                if any_winner:
                    continue
                novel[b, c] = True
                best_value, best_cell = np.float32(-1.0), 0
                for i in range(m):
                    n = c * m + i
                    value = potential_overlap[b, n, 0]
                    for s in range(1, s_len):
                        value = max(value, potential_overlap[b, n, s])
                    if value > best_value:
                        best_value, best_cell = value, i
                matched[b, c] = best_value >= match_thr
                if matched[b, c]:
                    chosen = best_cell
                else:
                    chosen, lowest = 0, np.float32(np.inf)
                    for i in range(m):
                        value = used[c * m + i] + noise[t, 0, b, c * m + i]
                        if value < lowest:
                            chosen, lowest = i, value
                new_winners[b, c * m + chosen] = True
            anomaly_value = np.float32(1.0) - np.float32(hits) / np.float32(k)
            anomaly_out[b, t] = anomaly_value

        # Learning (PredictiveHebbian.__call__), from what the layer saw at t-1 and t.
        counters[0] += 1
        learn = False
        for b in range(b_len):
            for n in range(n_len):
                learn |= prev_active[b, n]
        if learn:
            count = 0
            for b in range(b_len):
                had_winners[b] = False
                for n in range(n_len):
                    best = 0
                    for s in range(1, s_len):
                        if potential_overlap[b, n, s] > potential_overlap[b, n, best]:
                            best = s
                    best_segment[b, n] = best
                    had_winners[b] |= winners[b, n] > 0
            # Reinforced: segments that predicted a winner of a column that is not novel, and
            # the best matching segment of a novel column's matched winner.
            for b in range(b_len):
                for n in range(n_len):
                    if not new_winners[b, n]:
                        continue
                    c = n // m
                    for s in range(s_len):
                        if novel[b, c]:
                            take = matched[b, c] and s == best_segment[b, n]
                        else:
                            take = active_overlap[b, n, s] >= act_thr
                        if take:
                            rows[count, 0], rows[count, 1] = b, n * s_len + s
                            deltas_a[count], deltas_i[count] = inc, -dec
                            count += 1
            reinforced = count
            adapt(rows, deltas_a, deltas_i, reinforced, perm, presyn, prev_active)
            # Weakened: segments that predicted a cell of a column that stayed inactive.
            wrong = 0
            for b in range(b_len):
                decrement = burst_dec if anomaly[b] > 0 else pred_dec
                for n in range(n_len):
                    if predicted[b, n] <= 0 or active_cols[b, n // m]:
                        continue
                    if diverted[b] > 0 and context_predicted[b, n] <= 0:
                        continue  # another context's cell in a known one (learning.py)
                    for s in range(s_len):
                        if active_overlap[b, n, s] >= act_thr:
                            rows[count + wrong, 0], rows[count + wrong, 1] = b, n * s_len + s
                            deltas_a[count + wrong], deltas_i[count + wrong] = -decrement, 0.0
                            wrong += 1
            adapt(rows[count:], deltas_a[count:], deltas_i[count:], wrong, perm, presyn, prev_active)
            # Growth rows: reinforced segments (only a novel column's matched segment grows
            # unless grow_predicted), then a new segment on each unmatched novel winner.
            for i in range(reinforced):
                b, g = rows[i, 0], rows[i, 1]
                n, s = g // s_len, g % s_len
                grows = grow_predicted or (novel[b, n // m] and matched[b, n // m])
                row_missing[i] = max(new_synapses - int(potential_overlap[b, n, s]), 0) if grows else 0
            count = reinforced
            for b in range(b_len):
                if not had_winners[b]:
                    continue
                for n in range(n_len):
                    c = n // m
                    if new_winners[b, n] and novel[b, c] and not matched[b, c]:
                        # The least recently learned slot, an established segment (one with a
                        # connected synapse) counted `grace` steps younger (learn_segments).
                        slot, oldest = 0, np.int64(0)
                        for s in range(s_len):
                            g = n * s_len + s
                            key = last_learned[g]
                            for j in range(perm.shape[1]):
                                if perm[g, j] >= conn:
                                    key += grace
                                    break
                            if s == 0 or key < oldest:
                                slot, oldest = s, key
                        rows[count, 0], rows[count, 1] = b, n * s_len + slot
                        row_missing[count] = new_synapses
                        count += 1
            for i in range(reinforced, count):
                perm[rows[i, 1]] = 0.0
            fits = True
            if count > 0 and had_winners.any():
                # A random sample of `new_synapses` winners of t-1 per stream, highest score first.
                for b in range(b_len):
                    candidates = np.flatnonzero((winners[b] > 0) & (noise[t, 1, b] > 0))
                    order = candidates[np.argsort(-noise[t, 1, b, candidates], kind="mergesort")]
                    for j in range(new_synapses):
                        sample_valid[b, j] = j < order.size
                        sample[b, j] = order[j] if j < order.size else 0
                fits = grow(rows, row_missing, count, sample, sample_valid, perm, presyn, initial, index)
            for i in range(count):
                last_learned[rows[i, 1]] = counters[0]
            if not fits:  # a cell's list in the reverse index was full: rebuild it with more room
                slack *= 2
                index = reverse_index(perm, presyn, last_learned, n_len, slack)

        # Decoder: normalized delta rule on the prediction made at t-1 (learn_decoder), on the
        # predicted columns' weights only.
        for b in range(b_len):
            if diverted[b] > 0:
                continue  # a known context's prediction teaches the decoder nothing (learning.py)
            total = np.float32(0.0)
            for c in range(c_len):
                total += predicted_columns[b, c]
            rate = np.float32(decoder_rate) / (total + np.float32(1.0))
            for d in range(d_len):
                scaled[d] = (x[b, t, d] - prediction[b, d]) * rate / np.float32(b_len)
            if decoder_bias:
                for d in range(d_len):
                    dec_b[d] += scaled[d]
            add_delta(predicted_columns[b], scaled, dec_wt)

        # ... and the current input from the active columns (decoder_code_rate), every stream's
        # error taken before any stream's update, as the batched rule does.
        if code_rate > 0:
            rate = code_rate / np.float32(k_select + 1)
            for b in range(b_len):
                decode(active_cols[b], dec_b, dec_wt, code_error[b])
                for d in range(d_len):
                    code_error[b, d] = (x[b, t, d] - code_error[b, d]) * rate / np.float32(b_len)
            for b in range(b_len):
                add_delta(active_cols[b], code_error[b], dec_wt)

        # Prediction of t+1 from the cells of t (TemporalMemory.predict), into the state.
        for b in range(b_len):
            for n in range(n_len):
                winners[b, n] = 1.0 if new_winners[b, n] else 0.0
                cells[b, n] = new_cells[b, n]
                cells_out[b, t, n] = new_cells[b, n]
            for c in range(c_len):
                columns[b, c] = 1.0 if active_cols[b, c] else 0.0
            known[b] = False  # carried on as in TemporalMemory.predict ...
            through_burst = False  # ... or through a burst alone
            for c in range(c_len):
                known[b] |= matched[b, c] or (diverted[b] > 0 and novel[b, c] and not bursting[b, c])
                through_burst |= bursting[b, c] and matching_columns[b, c] > 0 and diverted[b] == 1
            through_burst &= not known[b]
            known[b] |= through_burst
            overlaps(cells[b], perm, index, conn, conn_buf, pot_buf)
            matching_columns[b] = 0.0
            for n in range(n_len):
                top = np.float32(0.0)
                once[n] = False
                for s in range(s_len):
                    active_overlap[b, n, s] = conn_buf[n * s_len + s]
                    potential_overlap[b, n, s] = pot_buf[n * s_len + s]
                    top = max(top, conn_buf[n * s_len + s])
                    if pot_buf[n * s_len + s] >= match_thr:
                        matching_columns[b, n // m] = 1.0
                        once[n] |= fresh_steps > 0 and last_learned[n * s_len + s] >= counters[0] - fresh_steps
                predicted[b, n] = 1.0 if top >= act_thr else 0.0
                once[n] &= predicted[b, n] == 0
                context_predicted[b, n] = predicted[b, n]
                predicted_out[b, t, n] = predicted[b, n]
            recalled = False
            if known[b]:
                overlaps(winners[b], perm, index, conn, conn_buf, pot_buf)
                for n in range(n_len):
                    top = np.float32(0.0)
                    top_potential = np.float32(0.0)
                    for s in range(s_len):
                        potential_overlap[b, n, s] = pot_buf[n * s_len + s]
                        top = max(top, conn_buf[n * s_len + s])
                        top_potential = max(top_potential, pot_buf[n * s_len + s])
                    context_predicted[b, n] = 1.0 if top >= act_thr else 0.0
                    recall[n] = top >= act_thr or top_potential >= match_thr
                    recalled |= recall[n] and recall_on
                if recall_on and not recalled:  # new winners: the fired cells' links seen once (seen_once)
                    for n in range(n_len):
                        recall[n] = once[n]
                        recalled |= once[n]
            diverted[b] = 2.0 if through_burst else 1.0 if known[b] else 0.0
            for c in range(c_len):  # a known context's recall stands in for the burst's union
                top = np.float32(0.0)
                for i in range(m):
                    top = max(top, np.float32(recall[c * m + i]) if recalled else predicted[b, c * m + i])
                predicted_columns[b, c] = top
            decode(predicted_columns[b], dec_b, dec_wt, prediction[b])
            prediction_out[b, t] = prediction[b]
            anomaly[b] = anomaly_out[b, t]
