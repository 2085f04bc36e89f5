"""Train and evaluate one task with one model and learning mode.

    python train.py                                   # task=sequence model=stack learning=local
    python train.py task=taxi learning=backprop trainer=gpu
    python train.py -m task=sequence learning=local,backprop,hybrid seed=0,1,2   # + comparison.md
    python train.py --help                            # the config groups and their options

Outputs go to the Hydra run dir (outputs/<task>/<time>/): .hydra/config.yaml, checkpoints/last.ckpt,
summary.json, logs. Resume with `ckpt_path=<run dir>/checkpoints/last.ckpt` (and the same overrides).
"""

import gc
import os

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from predictive.harness.callbacks import RunSummary
from predictive.harness.module import PredictiveModule
from tasks.base import CorpusTask


def build(cfg: DictConfig, name: str, **kwargs):
    """instantiate(cfg), turning a bad value into a ValueError that names its config group."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise ValueError(f"{name}: {e.__cause__}") from e.__cause__
        raise


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    if cfg.torch_threads is not None:
        if not isinstance(cfg.torch_threads, int) or cfg.torch_threads < 1:
            raise ValueError(f"torch_threads must be a positive integer or null, got {cfg.torch_threads!r}")
        torch.set_num_threads(cfg.torch_threads)
    # Build (and so validate) everything before any training starts.
    task = build(cfg.task, "task")
    choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
    info = {"task": choices.task, "learning": choices.learning, "model": choices.model, "seed": cfg.seed}
    if isinstance(task, CorpusTask):  # its own protocol (NAB: a fresh model per file)
        return task.run(cfg, info, build(cfg.logger, "logger") if cfg.logger else None)
    model = build(cfg.model, "model", input_size=task.input_size)
    rule = build(cfg.learning.rule, "learning.rule")
    optimizer = build(cfg.optimizer, "optimizer")
    optimizer([torch.zeros(1, requires_grad=True)])  # let the optimizer check lr & co. now
    scheduler = build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    epochs = cfg.trainer.get("max_epochs")
    if scheduler is not None and not (isinstance(epochs, int) and epochs >= 1):  # -1: Lightning's "no limit"
        raise ValueError(f"scheduler: needs trainer.max_epochs >= 1 (it is stepped once per epoch), got {epochs!r}")
    module = PredictiveModule(task, model, rule, optimizer, cfg.learning.gradient_clip_val, scheduler)

    summary = RunSummary(cfg.paths.output_dir, info)
    logger = build(cfg.logger, "logger") if cfg.logger else False
    callbacks = [build(cfg.checkpoint, "checkpoint"), summary]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(build(cfg.progress_bar, "progress_bar"))
    trainer = build(cfg.trainer, "trainer", logger=logger, callbacks=callbacks, default_root_dir=cfg.paths.output_dir)
    datamodule = task.datamodule(rank=trainer.global_rank)  # under DDP each rank its own streams
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # The objects built so far (torch, Lightning, Hydra, the model) live through training: left
    # out of the collector's full passes, which took 0.2 s each on the sequence task. Unfrozen
    # after, so that a multirun's finished jobs are collected.
    gc.freeze()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        gc.unfreeze()
    if cfg.test and is_overridden("test_dataloader", datamodule):
        trainer.test(module, datamodule=datamodule)
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # the next run of a multirun starts its own wandb run
    return summary.summary(trainer, module)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = train(cfg)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        outputs = summary.get("outputs", "summary.json, checkpoints/last.ckpt, plots (*.png)")
        print(f"\nresults in {cfg.paths.output_dir}: {outputs}")
        print("  " + headline(summary))


def headline(summary: dict) -> str:
    """The summary's figures on one line: the task's and the timings (counts such as
    elements_to_95 are ints; the seed, bools and logged metrics with a "/" are left out)."""
    shown = {k: v for k, v in summary.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" not in k and k != "seed"}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


if __name__ == "__main__":
    main()
