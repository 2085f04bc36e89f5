"""Settings chosen on part of NAB's corpus, scored on the rest (k-fold over its files).

NAB has no held-out part: a detector's settings are chosen on the corpus they are scored on.
Files are independent (a fresh model per file), so one corpus run per candidate setting gives
every file's scores under it, and a k-fold estimate costs no further runs: for each fold, the
candidate with the best score on the other folds' files is taken for this fold's files. The
assembled scores are then scored as NAB scores any detector (threshold optimised over the
corpus), and also with each fold's thresholds taken from the other folds (nothing about the
held-out files chosen on them).

Folds are stratified by group (the folder of the file): each group's files are shuffled by
`seed` and dealt out in turn.
"""

from dataclasses import dataclass

import numpy as np

from tasks.nab.scoring import PROFILES, FileSweep, normalise, score_corpus, score_file


def folds_of(names: list[str], k: int, seed: int) -> list[list[str]]:
    """`k` disjoint folds covering `names` ("<group>/<file>.csv"), each group spread evenly."""
    if k < 2:
        raise ValueError(f"folds must be >= 2, got {k}")
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(k)]
    turn = 0
    for group in sorted({n.split("/")[0] for n in names}):
        members = sorted(n for n in names if n.split("/")[0] == group)
        for i in rng.permutation(len(members)):
            folds[turn % k].append(members[i])
            turn += 1
    return [sorted(f) for f in folds]


@dataclass
class HeldOut:
    """One split's outcome."""

    chosen: list[str]  # per fold, the candidate taken for its files
    optimised: dict[str, float]  # per profile: normalised, threshold optimised over the assembled corpus
    held_out: dict[str, float]  # per profile: normalised, each fold at the threshold of the other folds


def held_out(sweeps: dict[str, FileSweep], candidates: dict[str, dict[str, np.ndarray]], folds: list[list[str]],
             select: str = "standard") -> HeldOut:
    """Score `candidates` ({name: {file: anomaly scores}}) with each fold's candidate and
    thresholds chosen on the other folds, by the `select` profile's normalised score."""
    if select not in {p.name for p in PROFILES}:
        raise ValueError(f"select must be one of {[p.name for p in PROFILES]}, got {select!r}")
    if not candidates:
        raise ValueError("no candidates to choose from")
    listed = sorted(n for fold in folds for n in fold)
    if listed != sorted(sweeps):
        raise ValueError("the folds must hold every file of the corpus once")
    assembled, chosen, raw = {}, [], {p.name: 0.0 for p in PROFILES}
    for fold in folds:
        rest = {n: sweeps[n] for n in sweeps if n not in fold}
        reports = {c: score_corpus(rest, {n: s[n] for n in rest}) for c, s in candidates.items()}
        best = max(reports, key=lambda c: reports[c][select].score or 0.0)  # the first of equal ones
        chosen.append(best)
        for n in fold:
            assembled[n] = candidates[best][n]
            for p in PROFILES:
                raw[p.name] += score_file(sweeps[n], assembled[n], reports[best][p.name].threshold, p).score
    report = score_corpus(sweeps, assembled)
    return HeldOut(chosen, {p.name: report[p.name].score for p in PROFILES},
                   {p.name: normalise(raw[p.name], list(sweeps.values()), p) for p in PROFILES})
