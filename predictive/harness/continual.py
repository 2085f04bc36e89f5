"""Continual learning: a run learns its task's phases one after another, and after each phase
the model is evaluated, learning off, on the held-out data of every phase.

R[i][j] is the accuracy on phase j after learning phases 0 .. i (the accuracy matrix; the
rows below the diagonal are what was kept, above it what was learned before being taught).
From it, for T phases:

    average_accuracy   mean_j R[T-1][j]: what the model knows of every phase at the end
    forgetting         mean_{j<T-1} (max_{i<T-1} R[i][j] - R[T-1][j]): the best it ever did on an
                       earlier phase minus what it does at the end (Chaudhry et al. 2018)
    backward_transfer  mean_{j<T-1} (R[T-1][j] - R[j][j]): how learning later phases changed the
                       earlier ones, < 0 when they were overwritten (Lopez-Paz & Ranzato 2017)
    forward_transfer   mean_{j>0} (R[j-1][j] - b[j]), b = the accuracy of the untrained model

A task with phases (`tasks.base.Task.phases`) says where each phase ends in its training data
(`phase_ends`) and gives each phase's held-out batches (`held_out`); `ContinualEvaluation`
evaluates at those points, logs and plots R, and adds the figures to summary.json.
"""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only

from predictive.harness.callbacks import log_images
from predictive.harness.files import save_figure, write_json
from predictive.harness.module import get_rng_state, set_rng_state


def average_accuracy(matrix) -> float:
    """Mean of the last row: the final accuracy over every phase."""
    return float(np.mean(np.asarray(matrix, dtype=float)[-1]))


def forgetting(matrix) -> float:
    """Mean over the phases before the last of (the best accuracy reached on the phase before
    the last phase was learned) minus (the final accuracy on it); 0 for one phase."""
    r = np.asarray(matrix, dtype=float)
    if len(r) < 2:
        return 0.0
    return float(np.mean(r[:-1, :-1].max(axis=0) - r[-1, :-1]))


def backward_transfer(matrix) -> float:
    """Mean over the phases before the last of (final accuracy on it) minus (accuracy on it
    just after it was learned); 0 for one phase."""
    r = np.asarray(matrix, dtype=float)
    if len(r) < 2:
        return 0.0
    return float(np.mean([r[-1, j] - r[j, j] for j in range(len(r) - 1)]))


def forward_transfer(matrix, initial) -> float:
    """Mean over the phases after the first of (accuracy on it just before it was learned)
    minus (the untrained model's accuracy on it); 0 for one phase."""
    r, b = np.asarray(matrix, dtype=float), np.asarray(initial, dtype=float)
    if len(r) < 2:
        return 0.0
    return float(np.mean([r[j - 1, j] - b[j] for j in range(1, len(r))]))


def continual_summary(names: list[str], initial: list[float], rows: list[list[float]]) -> dict:
    """The figures of a continual run for summary.json, over the phases learned so far (a run
    stopped early has fewer rows than phases: its square part is used)."""
    learned = [row[: len(rows)] for row in rows]
    out = {"phases": list(names), "initial_accuracy": initial, "accuracy_matrix": rows}
    if learned:
        out |= {
            "average_accuracy": average_accuracy(learned),
            "forgetting": forgetting(learned),
            "backward_transfer": backward_transfer(learned),
            "forward_transfer": forward_transfer(learned, initial[: len(rows)]),
        }
    return out


@torch.no_grad()
def held_out_accuracy(module: L.LightningModule, batches) -> float:
    """The task's accuracy on `batches`, learning off: eval mode (no k-WTA duty cycle, batch
    norm statistic or head average moves), no local update (`learn=False`), no gradient; each
    batch from a fresh model state. The RNG state is put back afterwards, so a run that
    evaluates draws the same random numbers in training as one that does not."""
    modes = {m: m.training for m in module.modules()}
    rng = get_rng_state()
    module.eval()
    try:
        for batch in batches:
            batch = move_data_to_device(batch, module.device)
            head_out, out, _ = module.run(batch, None, learn=False)
            module.task.update_metrics("val", head_out, batch, out)
        return float(module.task.compute_metrics("val")["accuracy"])
    finally:
        for m, training in modes.items():
            m.train(training)
        set_rng_state(rng)


