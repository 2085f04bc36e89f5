"""NAB's scoring rules (Lavin & Ahmad 2015; NAB v1.1), written for this project, vectorised.

Per data file of N rows:
- the first min(floor(0.15 N), 750) rows are the probationary period and are not scored;
- a detection is a row whose anomaly score is >= the threshold;
- a label window [l, r] of w = r - l + 1 rows is worth, at its first (earliest) detected row i,
  tp x S(-(r - i + 1) / w) / S(-1), where S(y) = 2 / (1 + exp(5 y)) - 1 (-1 for y > 3): an
  early detection earns almost tp, one at the right edge almost nothing; later detections in
  the same window add nothing. A window with no detection costs fn;
- a detection outside every window costs fp x S(d / (w' - 1)), d rows after the right edge
  of the last window (width w') before it, so that one just after a window costs little;
  before the first window it costs fp;
- a window counts only if some of its rows are past the probationary period.

A corpus's raw score is the sum over its files. The threshold is one per profile for the whole
corpus: either given (NAB's published `config/thresholds.json`) or the one that maximises the
corpus score (the highest among equal maxima). Normalised: 100 x (raw - null) / (perfect -
null), where null is the score with no detection (every window missed) and perfect is tp x
the number of windows.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Profile:
    """NAB's cost matrix of an application profile (tn has no weight in the score)."""

    name: str
    tp: float
    fp: float
    fn: float


# NAB v1.1's config/profiles.json.
PROFILES = (
    Profile("standard", tp=1.0, fp=0.11, fn=1.0),
    Profile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0),
    Profile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0),
)
# summary.json's key of each profile's normalised score.
SUMMARY_KEYS = {"standard": "nab_standard", "reward_low_FP_rate": "nab_reward_low_fp",
                "reward_low_FN_rate": "nab_reward_low_fn"}


def load_profiles(path: str | Path) -> tuple[Profile, ...]:
    """Profiles from a NAB `profiles.json` ({name: {"CostMatrix": {"tpWeight": ...}}})."""
    data = json.loads(Path(path).read_text())
    return tuple(
        Profile(name, tp=c["tpWeight"], fp=c["fpWeight"], fn=c["fnWeight"])
        for name, spec in data.items()
        for c in [spec["CostMatrix"]]
    )


def scaled_sigmoid(position: np.ndarray) -> np.ndarray:
    """S(y) = 2 / (1 + exp(5 y)) - 1, and -1 beyond y = 3."""
    position = np.asarray(position, dtype=np.float64)
    with np.errstate(over="ignore"):
        value = 2.0 / (1.0 + np.exp(5.0 * position)) - 1.0
    return np.where(position > 3.0, -1.0, value)


MAX_TP = float(scaled_sigmoid(-1.0))


def probation_length(rows: int, fraction: float = 0.15) -> int:
    """The number of leading rows left unscored: min(floor(fraction N), fraction x 5000)."""
    return math.ceil(min(math.floor(fraction * rows), fraction * 5000))


@dataclass
class FileSweep:
    """One file's rows as the scorer sees them, whatever the detector and profile.

    window: (N,) the row's window (0.. within the file), -1 outside every window.
    position: (N,) S() of a detection at the row: S(-(r-i+1)/w) inside a window (the reward
        before scaling by tp / S(-1)), S(d/(w'-1)) or -1 outside (before scaling by fp).
    scored: (N,) past the probationary period.
    """

    name: str
    window: np.ndarray
    position: np.ndarray
    scored: np.ndarray
    windows: int  # label windows of the file

    @property
    def counted(self) -> np.ndarray:
        """Which of the file's windows count: those with a row past the probationary period."""
        return np.isin(np.arange(self.windows), self.window[self.scored])

    def values(self, profile: Profile) -> np.ndarray:
        """What a detection at each row adds: a window's reward, or a false positive's cost."""
        return np.where(self.window >= 0, self.position * (profile.tp / MAX_TP), self.position * profile.fp)


