"""NAB scoring and the anomaly likelihood, checked against NAB's published outputs."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.nab.corpus import load_windows, read_results, result_path
from tasks.nab.heldout import folds_of, held_out
from tasks.nab.likelihood import anomaly_likelihood, spatial_anomaly
from tasks.nab.scoring import (
    MAX_TP,
    PROFILES,
    file_sweep,
    load_profiles,
    optimise_threshold,
    probation_length,
    score_corpus,
    score_file,
    sweep_thresholds,
)

NAB = Path(os.environ["PREDICTIVE_DATA_DIR"]) / "nab"
REFERENCE = NAB / "reference"
# NAB's scores of Numenta's HTM detector (reference/results/final_results.json and NAB's README).
OPTIMISED = {"standard": 70.10, "reward_low_FP_rate": 63.21, "reward_low_FN_rate": 74.32}
PUBLISHED = {"standard": 70.10, "reward_low_FP_rate": 63.12, "reward_low_FN_rate": 74.32}


@pytest.fixture(scope="module")
def numenta():
    windows = load_windows(NAB / "labels" / "combined_windows.json")
    sweeps, scores = read_results(REFERENCE / "results", "numenta", windows)
    return windows, sweeps, scores


def test_profiles_are_nabs():
    assert load_profiles(REFERENCE / "config" / "profiles.json") == PROFILES


def test_probationary_period():
    assert probation_length(4032) == 604  # floor(0.15 x 4032)
    assert probation_length(1127) == 169
    assert probation_length(22695) == 750  # capped at 0.15 x 5000
    assert probation_length(5000) == 750 and probation_length(4999) == 749


def test_numenta_reference_optimised_threshold(numenta):
    _, sweeps, scores = numenta
    results = score_corpus(sweeps, scores)
    for name, expected in OPTIMISED.items():
        assert results[name].score == pytest.approx(expected, abs=0.05), name
    assert results["standard"].raw == pytest.approx(46.634450197, abs=1e-6)  # NAB's unnormalised score


def test_numenta_reference_published_thresholds(numenta):
    _, sweeps, scores = numenta
    published = json.loads((REFERENCE / "config" / "thresholds.json").read_text())["numenta"]
    results = score_corpus(sweeps, scores, thresholds={k: v["threshold"] for k, v in published.items()})
    for name, expected in PUBLISHED.items():
        assert results[name].score == pytest.approx(expected, abs=0.05), name
        assert results[name].raw == pytest.approx(published[name]["score"], abs=1e-6), name


def test_perfect_and_null_detectors(numenta):
    windows, sweeps, _ = numenta
    perfect = {name: _perfect(sweep) for name, sweep in sweeps.items()}
    null = {name: np.full(len(sweep.window), 0.5) for name, sweep in sweeps.items()}
    for profile, result in score_corpus(sweeps, perfect).items():
        assert result.score == pytest.approx(100.0), profile
    for profile, result in score_corpus(sweeps, null).items():
        assert result.score == pytest.approx(0.0), profile
        assert result.threshold == 1.1  # detecting nothing is the best a constant can do


def test_one_window_by_hand():
    """20 rows, probation 3 (floor(0.15 x 20)), one window of rows 10..14 (w = 5)."""
    sweep = file_sweep("g/f.csv", 20, [(10, 14)])
    standard = PROFILES[0]
    s = np.zeros(20)
    s[12] = 1.0  # third row of the window: position -(14 - 12 + 1)/5 = -0.6
    reward = 2 / (1 + np.exp(5 * -0.6)) - 1
    assert score_file(sweep, s, 0.5, standard).score == pytest.approx(reward / MAX_TP)
    s[13] = 1.0  # a later detection in the same window adds nothing
    assert score_file(sweep, s, 0.5, standard).score == pytest.approx(reward / MAX_TP)
    s[16] = 1.0  # 2 rows after the window: costs fp x S(2 / 4)
    outcome = score_file(sweep, s, 0.5, standard)
    assert outcome.score == pytest.approx(reward / MAX_TP + 0.11 * (2 / (1 + np.exp(2.5)) - 1))
    assert (outcome.tp, outcome.fp, outcome.detected, outcome.windows) == (2, 1, 1, 1)
    s[5] = 1.0  # before any window: costs fp in full
    assert score_file(sweep, s, 0.5, standard).score == pytest.approx(outcome.score - 0.11)
    s[1] = 1.0  # in the probationary period: not scored
    assert score_file(sweep, s, 0.5, standard).score == pytest.approx(outcome.score - 0.11)
    assert score_file(sweep, np.zeros(20), 0.5, standard).score == -1.0  # a missed window costs fn


def test_sweep_equals_scoring_at_every_threshold():
    """The vectorised corpus sweep gives, at each threshold, the sum of the files' scores."""
    rng = np.random.default_rng(0)
    sweeps = [file_sweep("a/1.csv", 300, [(80, 119), (200, 239)]), file_sweep("a/2.csv", 200, [(150, 189)]),
              file_sweep("b/3.csv", 150, [])]
    scores = [np.round(rng.random(len(s.window)), 2) for s in sweeps]  # ties on purpose
    for profile in PROFILES:
        thresholds, raw = sweep_thresholds(sweeps, scores, profile)
        assert np.all(np.diff(thresholds) < 0)
        for threshold, total in zip(thresholds, raw):
            assert total == pytest.approx(sum(score_file(w, s, threshold, profile).score
                                              for w, s in zip(sweeps, scores)), abs=1e-9)
        best, value = optimise_threshold(sweeps, scores, profile)
        assert value == pytest.approx(raw.max()) and best == thresholds[np.argmax(raw)]


