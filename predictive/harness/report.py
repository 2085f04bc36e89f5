"""Compare runs: mean +- std per learning mode and model of every numeric summary metric,
as a markdown table and PNG plots, readable without W&B.

    python -m predictive.harness.report multirun/2026-01-01_12-00-00   # any dir holding runs

A run is any folder below DIR with a summary.json (written by every `train.py` run; a run's
`evaluate/` re-test is not another run); its `learning` and `model` entries name its row,
and its curves.json (streaming tasks) gives the learning curves. `train.py -m` writes the
report itself at the end of the sweep (`ComparisonCallback`, configured under hydra.callbacks
in configs/config.yaml).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback

from predictive.harness.continual import draw_matrix
from predictive.harness.files import save_figure, write_text

KEYS = ("task", "learning", "model")
VARIANT = "variant"  # a run's own label beside the three (e.g. NAB's raw-score row), when it has one
HEADLINE = ("steps_per_second", "time_steps_per_second", "peak_memory_mb")
CONTINUAL = ("average_accuracy", "forgetting", "backward_transfer", "forward_transfer")  # first when present


def load_runs(root: Path) -> tuple[pd.DataFrame, dict]:
    """One row per run (its summary.json), and each run's curves {run dir: {name: (x, y)}}."""
    rows, curves = [], {}
    for path in sorted(root.rglob("summary.json")):
        if path.parent.name == "evaluate" and (path.parent.parent / "summary.json").exists():
            continue  # a re-test of the run above it (tasks.speech.evaluate), not a run of its own
        summary = json.loads(path.read_text())
        summary["run"] = str(path.parent.relative_to(root))
        rows.append(summary)
        if (path.parent / "curves.json").exists():
            curves[summary["run"]] = json.loads((path.parent / "curves.json").read_text())
    if not rows:
        raise FileNotFoundError(f"no summary.json under {root}")
    runs = pd.DataFrame(rows)
    for key in KEYS:  # a summary.json without them (hand-made, an older run) still gets a row
        runs[key] = runs[key].fillna("?") if key in runs else "?"
    if VARIANT in runs:
        runs[VARIANT] = runs[VARIANT].fillna("")
    return runs, curves


def keys(runs: pd.DataFrame) -> list[str]:
    """What names a row: task, learning, model, and the variant where runs have one."""
    return [*KEYS, VARIANT] if VARIANT in runs else list(KEYS)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Numeric metrics: a continual run's first, throughput and memory last."""
    numeric = [c for c in runs.columns if c not in (*keys(runs), "seed", "run") and is_numeric(runs[c])]
    first = [c for c in CONTINUAL if c in numeric]
    return first + [c for c in numeric if c not in (*HEADLINE, *first)] + [c for c in HEADLINE if c in numeric]


def is_numeric(column: pd.Series) -> bool:
    values = column.dropna()
    return len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """mean +- std over runs (seeds) for each (task, learning, model)."""
    columns = metric_columns(runs)
    grouped = runs.groupby(keys(runs), sort=True)
    out = grouped[columns].agg(lambda c: fmt(pd.to_numeric(c, errors="coerce")))
    out.insert(0, "runs", grouped.size())
    return out.reset_index()


def fmt(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    mean, std = values.mean(), values.std(ddof=0)
    digits = max(3 - int(math.floor(math.log10(abs(mean)))) if mean else 3, 0)
    return f"{mean:.{min(digits, 6)}f} ± {std:.{min(digits, 6)}f}"


def to_markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def plot(runs: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = runs["learning"].astype(str) + "/" + runs["model"].astype(str)
    if VARIANT in runs:
        label = label + runs[VARIANT].map(lambda v: f" ({v})" if v else "")
    runs = runs.assign(label=label)
    labels = sorted(runs["label"].unique())
    written = []
    metrics = metric_columns(runs)
    if metrics:  # one bar chart per metric: mean and std over seeds per mode
        cols = min(4, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            values = [pd.to_numeric(runs.loc[runs.label == lab, metric], errors="coerce").dropna() for lab in labels]
            ax.bar(labels, [v.mean() if len(v) else np.nan for v in values],
                   yerr=[v.std(ddof=0) if len(v) else 0 for v in values], capsize=3)
            ax.set_title(metric, fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(out / "metrics.png")
        save_figure(fig, written[-1], dpi=100)
        plt.close(fig)
    if "accuracy_matrix" in runs:
        written.append(plot_matrices(runs, labels, out / "continual_matrix.png"))
    names = sorted({name for run in curves.values() for name in run})
    for name in names:  # learning curves: one line per run, one colour per mode
        fig, ax = plt.subplots(figsize=(7, 4))
        colours = {lab: f"C{i}" for i, lab in enumerate(labels)}
        for lab in labels:
            for i, run in enumerate(runs.loc[runs.label == lab, "run"]):
                if name in curves.get(run, {}):
                    x, y = curves[run][name]
                    ax.plot(x, y, color=colours[lab], alpha=0.7, label=lab if i == 0 else None)
        ax.set(xlabel="elements seen", ylabel=name, title=f"{name} per learning mode")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(out / f"curve_{name}.png")
        save_figure(fig, written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written


def plot_matrices(runs: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """Continual runs: the mean accuracy matrix R over seeds, one heatmap per learning mode and
    model (runs whose R is missing or of another shape than the label's first are left out)."""
    import matplotlib.pyplot as plt

    labels = [lab for lab in labels if runs.loc[runs.label == lab, "accuracy_matrix"].notna().any()]
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.2), squeeze=False)
    for ax, lab in zip(axes.flat, labels):
        matrices = [np.asarray(m, dtype=float) for m in runs.loc[runs.label == lab, "accuracy_matrix"]
                    if isinstance(m, list) and m]
        mean = np.mean([m for m in matrices if m.shape == matrices[0].shape], axis=0)
        draw_matrix(ax, mean)
        ax.set(title=f"{lab} (n={len(matrices)})", xlabel="accuracy on phase", ylabel="after phase")
        ax.set_xticks(range(mean.shape[1]))
        ax.set_yticks(range(mean.shape[0]))
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def write_report(root: str | Path) -> Path:
    """Write comparison.md (+ comparison.csv of all runs, + PNGs) into `root`; returns its path."""
    root = Path(root)
    runs, curves = load_runs(root)
    write_text(root / "runs.csv", runs.to_csv(index=False))
    images = plot(runs, curves, root)
    lines = [f"# Comparison of {len(runs)} runs in {root}", "",
             "Mean ± std over runs (seeds) of every numeric summary metric; steps/s is training",
             "batches per second, peak_memory_mb the training process's peak. Per-run values: runs.csv.", "",
             to_markdown(table(runs)), ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    path = root / "comparison.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


class ComparisonCallback(Callback):
    """Hydra callback: after a multirun, the comparison of its runs in the sweep dir."""

    def on_multirun_end(self, config, **kwargs):
        root = Path(config.hydra.sweep.dir)
        try:
            print(f"comparison: {write_report(root)}")
        except FileNotFoundError as e:  # every run failed: nothing to compare, say so
            print(f"comparison: {e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a multirun dir (or any dir with run dirs holding summary.json)")
    print(write_report(parser.parse_args().dir))


if __name__ == "__main__":
    main()
