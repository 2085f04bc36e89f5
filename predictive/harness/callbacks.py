"""Glue between a run and its outputs: a wandb logger that never blocks, a checkpoint callback
whose last.ckpt is the trained model, and the Lightning callback that measures throughput and
memory and writes summary.json and curve plots, and sends the tasks' figures to wandb."""

import netrc
import os
import resource
import socket
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from predictive.harness.files import save_figure, write_json
from predictive.harness.module import gather_objects


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir` (the run dir). Unless `offline` or WANDB_MODE
    says otherwise it goes online only when there are credentials and the server answers
    within 2 s, so that a run without an account or network never waits or fails."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun") or not _wandb_reachable()
    if offline and os.environ.get("WANDB_MODE") != "disabled":
        os.environ["WANDB_MODE"] = "offline"  # also for processes wandb starts itself
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


def _wandb_reachable() -> bool:
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc().authenticators(host) is None:
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=2).close()
        return True
    except OSError:
        return False


class StreamCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is the trained model and a point a run resumes from exactly.

    Streaming tasks: every `every_n_train_steps` batches, as Lightning does, and after the
    final batch. Lightning alone would miss the last up to n-1 chunks of a stream (an
    evaluation then scored an older model). The final save is an ordinary mid-epoch save, like
    the periodic ones, so a run resumed from it continues exactly (a save after `fit` returns
    would mark the epoch done).

    Epoch-based tasks (speech): at the end of every epoch instead, after validation and the
    lr scheduler's step, where a resumed run starts the next epoch. A save within an epoch of a
    shuffled data set cannot resume exactly (Lightning restarts the epoch's data), and one at
    its last batch resumed without that epoch's scheduler step. A run stopped within an epoch
    (SIGTERM, a kill) resumes from the last epoch's end and does the epoch again.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not pl_module.task.streaming:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.is_last_batch or 0 < trainer.max_steps <= trainer.global_step
        # SIGTERM (or Ctrl-C, `Interruption`): Lightning stops after this batch; save where it stops.
        if self.save_last and (final or trainer.received_sigterm):  # at worst once more than the periodic save
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not pl_module.task.streaming:
            self._save_last(trainer)  # Lightning calls this after the module's epoch end

    def _save_last(self, trainer):
        # Lightning's own save of "last" (at the end of fit) then overwrites this file instead
        # of writing a second one beside it (last-v1.ckpt).
        self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path)
        # Marked saved, as Lightning's own saves are: its saves at the end of the epoch and of fit
        # are then skipped, instead of writing over this one a state whose epoch is done (when
        # max_steps stops a stream between periodic saves, a resumed run then stopped at once).
        self._last_global_step_saved, self._last_checkpoint_saved = trainer.global_step, self.last_model_path


class RunSummary(L.Callback):
    """Measures training throughput and peak memory; at the end of fit (and again after test)
    writes `summary.json`: `status` (running, then completed | interrupted | failed, set by
    whoever runs the Trainer), `info` (task, learning, model, seed), the last logged metrics,
    `task.summary()`, `steps_per_second` (training batches/s), `time_steps_per_second`
    (B x T per second), `train_seconds` and `peak_memory_mb` (GPU: max allocated; CPU: the
    process's peak resident set during training). For streaming tasks it also plots
    `task.curves()` to `curve_<name>.png`, keeps them in `curves.json` (for the comparison
    report) and sends the plots to the logger.

    Every checkpoint gets `run`: `info`'s choices, `settings` (the run's task, model and
    learning settings), the number of processes, and the metrics logged so far, which a resumed
    run starts from (one resumed after its last step logs no training metrics of its own), so
    that it reports what a run that never stopped reports. `predictive.harness.resume` checks a
    checkpoint's `run` against the run that loads it.

    `sources`: functions that return more entries for the summary (ContinualEvaluation.summary)."""

    def __init__(self, output_dir: str, info: dict | None = None, settings: dict | None = None, sources=()):
        self.output_dir = Path(output_dir)
        self.info = dict(info or {})
        self.settings = dict(settings or {})
        self.sources = list(sources)
        self.status, self.extra = "running", {}
        self.seconds, self.batches, self.time_steps, self._start = 0.0, 0, 0, None
        self.fit_metrics, self.restored, self.peak_memory_mb = {}, {}, None
        self.ranks = None  # DDP, streaming: every process's task state at the end of fit

    def run_info(self, processes: int = 1) -> dict:
        choices = {k: self.info[k] for k in ("task", "model", "learning") if k in self.info}
        return {"choices": choices, "settings": self.settings, "processes": processes}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["run"] = {**self.run_info(trainer.world_size), "logged": {**self.restored, **self.logged(trainer)}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self.restored = dict(checkpoint.get("run", {}).get("logged", {}))

    def on_train_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            _reset_peak_rss()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._steps_before = pl_module.time_steps
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self._start
        self.batches += 1
        self.time_steps += pl_module.time_steps - self._steps_before

    def on_train_end(self, trainer, pl_module):
        self.peak_memory_mb = _peak_memory_mb(pl_module.device)
        self.fit_metrics = {**self.restored, **self.logged(trainer)}  # `trainer.test` starts a fresh set
        if trainer.world_size > 1 and pl_module.task.streaming:  # each process learned its own data
            self.ranks = gather_objects(pl_module.task.state_dict())
        self.write(trainer, pl_module)
        self.plot_curves(trainer, pl_module)

    def on_test_end(self, trainer, pl_module):
        self.write(trainer, pl_module)
        log_images(trainer.loggers, pl_module.task.figures())

    @staticmethod
    def logged(trainer) -> dict:
        return {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def summary(self, trainer, pl_module) -> dict:
        seconds = max(self.seconds, 1e-9)
        return {
            "status": self.status,
            **self.extra,
            **self.info,
            **self.restored,  # a run resumed after its last step may not reach on_train_end
            **self.fit_metrics,
            **self.logged(trainer),
            **pl_module.task.summary(self.ranks),
            **{k: v for source in self.sources for k, v in source().items()},
            "steps_per_second": self.batches / seconds,
            "time_steps_per_second": self.time_steps / seconds,
            "train_seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb or _peak_memory_mb(pl_module.device),
        }

    @rank_zero_only
    def write(self, trainer, pl_module):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary(trainer, pl_module)
        write_json(self.output_dir / "summary.json", summary, indent=2, default=float)

    @rank_zero_only
    def plot_curves(self, trainer, pl_module):
        curves = pl_module.task.curves(self.ranks)
        if not curves:
            return
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt

        as_lists = {k: [list(x), list(y)] for k, (x, y) in curves.items()}
        write_json(self.output_dir / "curves.json", as_lists)
        for name, (x, y) in curves.items():
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(x, y)
            ax.set(xlabel="elements seen", ylabel=name, title=f"{name} ({self.info.get('learning', '')})")
            ax.grid(alpha=0.3)
            path = self.output_dir / f"curve_{name}.png"
            save_figure(fig, path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            log_images(trainer.loggers, {f"curves/{name}": path})


@rank_zero_only
def log_images(loggers: list, images: dict) -> None:
    """Send image files `{key: path}` to the wandb loggers among `loggers` (the others take no images)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for key, path in images.items():
                logger.log_image(key=key, images=[str(path)])


def _reset_peak_rss():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so a run in a multirun
    # process reports its own peak, not the largest of the runs before it.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
