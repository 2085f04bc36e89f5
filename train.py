"""Train and evaluate one task with one model and learning mode.

    python train.py                                   # task=sequence model=stack learning=local
    python train.py task=taxi learning=backprop trainer=gpu
    python train.py -m task=sequence learning=local,backprop,hybrid seed=0,1,2   # + comparison.md
    python train.py --help                            # the config groups and their options

Outputs go to the Hydra run dir (outputs/<task>/<time>/): .hydra/config.yaml, checkpoints/last.ckpt,
summary.json, logs. Resume with `ckpt_path=<run dir>/checkpoints/last.ckpt` (and the same overrides).

Bad settings, data or checkpoints stop the run before training with one line each naming them
(exit status 1; HYDRA_FULL_ERROR=1 shows the traceback). SIGTERM or Ctrl-C stop it at the end of
the batch in progress, with a checkpoint to resume from and `status: interrupted` in summary.json
(exit status 143 or 130).
"""

import contextlib
import gc
import os
import signal
import sys
from dataclasses import dataclass

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from predictive.harness.callbacks import RunSummary
from predictive.harness.continual import ContinualEvaluation
from predictive.harness.files import AtomicCheckpointIO
from predictive.harness.interrupt import Interrupted, Interruption
from predictive.harness.module import PredictiveModule
from predictive.harness.resume import check_checkpoint, load_model
from predictive.harness.settings import check_settings
from tasks.base import CorpusTask


def build(cfg: DictConfig, name: str, **kwargs):
    """instantiate(cfg), turning a bad value into a ValueError that names its config group."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise ValueError(f"{name}: {e.__cause__}") from e.__cause__
        raise


@dataclass
class Run:
    """What `prepare` built and checked, for `fit`."""

    cfg: DictConfig
    task: object
    info: dict
    module: PredictiveModule | None = None
    trainer: L.Trainer | None = None
    datamodule: L.LightningDataModule | None = None
    summary: RunSummary | None = None
    logger: object = None


def prepare(cfg: DictConfig) -> Run:
    """Everything that can be wrong about a run's inputs, checked before any training: every
    setting, the objects built from them, the data (read now, so that every bad file is named
    before training starts) and the checkpoint to resume from."""
    check_settings(cfg)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    L.seed_everything(cfg.seed, workers=True)
    task = build(cfg.task, "task")
    choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
    info = {"task": choices.task, "learning": choices.learning, "model": choices.model, "seed": cfg.seed}
    if isinstance(task, CorpusTask):  # its own protocol (NAB: a fresh model per file), run by `fit`
        for setting in ("ckpt_path", "init_from"):
            if cfg.get(setting):
                raise ValueError(f"{setting}={cfg[setting]}: task={choices.task} starts a fresh model for every "
                                 "file and reads no checkpoint")
        return Run(cfg, task, info, logger=build(cfg.logger, "logger") if cfg.get("logger") else None)
    model = build(cfg.model, "model", input_size=task.input_size)
    if cfg.get("init_from"):
        load_model(cfg.init_from, model)
        info["init_from"] = str(cfg.init_from)
    rule = build(cfg.learning.rule, "learning.rule")
    optimizer = build(cfg.optimizer, "optimizer")
    optimizer([torch.zeros(1, requires_grad=True)])  # let the optimizer check lr & co. now
    scheduler = build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    module = PredictiveModule(task, model, rule, optimizer, cfg.learning.gradient_clip_val, scheduler)

    settings = {group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("task", "model", "learning")}
    continual = [ContinualEvaluation(cfg.paths.output_dir)] if task.phases else []
    summary = RunSummary(cfg.paths.output_dir, info, settings, sources=[c.summary for c in continual])
    logger = build(cfg.logger, "logger") if cfg.get("logger") else False
    callbacks = [build(cfg.checkpoint, "checkpoint"), summary, *continual]  # after the summary: not timed
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(build(cfg.progress_bar, "progress_bar"))
    trainer = build(cfg.trainer, "trainer", logger=logger, callbacks=callbacks, default_root_dir=cfg.paths.output_dir,
                    plugins=[AtomicCheckpointIO()])
    datamodule = task.datamodule(rank=trainer.global_rank)  # under DDP each rank its own streams
    datamodule.setup("fit")  # Lightning calls it again: the data modules read their data once
    if cfg.ckpt_path:
        check_checkpoint(cfg.ckpt_path, module, summary.run_info(trainer.world_size), trainer.world_size)
    return Run(cfg, task, info, module, trainer, datamodule, summary, logger)


def fit(run: Run) -> dict:
    """Fit and test; returns the summary, also in summary.json, whose `status` says how the run
    ended: completed, interrupted (SIGTERM or Ctrl-C; `signal` names it) or failed (`error`)."""
    if isinstance(run.task, CorpusTask):
        return run.task.run(run.cfg, run.info, run.logger)
    cfg, trainer, module, datamodule, summary = run.cfg, run.trainer, run.module, run.datamodule, run.summary
    if run.logger:
        run.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    with Interruption() as stop:
        try:
            # The objects built so far (torch, Lightning, Hydra, the model) live through training: left
            # out of the collector's full passes, which took 0.2 s each on the sequence task. Unfrozen
            # after, so that a multirun's finished jobs are collected.
            gc.freeze()
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            finally:
                gc.unfreeze()
            if cfg.test and not stop.signum and is_overridden("test_dataloader", datamodule):
                trainer.test(module, datamodule=datamodule)
            summary.status = "interrupted" if stop.signum else "completed"
        except BaseException as e:  # Lightning's SIGTERMException is a SystemExit
            summary.status = "interrupted" if stop.signum else "failed"
            if summary.status == "failed":
                summary.extra = {"error": f"{type(e).__name__}: {e}"}
                with contextlib.suppress(Exception):  # the error itself is what the caller needs
                    summary.write(trainer, module)
                raise
        if stop.signum:
            summary.extra = {"signal": signal.Signals(stop.signum).name}
        summary.write(trainer, module)
    if isinstance(run.logger, WandbLogger):
        run.logger.experiment.finish()  # the next run of a multirun starts its own wandb run
    return summary.summary(trainer, module)


def train(cfg: DictConfig) -> dict:
    return fit(prepare(cfg))


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        with Interruption():
            run = prepare(cfg)
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except (ValueError, OSError) as e:  # a setting, a data file or a checkpoint, named in the message
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(str(e))
    summary = fit(run)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        outputs = summary.get("outputs", "summary.json, checkpoints/last.ckpt, plots (*.png)")
        print(f"\nresults in {cfg.paths.output_dir}: {outputs}")
        print(f"  status={summary['status']}, " + headline(summary))
    if summary["status"] == "interrupted":
        sys.exit(128 + signal.Signals[summary["signal"]])


def headline(summary: dict) -> str:
    """The summary's figures on one line: the task's and the timings (counts such as
    elements_to_95 are ints; the seed, bools and logged metrics with a "/" are left out)."""
    shown = {k: v for k, v in summary.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" not in k and k != "seed"}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


if __name__ == "__main__":
    main()