class ContinualEvaluation(L.Callback):
    """After the untrained model and after each phase of `task.phases`, the held-out accuracy
    of every phase (`held_out_accuracy`), row by row into R. Each row is logged as
    `continual/<phase name>`; at the end `continual_matrix.png` (R as a heatmap) and
    `continual_phases.png` (each phase's accuracy after each phase) go to the run dir and to
    wandb, and `summary()` (for RunSummary) holds R and its figures. The rows are saved in
    checkpoints, so a resumed run keeps them.

    Phases end at training-data positions the task names (`task.phase_ends`): chunks learned
    for streaming tasks, epochs for the others."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.names: list[str] = []
        self.initial: list[float] | None = None
        self.rows: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module):
        task = pl_module.task
        self.names = list(task.phases)
        if trainer.world_size > 1:
            raise ValueError("a continual run (task.continual) runs on one process: use trainer=cpu or trainer=gpu")
        end, planned = task.phase_ends[-1], self.planned(trainer, pl_module)
        if end != planned:
            unit = "chunks" if task.streaming else "epochs (trainer.max_epochs)"
            raise ValueError(f"task.continual: the phases end after {end} {unit}, the run has {planned}")

    @staticmethod
    def planned(trainer, pl_module) -> int:
        if pl_module.task.streaming:
            return trainer.datamodule.num_chunks
        return trainer.max_epochs

    def on_train_start(self, trainer, pl_module):
        if self.initial is None:  # not when resumed
            self.initial = self.evaluate(pl_module)
            self.log_row(trainer, self.initial)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.task.streaming:
            self.at(trainer, pl_module, trainer.datamodule.position)

    def on_train_epoch_end(self, trainer, pl_module):
        if not pl_module.task.streaming:
            self.at(trainer, pl_module, trainer.current_epoch + 1)

    def at(self, trainer, pl_module, progress: int):
        """Evaluate if the training data is at the end of the next phase."""
        ends = pl_module.task.phase_ends
        if len(self.rows) < len(ends) and progress == ends[len(self.rows)]:
            self.rows.append(self.evaluate(pl_module))
            self.log_row(trainer, self.rows[-1])

    def evaluate(self, pl_module) -> list[float]:
        task = pl_module.task
        return [held_out_accuracy(pl_module, task.held_out(j)) for j in range(len(task.phases))]

    def log_row(self, trainer, row: list[float]):
        # Straight to the loggers: Lightning writes values logged in a hook only at its
        # logging steps, and a phase may end between them.
        metrics = {f"continual/{name}": a for name, a in zip(self.names, row)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def summary(self) -> dict:
        return continual_summary(self.names, self.initial or [], self.rows)

    def state_dict(self) -> dict:
        return {"initial": self.initial, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.initial, self.rows = state["initial"], state["rows"]

    def on_train_end(self, trainer, pl_module):
        self.plot(trainer)

    @rank_zero_only
    def plot(self, trainer):
        if not self.rows:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "continual.json", self.summary(), indent=1)
        out = self.output_dir
        images = {
            "continual/matrix": plot_matrix(self.rows, self.names, out / "continual_matrix.png"),
            "continual/phases": plot_phases(self.initial, self.rows, self.names, out / "continual_phases.png"),
        }
        log_images(trainer.loggers, images)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(rows: list[list[float]], names: list[str], path: Path, title: str = "") -> Path:
    """R as a heatmap: rows = after learning phase i, columns = accuracy on phase j."""
    plt = _pyplot()
    r = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * r.shape[1], 1.0 + 0.6 * r.shape[0]))
    draw_matrix(ax, r)
    ax.set_xticks(range(r.shape[1]), names[: r.shape[1]], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(r.shape[0]), names[: r.shape[0]], fontsize=8)
    ax.set(xlabel="accuracy on phase", ylabel="after learning phase", title=title or "accuracy matrix R")
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_matrix(ax, r: np.ndarray) -> None:
    """R on a matplotlib axis: colours from 0 to 1, each value written in its cell."""
    ax.imshow(r, cmap="viridis", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(r):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)


def plot_phases(initial: list[float], rows: list[list[float]], names: list[str], path: Path) -> Path:
    """Each phase's held-out accuracy before training and after each phase: a line per phase,
    rising when its phase is learned, flat after it where it is kept."""
    plt = _pyplot()
    r = np.asarray([initial, *rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j in range(r.shape[1]):
        ax.plot(range(len(r)), r[:, j], marker="o", label=names[j])
    ax.set_xticks(range(len(r)), ["untrained", *names[: len(r) - 1]], fontsize=8)
    ax.set(xlabel="after learning phase", ylabel="held-out accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