def file_sweep(name: str, rows: int, windows: list[tuple[int, int]], probation: float = 0.15) -> FileSweep:
    """The sweep of a file of `rows` rows with label windows given as (first, last) row indices."""
    window = np.full(rows, -1, dtype=np.int64)
    position = np.full(rows, -1.0)
    index = np.arange(rows)
    previous_end = -1
    for k, (first, last) in enumerate(sorted(windows)):
        if not 0 <= first <= last < rows or first <= previous_end:
            raise ValueError(f"{name}: label window rows {first}..{last} are out of order or outside 0..{rows - 1}")
        width = last - first + 1
        inside = slice(first, last + 1)
        window[inside] = k
        position[inside] = scaled_sigmoid(-(last - index[inside] + 1) / width)
        following = np.arange(last + 1, rows)
        # Rows after this window (until the next one) are scored by their distance from it.
        distance = (following - last) / (width - 1) if width > 1 else np.full(len(following), np.inf)
        position[last + 1 :] = scaled_sigmoid(distance)
        previous_end = last
    scored = index >= probation_length(rows, probation)
    return FileSweep(name, window, position, scored, len(windows))


def window_rows(name: str, times: np.ndarray, windows: list[tuple]) -> list[tuple[int, int]]:
    """Label windows given as (start, end) timestamps -> row indices. Every limit must be one
    of the file's timestamps exactly (NAB's rule)."""
    times = np.asarray(times, dtype="datetime64[ns]")
    rows = []
    for start, end in windows:
        limits = []
        for stamp in (start, end):
            found = np.flatnonzero(times == np.datetime64(str(stamp).replace(" ", "T"), "ns"))
            if len(found) != 1:
                raise ValueError(f"{name}: label window limit {stamp} is not exactly one of the file's timestamps")
            limits.append(int(found[0]))
        rows.append(tuple(limits))
    return rows


