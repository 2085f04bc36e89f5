"""HTM's anomaly likelihood (Ahmad, Lavin, Purdy & Agha 2017), computed prequentially.

A raw anomaly score (the share of active columns that were not predicted) is noisy: some
streams are always a little unpredictable. The likelihood asks instead how unusual the recent
raw scores are for this stream:

- a short moving average of the raw scores (the last `averaging` records, this one included);
- a normal distribution fitted to those averages over the recent history (at most `history`
  records before this one, leaving out the first `learning` records of the stream, which the
  model spends learning), refitted every `reestimate` records; the mean is kept >= 0.03 and
  the variance >= 0.0003 so a perfectly predicted stream does not make every blip a
  catastrophe; a stream whose values have been flat (variance < 1.5e-5) gets an
  uninformative fit (nothing is unusual);
- the tail probability q of the current average under that fit (two-sided around the mean,
  as in HTM: an average below the mean is as unusual as one above it);
- a tail probability in the red zone (q <= 1e-5) right after another one is raised to 1e-3:
  one alert per event, not one per record;
- the score: log(q + 1e-10) / log(1e-10), which spreads the interesting tail (q from 1e-3
  to 1e-10) over [0.3, 1]; 0.5 (score 0.030) before the first fit.

Every value at record t uses records <= t only, so the scores of a prefix do not change
when later records change.
"""

import math

import numpy as np
from scipy.special import erfc

RED, YELLOW = 1e-5, 1e-3
LOG_FLOOR = 1e-10


def moving_average(raw: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at every t (fewer at the start)."""
    total = np.cumsum(np.r_[0.0, raw])
    t = np.arange(1, len(raw) + 1)
    start = np.maximum(t - window, 0)
    return (total[t] - total[start]) / (t - start)


def tail_probability(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """P(X >= x) for X ~ N(mean, std): only raw scores above the usual are unusual."""
    return 0.5 * erfc((x - mean) / (std * math.sqrt(2.0)))


def log_scale(q: np.ndarray) -> np.ndarray:
    """A tail probability -> [0, 1]: log(q + 1e-10) / log(1e-10)."""
    return np.clip(np.log(q + LOG_FLOOR) / math.log(LOG_FLOOR), 0.0, 1.0)


def fits(raw: np.ndarray, values: np.ndarray, learning: int, estimation: int, history: int, averaging: int,
         reestimate: int):
    """The normal fit in force at each record: (mean, std) arrays, NaN before the first fit.
    A fit sees the moving averages of the raw scores within its history alone."""
    n = len(raw)
    mean, std = np.full(n, np.nan), np.full(n, np.nan)
    start = learning + estimation
    refits = [t for t in range(start, n) if t == start or t % reestimate == 0]
    for k, t in enumerate(refits):
        first = max(0, t - history)  # the history: records first .. t-1
        skip = min(t, max(0, learning - first))  # the learning period, as far as it is still in view
        sample = moving_average(raw[first:t], averaging)[skip:]
        flat = values[first + skip : t]
        if len(sample) == 0 or np.var(flat) < 1.5e-5:
            m, s = 0.5, 1e6  # uninformative: nothing is unusual
        else:
            m, s = max(sample.mean(), 0.03), math.sqrt(max(sample.var(), 0.0003))
        until = refits[k + 1] if k + 1 < len(refits) else n
        mean[t:until], std[t:until] = m, s
    return mean, std


def anomaly_likelihood(
    raw: np.ndarray,
    values: np.ndarray,
    learning: int,
    estimation: int,
    history: int = 8640,
    averaging: int = 10,
    reestimate: int = 100,
) -> np.ndarray:
    """Log-scaled anomaly likelihood in [0, 1] of every record, from the raw scores and the
    input values (for the flat-stream check). `learning` + `estimation` records pass before
    the first fit; NAB's HTM detector uses half of the probationary period for each."""
    raw, values = np.asarray(raw, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if raw.shape != values.shape or raw.ndim != 1:
        raise ValueError(f"raw scores {raw.shape} and values {values.shape} must be two equal 1-d arrays")
    if min(learning, estimation) < 0 or min(history, averaging, reestimate) < 1:
        raise ValueError("likelihood: learning, estimation >= 0 and history, averaging, reestimate >= 1 required")
    average = moving_average(raw, averaging)
    mean, std = fits(raw, values, learning, estimation, history, averaging, reestimate)
    fitted = ~np.isnan(mean)
    q = np.full(len(raw), 0.5)
    q[fitted] = tail_probability(average[fitted], mean[fitted], std[fitted])
    # The record before, under the same fit (the first record has none: not red).
    before = np.ones(len(raw))
    before[1:][fitted[1:]] = tail_probability(average[:-1][fitted[1:]], mean[1:][fitted[1:]], std[1:][fitted[1:]])
    q = np.where((q <= RED) & (before <= RED), YELLOW, q)
    return log_scale(q)


def spatial_anomaly(values: np.ndarray, tolerance: float) -> np.ndarray:
    """True where a value leaves the range of the values before it by more than `tolerance` x
    that range (HTM's NAB detector: such a record's score is 1). Needs a range: not while the
    values seen so far are all equal."""
    values = np.asarray(values, dtype=np.float64)
    low = np.minimum.accumulate(values)
    high = np.maximum.accumulate(values)
    low, high = np.r_[np.nan, low[:-1]], np.r_[np.nan, high[:-1]]  # of the records before t
    margin = (high - low) * tolerance
    with np.errstate(invalid="ignore"):
        return (high > low) & ((values > high + margin) | (values < low - margin))
