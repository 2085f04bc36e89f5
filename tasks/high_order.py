"""The high-order sequence stream of Cui, Ahmad & Hawkins 2016 and its prequential metrics.

Numpy only, no model: the task, the tests and `benchmarks/sequence_peers.py` all use these
same functions, so every system is scored on the same stream by the same definitions.

Protocol (Cui et al. 2016): sequences drawn uniformly from a set, each
followed by one noise element; symbols relabelled by a random permutation per seed; from the
first sequence that starts at or after element `switch_after` on, the perturbed set (same
shared middles, endings swapped) is used; one continuous stream, no resets.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.high_order_sets import PUBLISHED

# numenta/htmresearch (discrete_sequences/tm/suite.py) draws each noise element from
# range(numSymbols + 1, numSymbols + 5001): a pool of 5,000 symbols, so a noise element
# almost never repeats and cannot be learned. We use the same pool size.
NOISE_SYMBOLS = 5000
ENDINGS = (1, 2, 4)


@dataclass
class Stream:
    """One stream of elements. Arrays have one entry per element."""

    symbols: np.ndarray  # int64: 0..num_symbols-1 sequence symbols, num_symbols.. noise
    scored: np.ndarray  # bool: last element of a sequence (the one that depends on the first)
    start: np.ndarray  # bool: first element of a sequence (where an optional reset goes)
    switch: int  # index of the first element of the first perturbed sequence
    num_symbols: int  # sequence symbols (noise symbols come after them)
    relabel: np.ndarray  # stream label of each symbol of the sets

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + NOISE_SYMBOLS


def load_sets(endings: int, path: str | Path | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(normal, perturbed) sequence sets for `endings` possible endings: the published ones
    (`tasks.high_order_sets`), or those of a file in the schema of `sequences.json`
    ({"sets": {"<endings>": {"normal": [...], "perturbed": [...]}}})."""
    if endings not in ENDINGS:
        raise ValueError(f"task.endings must be one of {ENDINGS}, got {endings}")
    if path is None:
        return PUBLISHED[endings]["normal"], PUBLISHED[endings]["perturbed"]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task.set={path}: no such sequence-set file")
    try:
        sets = json.loads(path.read_text())["sets"][str(endings)]
        return sets["normal"], sets["perturbed"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a sequence-set file (expected sets/{endings}/normal|perturbed): {e!r}") from e


def generate_sets(
    symbols: int, sequences: int, middle: int, endings: int = 1, seed: int = 0
) -> tuple[list[list[int]], list[list[int]]]:
    """(normal, perturbed) sets of the published protocol's shape, drawn at random: groups of
    2 x `endings` sequences share a middle of `middle` symbols (distinct within it); the two
    first elements of a group decide which `endings` symbols can end it, `middle` + 1 steps
    later; the perturbed set gives each first element the other's endings. First elements
    and endings are drawn from the symbols outside their group's middle. Symbols repeat
    across middles about sequences / (2 endings) x middle / symbols times."""
    if endings not in ENDINGS:
        raise ValueError(f"task.endings must be one of {ENDINGS}, got {endings}")
    group = 2 * endings
    if sequences < group or sequences % group:
        raise ValueError(f"task.set_sequences={sequences}: must be a positive multiple of 2 x endings = {group}")
    if middle < 1:
        raise ValueError(f"task.set_middle={middle}: must be >= 1")
    if symbols < middle + 2 + group:
        raise ValueError(f"task.set_symbols={symbols}: a middle of {middle} plus 2 first elements and {group} "
                         f"endings outside it need at least {middle + 2 + group} symbols")
    rng = np.random.default_rng(seed)
    normal, perturbed, prefixes = [], [], set()
    while len(normal) < sequences:
        order = rng.permutation(symbols)
        shared, (a, b), ends = list(order[:middle]), order[middle : middle + 2], order[middle + 2 : middle + 2 + group]
        if (a, *shared) in prefixes or (b, *shared) in prefixes:
            continue  # one prefix, one set of endings: otherwise an ending is not decided by its start
        prefixes |= {(a, *shared), (b, *shared)}
        ends_a, ends_b = ends[:endings], ends[endings:]
        for first, mine, other in ((a, ends_a, ends_b), (b, ends_b, ends_a)):
            normal += [[int(first), *map(int, shared), int(e)] for e in mine]
            perturbed += [[int(first), *map(int, shared), int(e)] for e in other]
    return normal, perturbed


def sets_json(sets: dict[int, tuple[list[list[int]], list[list[int]]]], **about) -> str:
    """Sets in the schema `load_sets` reads, `{endings: (normal, perturbed)}`, with `about`
    (how they were made) beside them."""
    body = {str(e): {"normal": n, "perturbed": p} for e, (n, p) in sets.items()}
    return json.dumps({**about, "sets": body}, indent=1)


def generate(
    normal: list[list[int]],
    perturbed: list[list[int]],
    seed: int,
    length: int = 20000,
    switch_after: int = 10000,
    relabel_seed: int | None = None,
) -> Stream:
    """The stream of `length` elements for one seed (the last sequence may be cut short).
    `relabel_seed` (default: `seed`) draws the symbol relabelling instead; the order of the
    sequences and the noise stay those of `seed` either way."""
    if length < 1 or switch_after < 0:
        raise ValueError(f"length must be >= 1 and switch_after >= 0, got {length}, {switch_after}")
    num_symbols = 1 + max(max(s) for s in normal + perturbed)
    rng = np.random.default_rng(seed)
    relabel = rng.permutation(num_symbols)  # drawn from rng in any case: the order stays the seed's
    if relabel_seed is not None:
        relabel = np.random.default_rng(relabel_seed).permutation(num_symbols)
    symbols, scored, start = [], [], []
    switch = None
    while len(symbols) < length:
        if switch is None and len(symbols) >= switch_after:
            switch = len(symbols)
        sets = normal if switch is None else perturbed
        seq = relabel[sets[rng.integers(len(sets))]]
        symbols += [*seq, num_symbols + rng.integers(NOISE_SYMBOLS)]
        scored += [False] * (len(seq) - 1) + [True, False]
        start += [True] + [False] * len(seq)
    return Stream(
        symbols=np.asarray(symbols[:length], dtype=np.int64),
        scored=np.asarray(scored[:length]),
        start=np.asarray(start[:length]),
        switch=length if switch is None else switch,
        num_symbols=num_symbols,
        relabel=relabel,
    )


def concatenate(parts: list[Stream]) -> Stream:
    """One stream of `parts` in turn (e.g. sets learned one after another); its `switch` is
    where the second part starts. The parts must share the symbols and their relabelling."""
    if any(p.num_symbols != parts[0].num_symbols or not np.array_equal(p.relabel, parts[0].relabel) for p in parts):
        raise ValueError("streams to concatenate must have the same symbols and relabelling")
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return Stream(cat("symbols"), cat("scored"), cat("start"), len(parts[0].symbols) if len(parts) > 1 else
                  parts[0].switch, parts[0].num_symbols, parts[0].relabel)


def is_correct(scores: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Whether each truth is among the top-k of its row of scores (n, num_symbols).

    Ties count against the model: the truth's rank is the number of symbols scoring at least
    as high, so an empty prediction (all scores equal) is wrong, not right by tie-breaking.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth_score = np.take_along_axis(scores, np.asarray(truth)[:, None], axis=1)
    return (scores >= truth_score).sum(axis=1) <= k


def accuracy_curve(positions: np.ndarray, correct: np.ndarray, length: int, window: int = 100) -> np.ndarray:
    """Per element t: accuracy over the last `window` scored elements at or before t.

    positions: sorted element indices of the scored elements; correct: their outcomes.
    NaN until `window` scored elements exist.
    """
    positions, correct = np.asarray(positions), np.asarray(correct, dtype=np.float64)
    if positions.shape != correct.shape or np.any(np.diff(positions) <= 0):
        raise ValueError("positions must be strictly increasing and match correct in shape")
    count = np.searchsorted(positions, np.arange(length), side="right")  # scored up to t
    hits = np.concatenate([[0.0], np.cumsum(correct)])
    curve = np.full(length, np.nan)
    full = count >= window
    curve[full] = (hits[count[full]] - hits[count[full] - window]) / window
    return curve


def window_start(positions: np.ndarray, length: int, window: int = 100) -> np.ndarray:
    """Per element t: index of the oldest scored element in the window at t (-1 if not full)."""
    positions = np.asarray(positions)
    count = np.searchsorted(positions, np.arange(length), side="right")
    return np.where(count >= window, positions[np.maximum(count - window, 0)] if len(positions) else -1, -1)


def summarize(
    positions: np.ndarray, correct: np.ndarray, length: int, switch: int, window: int = 100, span: int = 1000
) -> dict:
    """The task's summary figures for one stream (None where undefined).

    final_accuracy: mean of the curve over the `span` elements before the switch.
    elements_to_95: elements seen (index + 1) when the curve first reaches 95% of it.
    recovery_elements: elements from the switch (inclusive) to the first element at which the
        window holds only post-switch sequences and the curve is back at 95% of it.
    end_accuracy: mean of the curve over the last `span` elements.
    """
    curve = accuracy_curve(positions, correct, length, window)

    def mean(x):
        return None if len(x) == 0 or np.isnan(x).any() else float(np.mean(x))

    final = mean(curve[max(switch - span, 0) : switch])
    to_95 = recovery = None
    if final:  # 95% of nothing is no level to reach
        target = 0.95 * final
        reached = np.flatnonzero(curve >= target)  # NaN compares False
        to_95 = int(reached[0]) + 1 if len(reached) else None
        after = np.flatnonzero((window_start(positions, length, window) >= switch) & (curve >= target))
        recovery = int(after[0]) - switch + 1 if len(after) else None
    return {
        "final_accuracy": final,
        "elements_to_95": to_95,
        "recovery_elements": recovery,
        "end_accuracy": mean(curve[-span:]),
    }