@dataclass
class Outcome:
    """A file's (or corpus's) result at one threshold under one profile."""

    score: float
    tp: int  # detected rows inside windows (scored rows only, as NAB counts)
    fp: int  # detected rows outside windows
    fn: int  # undetected rows inside windows
    tn: int
    detected: int  # windows with a detection
    windows: int  # windows that count

    def __add__(self, other: "Outcome") -> "Outcome":
        return Outcome(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def score_file(sweep: FileSweep, scores: np.ndarray, threshold: float, profile: Profile) -> Outcome:
    """A file's NAB score at `threshold` (detections: scores >= threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != sweep.window.shape:
        raise ValueError(f"{sweep.name}: {len(scores)} anomaly scores for {len(sweep.window)} rows")
    values = sweep.values(profile)
    detected = (scores >= threshold) & sweep.scored
    inside = sweep.window >= 0
    false = detected & ~inside
    score = float(values[false].sum())
    counted = sweep.counted
    best = np.full(sweep.windows, -profile.fn)
    hits = detected & inside
    np.maximum.at(best, sweep.window[hits], values[hits])
    score += float(best[counted].sum())
    hit_windows = int(np.isin(np.flatnonzero(counted), sweep.window[hits]).sum())
    tp, fp = int(hits.sum()), int(false.sum())
    return Outcome(score, tp, fp, int((inside & sweep.scored).sum()) - tp, int((~inside & sweep.scored).sum()) - fp,
                   hit_windows, int(counted.sum()))


def null_score(sweeps: list[FileSweep], profile: Profile) -> float:
    """The score of a detector that detects nothing: every counted window missed."""
    return -profile.fn * sum(int(s.counted.sum()) for s in sweeps)


def perfect_score(sweeps: list[FileSweep], profile: Profile) -> float:
    """tp for every label window (NAB counts all windows of the label file here)."""
    return profile.tp * sum(s.windows for s in sweeps)


def normalise(raw: float, sweeps: list[FileSweep], profile: Profile) -> float | None:
    """100 x (raw - null) / (perfect - null); None where the files have no windows."""
    null, perfect = null_score(sweeps, profile), perfect_score(sweeps, profile)
    return None if perfect == null else 100.0 * (raw - null) / (perfect - null)


def sweep_thresholds(sweeps: list[FileSweep], scores: list[np.ndarray], profile: Profile):
    """The corpus score at every distinct anomaly score taken as the threshold, highest
    first, after 1.1 (no detection). Returns (thresholds, raw scores)."""
    values, keys, window = [], [], []
    offset = 0
    for sweep, s in zip(sweeps, scores):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != sweep.window.shape:
            raise ValueError(f"{sweep.name}: {len(s)} anomaly scores for {len(sweep.window)} rows")
        keys.append(s[sweep.scored])
        values.append(sweep.values(profile)[sweep.scored])
        w = sweep.window[sweep.scored]
        window.append(np.where(w >= 0, w + offset, -1))
        offset += sweep.windows
    keys, values, window = np.concatenate(keys), np.concatenate(values), np.concatenate(window)
    order = np.argsort(-keys, kind="stable")
    keys, values, window = keys[order], values[order], window[order]
    # What entering each row adds: a false positive its cost; a window row the rise of its
    # window's best reward so far (the first of its rows starts from the window's -fn).
    gain = np.where(window < 0, values, 0.0)
    rows = np.flatnonzero(window >= 0)
    rows = rows[np.argsort(window[rows], kind="stable")]  # by window, in threshold order
    group = window[rows]
    span = 2.0 * (abs(profile.tp) / MAX_TP + abs(profile.fn)) + 1.0
    best = np.maximum.accumulate(values[rows] + span * group) - span * group  # running max per window
    first = np.r_[True, group[1:] != group[:-1]]
    before = np.where(first, -profile.fn, np.r_[0.0, best[:-1]])
    gain[rows] = best - before
    total = null_score(sweeps, profile) + np.cumsum(gain)
    last = np.flatnonzero(np.r_[keys[1:] != keys[:-1], True])  # the last row of each distinct score
    return np.r_[1.1, keys[last]], np.r_[null_score(sweeps, profile), total[last]]


def optimise_threshold(sweeps: list[FileSweep], scores: list[np.ndarray], profile: Profile) -> tuple[float, float]:
    """(threshold, raw corpus score) of the best threshold; the highest of equal ones."""
    thresholds, raw = sweep_thresholds(sweeps, scores, profile)
    best = int(np.argmax(raw))
    return float(thresholds[best]), float(raw[best])


@dataclass
class ProfileResult:
    """A corpus's score under one profile."""

    profile: Profile
    threshold: float
    raw: float
    score: float  # normalised
    files: dict[str, Outcome]  # per file, at the threshold
    groups: dict[str, float | None]  # normalised per group (the folder of the file); None: no windows


def score_corpus(
    sweeps: dict[str, FileSweep],
    scores: dict[str, np.ndarray],
    profiles=PROFILES,
    thresholds: dict[str, float] | None = None,
) -> dict[str, ProfileResult]:
    """Score every file of `sweeps` (names "<group>/<file>.csv") with `scores`, per profile, at
    the given thresholds ({profile name: threshold}) or at the optimised one."""
    missing = sorted(set(sweeps) - set(scores))
    if missing:
        raise ValueError(f"no anomaly scores for {len(missing)} of {len(sweeps)} files: {', '.join(missing[:5])}")
    names = sorted(sweeps)
    listed, values = [sweeps[n] for n in names], [scores[n] for n in names]
    results = {}
    for profile in profiles:
        if thresholds is None:
            threshold, _ = optimise_threshold(listed, values, profile)
        else:
            threshold = float(thresholds[profile.name])
        files = {n: score_file(sweeps[n], scores[n], threshold, profile) for n in names}
        raw = sum(o.score for o in files.values())
        groups = {}
        for group in sorted({n.split("/")[0] for n in names}):
            members = [n for n in names if n.split("/")[0] == group]
            groups[group] = normalise(sum(files[n].score for n in members), [sweeps[n] for n in members], profile)
        results[profile.name] = ProfileResult(profile, threshold, raw, normalise(raw, listed, profile), files, groups)
    return results
