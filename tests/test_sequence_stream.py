"""The high-order stream generator and the pure metric functions, on inputs whose answers are
known by hand."""

import os
from pathlib import Path

import numpy as np
import pytest

from tasks.high_order import (
    NOISE_SYMBOLS,
    accuracy_curve,
    generate,
    generate_sets,
    is_correct,
    load_sets,
    summarize,
)

DATA = Path(os.environ.get("PREDICTIVE_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
SETS = DATA / "high_order_sequences" / "sequences.json"


@pytest.mark.skipif(not SETS.is_file(), reason=f"{SETS} not present (the published copy to compare with)")
@pytest.mark.parametrize("endings", [1, 2, 4])
def test_the_shipped_sets_are_the_published_file(endings):
    assert load_sets(endings) == load_sets(endings, SETS)


@pytest.mark.parametrize("endings", [1, 2, 4])
def test_stream_follows_the_protocol(endings):
    normal, perturbed = load_sets(endings)
    s = generate(normal, perturbed, seed=1)
    n = s.num_symbols
    assert n == {1: 10, 2: 12, 4: 16}[endings]
    assert len(s.symbols) == 20000 and s.switch >= 10000
    assert s.start[s.switch] and not s.start[10000:s.switch].any()  # first boundary at/after 10,000
    starts = np.flatnonzero(s.start)
    sets = dict(zip(("normal", "perturbed"), load_sets(endings)))
    assert sorted(s.relabel) == list(range(n))
    original = np.argsort(s.relabel)  # stream label -> set symbol
    for a, b in zip(starts[:-1], starts[1:]):
        seq, noise = s.symbols[a : b - 1], s.symbols[b - 1]
        assert n <= noise < n + NOISE_SYMBOLS  # one noise element after each sequence
        assert s.scored[b - 2] and s.scored[a:b].sum() == 1  # only the last element is scored
        assert original[seq].tolist() in sets["perturbed" if a >= s.switch else "normal"], a
    assert set(s.symbols[~s.scored & (s.symbols < n)]) | set(s.symbols[s.scored]) <= set(range(n))


def test_same_seed_same_stream_other_seed_other_labels():
    normal, perturbed = load_sets(1)
    a, b, c = generate(normal, perturbed, 0), generate(normal, perturbed, 0), generate(normal, perturbed, 1)
    assert np.array_equal(a.symbols, b.symbols) and a.switch == b.switch
    assert not np.array_equal(a.symbols[:50], c.symbols[:50])


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="task.endings"):
        load_sets(3)
    with pytest.raises(FileNotFoundError, match="task.set=.*nowhere.json"):
        load_sets(1, tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_sets(1, tmp_path / "bad.json")


def test_top_k_correct_ties_count_against():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.4, 0.1], [0.0, 0.0, 0.0], [0.3, 0.3, 0.1]])
    truth = np.array([1, 1, 0, 0])
    assert is_correct(scores, truth, 1).tolist() == [True, False, False, False]
    assert is_correct(scores, truth, 2).tolist() == [True, True, False, True]


def test_accuracy_curve_by_hand():
    # Scored at elements 1, 3, 4, 8 with outcomes 1, 0, 1, 1; window of 2.
    curve = accuracy_curve(np.array([1, 3, 4, 8]), np.array([1, 0, 1, 1]), length=10, window=2)
    expected = [np.nan, np.nan, np.nan, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    np.testing.assert_array_equal(curve, expected)
    with pytest.raises(ValueError, match="increasing"):
        accuracy_curve(np.array([3, 1]), np.array([1, 1]), 5)


def test_summary_by_hand():
    # One scored element every 2 elements (odd indices), 40 elements, switch at 20, window 2,
    # span 4. Outcomes: wrong until element 9, right until the switch, wrong for 3 scored
    # elements after it, then right.
    positions = np.arange(1, 40, 2)
    correct = (positions >= 9) & ~((positions >= 20) & (positions < 26))
    s = summarize(positions, correct, length=40, switch=20, window=2, span=4)
    assert s["final_accuracy"] == 1.0  # curve at 16..19 is 1
    assert s["elements_to_95"] == 12  # window {9, 11} full of hits at element 11
    # Window {27, 29} is post-switch and all right at element 29: 29 - 20 + 1 elements.
    assert s["recovery_elements"] == 10
    assert s["end_accuracy"] == 1.0


def test_summary_undefined_parts_are_none():
    positions = np.arange(0, 30, 3)
    s = summarize(positions, np.zeros(10, bool), length=30, switch=5, window=4, span=5)
    assert s["final_accuracy"] is None and s["elements_to_95"] is None and s["recovery_elements"] is None
    assert s["end_accuracy"] == 0.0


@pytest.mark.parametrize("endings", [1, 2, 4])
def test_generated_sets_follow_the_protocol(endings):
    normal, perturbed = generate_sets(symbols=20, sequences=8 * endings, middle=9, endings=endings, seed=3)
    assert len(normal) == len(perturbed) == 8 * endings
    assert all(len(s) == 11 for s in normal)  # first, a middle of 9, the ending
    for sets in (normal, perturbed):
        decided = {}
        for seq in sets:  # the ending depends on the first element alone, given the middle
            decided.setdefault((seq[0], *seq[1:-1]), set()).add(seq[-1])
        assert all(len(e) == endings for e in decided.values())
    by_prefix = lambda sets: {tuple(s[:-1]): set() for s in sets}  # noqa: E731
    assert by_prefix(normal) == by_prefix(perturbed)  # same prefixes ...
    assert all(s not in normal for s in perturbed)  # ... other endings after the switch
    assert generate_sets(20, 8 * endings, 9, endings, seed=4) != (normal, perturbed)
    assert generate_sets(20, 8 * endings, 9, endings, seed=3) == (normal, perturbed)


@pytest.mark.parametrize("settings, name", [
    (dict(symbols=12, sequences=8, middle=9), "task.set_symbols=12"),  # 9 + 2 + 2 > 12
    (dict(symbols=20, sequences=6, middle=4, endings=2), "task.set_sequences=6"),
    (dict(symbols=20, sequences=8, middle=0), "task.set_middle=0"),
])
def test_impossible_generated_sets_are_named(settings, name):
    with pytest.raises(ValueError, match=name):
        generate_sets(**settings)


def test_a_run_writes_the_sets_it_used(tmp_path):
    from tasks.sequence import SequenceTask

    SequenceTask(set="generated", set_symbols=14, set_sequences=8, set_middle=6, output_dir=tmp_path,
                 length=200).write_inputs()  # the harness calls it as training starts
    written = tmp_path / "sequences.json"
    assert load_sets(1, written) == generate_sets(14, 8, 6, 1, 0)
    SequenceTask(set=str(written), length=200)  # a written file reads back as a set