def test_likelihood_reproduces_numentas_from_its_raw_scores(numenta):
    """HTM's likelihood of the published raw scores, with the spatial-anomaly rule of NAB's HTM
    detector, gives the published anomaly scores (to their printed precision) and score."""
    windows, sweeps, _ = numenta
    ours = {}
    for name in windows:
        data = pd.read_csv(result_path(REFERENCE / "results", "numenta", name))
        period = probation_length(len(data))
        score = anomaly_likelihood(data.raw_score.values, data.value.values, period // 2, period - period // 2)
        score[spatial_anomaly(data.value.values, 0.05)] = 1.0
        assert np.abs(score - data.anomaly_score.values).max() < 1e-4, name
        ours[name] = score
    assert score_corpus(sweeps, ours)["standard"].score == pytest.approx(70.10, abs=0.05)


def test_likelihood_range_and_no_look_ahead():
    rng = np.random.default_rng(1)
    raw = rng.random(3000) ** 4
    values = rng.normal(size=3000)
    full = anomaly_likelihood(raw, values, 200, 200, history=1000, reestimate=50)
    assert np.all((full >= 0) & (full <= 1)) and not np.isnan(full).any()
    assert full[:400].tolist() == pytest.approx([0.0301029995] * 400)  # 0.5 before the first fit
    changed_raw, changed_values = raw.copy(), values.copy()
    changed_raw[1500:], changed_values[1500:] = 1.0, 100.0
    prefix = anomaly_likelihood(changed_raw, changed_values, 200, 200, history=1000, reestimate=50)
    np.testing.assert_array_equal(prefix[:1500], full[:1500])
    # Raw scores of 1 from t=1500 on: the 10-record average leaves the fit at once (the
    # highest score of the stream at t=1504), and the records after it are held at the yellow
    # level (tail 1e-3: 0.3), one alert per event.
    assert prefix[1504] > 0.6 > full[400:].max()
    assert prefix[1505:1550] == pytest.approx(0.3)  # until the next fit (every 50 here)


def test_spatial_anomaly():
    values = np.array([5.0, 5.0, 6.0, 10.0, 6.2, 10.2, 4.0, 3.0])
    # range before t=3: 5..6 (margin 0.05): 10 leaves it; 10.2 is within 5% of 5..10; 4.0 is
    # below 5 - 0.26; 3.0 is below 4 - 0.31.
    assert spatial_anomaly(values, 0.05).tolist() == [False, False, False, True, False, False, True, True]


def _perfect(sweep) -> np.ndarray:
    """1 at each window's first row, 0 elsewhere."""
    s = np.zeros(len(sweep.window))
    starts = np.flatnonzero(np.diff(np.r_[-1, sweep.window]) > 0)
    s[starts[sweep.window[starts] >= 0]] = 1.0
    return s


def test_folds_are_stratified_disjoint_and_seeded(numenta):
    _, sweeps, _ = numenta
    names = sorted(sweeps)
    folds = folds_of(names, 2, seed=0)
    assert sorted(folds[0] + folds[1]) == names and not set(folds[0]) & set(folds[1])
    for group in {n.split("/")[0] for n in names}:
        sizes = [sum(n.startswith(group + "/") for n in f) for f in folds]
        assert abs(sizes[0] - sizes[1]) <= 1, group
    assert folds_of(names, 2, seed=0) == folds and folds_of(names, 2, seed=1) != folds
    with pytest.raises(ValueError, match="folds must be >= 2"):
        folds_of(names, 1, seed=0)


def test_held_out_scores_one_candidate_as_the_corpus_does(numenta):
    _, sweeps, scores = numenta
    result = held_out(sweeps, {"numenta": scores}, folds_of(sorted(sweeps), 2, seed=0))
    assert result.chosen == ["numenta", "numenta"]
    for name, expected in OPTIMISED.items():
        assert result.optimised[name] == pytest.approx(expected, abs=0.05), name
        assert result.held_out[name] <= result.optimised[name] + 1e-9, name  # thresholds chosen elsewhere


def test_held_out_never_picks_for_a_fold_by_its_own_files(numenta):
    """A candidate perfect on one fold's files and silent on the other's is chosen for the
    other fold only: the assembled results detect nothing."""
    _, sweeps, _ = numenta
    folds = folds_of(sorted(sweeps), 2, seed=0)
    silent = {n: np.zeros(len(s.window)) for n, s in sweeps.items()}
    first = {**silent, **{n: _perfect(sweeps[n]) for n in folds[0]}}
    second = {**silent, **{n: _perfect(sweeps[n]) for n in folds[1]}}
    result = held_out(sweeps, {"first": first, "second": second}, folds)
    assert result.chosen == ["second", "first"]
    for name in OPTIMISED:
        assert result.optimised[name] == pytest.approx(0.0, abs=1e-9), name
    assert score_corpus(sweeps, first)["standard"].score > 40  # on its own the candidate scores well
    with pytest.raises(ValueError, match="every file"):
        held_out(sweeps, {"first": first}, [folds[0]])
