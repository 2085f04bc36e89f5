"""Pictures of a file's run: value, raw anomaly score and the reported score, label windows
shaded, the probationary period greyed, detections at the standard profile's threshold marked."""

from pathlib import Path

import numpy as np

from predictive.harness.files import save_figure
from tasks.nab.scoring import FileSweep


def plot_file(path: Path, name: str, values: np.ndarray, raw: np.ndarray, score: np.ndarray, sweep: FileSweep,
              threshold: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    t = np.arange(len(values))
    detected = np.flatnonzero((score >= threshold) & sweep.scored)
    fig, axes = plt.subplots(3, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})
    for ax in axes:
        for k in range(sweep.windows):
            rows = np.flatnonzero(sweep.window == k)
            ax.axvspan(rows[0], rows[-1], color="tab:red", alpha=0.15, lw=0)
        ax.axvspan(0, np.flatnonzero(sweep.scored)[0] if sweep.scored.any() else len(t), color="grey", alpha=0.12,
                   lw=0)
    axes[0].plot(t, values, lw=0.6, color="tab:blue")
    axes[0].plot(detected, values[detected], "v", color="tab:red", ms=6, label=f"detection (score >= {threshold:.3f})")
    axes[0].set(ylabel="value", title=name)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].plot(t, raw, lw=0.4, color="tab:orange")
    axes[1].set(ylabel="raw score", ylim=(-0.05, 1.05))
    axes[2].plot(t, score, lw=0.6, color="tab:green")
    axes[2].axhline(threshold, color="tab:red", lw=0.6, ls="--")
    axes[2].set(ylabel="anomaly score", xlabel="record (shaded: label windows; grey: probationary period)",
                ylim=(-0.05, 1.05))
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path
