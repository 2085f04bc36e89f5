"""NAB scores of settings chosen on other files of the corpus (tasks/nab/heldout.py).

Each RUN is a finished `task=nab` run (its directory, with summary.json and the results in
NAB's layout), one per candidate setting, e.g. the runs of one Hydra multirun:

    python train.py -m task=nab model.active_columns=20,30,40 hydra.sweep.dir=multirun/nab_grid
    python benchmarks/nab_heldout.py multirun/nab_grid/*/ --folds 2 --splits 5

Prints every candidate's score on the whole corpus, then for each split (a seed of the
stratified folds) which candidate each fold got and the corpus score of the assembled
results, with thresholds optimised over the corpus (NAB's rule) and held out as well.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.nab.corpus import load_windows, read_results  # noqa: E402
from tasks.nab.heldout import folds_of, held_out  # noqa: E402
from tasks.nab.scoring import PROFILES, score_corpus  # noqa: E402

SHORT = {"standard": "standard", "reward_low_FP_rate": "low_FP", "reward_low_FN_rate": "low_FN"}


def load_run(path: Path, windows: dict) -> tuple[list[str], dict, dict]:
    """(overrides, sweeps, scores) of one finished run."""
    summary = path / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (not a finished task=nab run)")
    info = json.loads(summary.read_text())
    if info.get("status") != "completed" or not info.get("complete"):
        raise ValueError(f"{path}: the run did not finish the whole corpus (status {info.get('status')!r})")
    overrides = path / ".hydra" / "overrides.yaml"
    lines = overrides.read_text().splitlines() if overrides.is_file() else []
    sweeps, scores = read_results(path / "nab", info["detector"], windows)
    return [line[2:].strip() for line in lines if line.startswith("- ")] or [str(path)], sweeps, scores


def row(figures: dict) -> str:
    return " / ".join(f"{figures[p.name]:6.2f}" for p in PROFILES)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished task=nab run directories, one per candidate")
    p.add_argument("--root", type=Path, default=Path(os.environ.get("PREDICTIVE_DATA_DIR", "data")) / "nab",
                   help="the corpus (its labels/combined_windows.json)")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--splits", type=int, default=5, help="fold seeds 0 .. splits-1")
    p.add_argument("--select", default="standard", choices=[q.name for q in PROFILES],
                   help="the profile whose score picks a fold's candidate")
    args = p.parse_args()
    if args.splits < 1:
        p.error(f"--splits must be >= 1, got {args.splits}")

    windows = load_windows(args.root / "labels" / "combined_windows.json")
    runs = [load_run(path, windows) for path in args.runs]
    sweeps = runs[0][1]
    common = set.intersection(*(set(overrides) for overrides, _, _ in runs))
    candidates = {}
    for path, (overrides, _, scores) in zip(args.runs, runs):
        name = " ".join(o for o in overrides if o not in common) or "(no other override)"
        if name in candidates:
            raise ValueError(f"{path}: two runs with the same overrides ({name})")
        candidates[name] = scores
    names = list(candidates)
    label = {n: f"c{i}" for i, n in enumerate(names)}

    shared = [o for o in runs[0][0] if o in common]
    print(f"candidates, each run with {' '.join(shared) or 'no override'} and")
    print(f"(whole corpus, threshold optimised; {' / '.join(SHORT.values())}):")
    for n in names:
        report = score_corpus(sweeps, candidates[n])
        print(f"  {label[n]:>4}  {row({q: r.score for q, r in report.items()})}  {n}")

    print(f"\n{args.folds} folds stratified by group, chosen by {args.select}:")
    optimised, kept = [], []
    for split in range(args.splits):
        result = held_out(sweeps, candidates, folds_of(sorted(sweeps), args.folds, split), args.select)
        optimised.append([result.optimised[q.name] for q in PROFILES])
        kept.append([result.held_out[q.name] for q in PROFILES])
        print(f"  split {split}: folds took {', '.join(label[c] for c in result.chosen)}; "
              f"threshold optimised {row(result.optimised)}; held out {row(result.held_out)}")
    for title, figures in (("threshold optimised", optimised), ("threshold held out", kept)):
        mean, low, high = np.mean(figures, 0), np.min(figures, 0), np.max(figures, 0)
        spans = " / ".join(f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in zip(mean, low, high))
        print(f"mean over {args.splits} splits, {title}: {spans}")


if __name__ == "__main__":
    main()
