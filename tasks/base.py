"""The contract every task fulfils (docs/interfaces.md), and a base for resumable streams.

A task bundles data, encoder, head, loss and metrics. Hydra builds it from
`configs/task/<name>.yaml` (`_target_: tasks.<module>.<Class>`); the LightningModule
(`predictive.harness.module.PredictiveModule`) only talks to it through the members below, so a
new task is one subclass and one YAML file.

How the module uses a task, per training batch (a dict of tensors):

    x = task.encoder(batch)                              # (B, T, D)
    out, state = model(x, state, reset=task.reset_mask(batch), learning=rule)
    head_out = head(rule.head_features(getattr(out, task.features)), **task.head_inputs(x, batch))
    loss = task.loss(head_out, batch) + rule.local_loss_weight * out.local_loss
    task.update_metrics("train", head_out, batch, out)   # prequential: predicted before learning

and at each epoch end it logs `task.compute_metrics(stage)` and, at the end of the run,
writes `task.summary()` to summary.json and plots `task.curves()`.
"""

import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from predictive.baselines import ConvNet


class Task(ABC):
    """Abstract task. Subclasses set the attributes in `__init__` (or as class attributes)
    and implement the abstract methods.

    Declare each setting's allowed values in `settings` (`{key: rule}`, rules from
    `predictive.harness.settings`): the harness checks them before anything is built and names
    a bad one in one line, `task.<key>=<value>: <what is allowed>`. Checks that need the data
    go in `__init__`, raising `ValueError` naming the setting (e.g. "task.score_from must be in
    [5, 295) for nyc_taxi.csv"). Data paths come from an argument (the configs pass
    `${paths.data_dir}`), never from a hard-coded location.

    Attributes:
        streaming: True when batches continue the same B streams: the module carries the
            model state from one batch to the next (and saves it in checkpoints), and the
            datamodule must be resumable (see `StreamDataModule`). False: every batch is
            independent (e.g. one utterance per stream) and starts from a fresh state.
        encoder: `nn.Module`, batch dict -> x (B, T, D) float on the batch's device. May have
            parameters (they are trained by the task loss in every learning mode) or none.
        input_size: D, the encoder's output width.
        features: which field of the model's output feeds the head:
            "cells" | "predicted" | "prediction".
    """

    streaming: bool = False
    features: str = "cells"
    settings: dict = {}
    encoder: nn.Module
    input_size: int
    # A continual run (predictive.harness.continual) learns phases one after another in its
    # training data: their names, and where each ends (chunks learned for streaming tasks,
    # epochs for the others). Empty: not a continual run.
    phases: tuple[str, ...] = ()
    phase_ends: tuple[int, ...] = ()

    @abstractmethod
    def datamodule(self, rank: int = 0) -> L.LightningDataModule:
        """The data. Batches are dicts of tensors; the module moves them to the device.
        Streaming tasks return a `StreamDataModule` (or anything meeting its contract).
        `val_dataloader`/`test_dataloader` are optional: the module runs them when present.
        `rank`: this process's global rank under DDP (0 otherwise); a streaming task with
        several streams to draw from gives each rank its own (Lightning splits map-style
        datasets between ranks itself)."""

    def held_out(self, phase: int):
        """Continual runs: phase `phase`'s held-out data, batches that `update_metrics("val", ...)`
        counts and `compute_metrics("val")["accuracy"]` scores (each batch from a fresh state)."""
        raise NotImplementedError(f"{type(self).__name__} has no continual phases")

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if `model` cannot read this task's input, before training. The CNN
        reads each step as maps of spectrogram bins: a stream of symbol or value codes is not
        one (the sequence task's 2,048-wide codes would make it a 67M-parameter network)."""
        if self.streaming and isinstance(model, ConvNet):
            raise ValueError(f"model=cnn reads spectrogram frames (task=speech), not the streams of "
                             f"{type(self).__name__}: use model=stack or model=lstm")

    def write_inputs(self) -> None:
        """Called once as training starts (after every check): write into the run dir what a
        reader needs to know the run's inputs (e.g. the sequence sets it drew). Nothing by default."""

    def reset_mask(self, batch: dict) -> torch.Tensor | None:
        """(B, T) bool: True clears that stream's model state before step t (e.g. at a
        sequence boundary), or None for no resets. Non-streaming tasks need none: each batch
        starts from a fresh state anyway."""
        return None

    @abstractmethod
    def build_head(self, feature_size: int) -> nn.Module:
        """A fresh head: features (B, T, feature_size) -> the task's output (any shape the
        task's `loss` and `update_metrics` understand). Called once by the module."""

    def head_inputs(self, x: torch.Tensor, batch: dict) -> dict:
        """Keyword arguments for the head beyond the features, from the encoded input x
        (B, T, D) and the batch (e.g. which frames of a clip hold the word). None by default."""
        return {}

    @abstractmethod
    def loss(self, head_out, batch: dict) -> torch.Tensor:
        """Scalar task loss (differentiable w.r.t. `head_out`)."""

    @abstractmethod
    def update_metrics(self, stage: str, head_out, batch: dict, out) -> None:
        """Accumulate metrics for `stage` in {"train", "val", "test"} from one batch; `out` is
        the model's output (cells, predicted, prediction, anomaly, local_loss), all detached.
        For streaming tasks "train" metrics are the prequential ones: `head_out` was computed
        before the model learned from this batch. Keep metric state on the CPU or as
        torchmetrics (the module does not move tasks between devices)."""

    @abstractmethod
    def compute_metrics(self, stage: str) -> dict[str, float]:
        """Metrics of `stage` so far, as plain floats; logged as `<stage>/<name>` at the end
        of each epoch. Must not reset the accumulated state (the run's final numbers are read
        again by `summary`)."""

    def summary(self, ranks: list[dict] | None = None) -> dict:
        """Final task metrics for summary.json and the comparison report (flat dict; every
        numeric entry gets a mean +- std column across seeds), e.g. final accuracy, elements
        to reach 95%. The module adds the last logged metrics, throughput and memory itself.
        Streaming tasks under DDP get `ranks`, every process's `state_dict()` in rank order,
        for figures over what all processes learned."""
        return {}

    def curves(self, ranks: list[dict] | None = None) -> dict[str, tuple[list[float], list[float]]]:
        """Optional learning curves, `{name: (x, y)}` (e.g. {"accuracy": (elements seen,
        accuracy over the last 100 sequences)}). The module plots each one into the run dir
        and the logger at the end of a run; the comparison report overlays them per mode.
        `ranks` as in `summary`: streaming under DDP, every process's state."""
        return {}

    def figures(self) -> dict[str, str | Path]:
        """Images the task wrote at the end of a stage, `{key: path}` (e.g. a test confusion
        matrix). RunSummary sends each to the loggers that take images (wandb) after testing."""
        return {}

    def state_dict(self) -> dict:
        """Metric state a streaming task needs to resume exactly (e.g. the running accuracy
        window, the curve so far). Saved in checkpoints by the module; default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


class CorpusTask(ABC):
    """A task that runs its own protocol instead of one Lightning fit: e.g. NAB, where every
    file of a corpus is streamed through a fresh model (in worker processes) and scored
    afterwards as a whole. `train.py` builds it from `configs/task/<name>.yaml` like any task
    and hands it the whole config.

    Validate settings and data in `__init__` (bad input fails before any long work starts).
    """

    input_size: int

    @abstractmethod
    def run(self, cfg, info: dict, logger=None) -> dict:
        """Run the protocol with the models, rules and optimizer that `cfg.model`,
        `cfg.learning.rule` and `cfg.optimizer` describe, write the outputs (summary.json at
        least) into `cfg.paths.output_dir`, log to `logger` (a Lightning logger, or None) and
        return the summary. `info`: task, learning, model and seed, for summary.json."""


class StreamDataModule(L.LightningDataModule):
    """Base for a streaming task's data: an epoch is `num_chunks` chunks, each one batch of
    B streams x T steps; chunk i is a pure function of i (and the seed), so any chunk can be
    produced again.

    Exact resume contract (for any streaming datamodule, subclass of this or not):
      - `position` counts the training chunks the model has learned from, over the whole run.
        The LightningModule adds 1 at the end of each `training_step`.
      - `state_dict()` contains `position`; Lightning saves it in every checkpoint and calls
        `load_state_dict()` before it iterates the train loader, so a resumed run continues at
        the next unseen chunk (a plain DataLoader would restart at the beginning of the epoch).
      - the train loader reads `position` each time it is iterated (every epoch start), has
        `len() == num_chunks` and yields chunks `position % num_chunks ... num_chunks - 1`.
    Under DDP each process should stream different data: use `self.trainer.global_rank`
    (available from `setup`) e.g. to offset the seed.

    Subclasses implement `num_chunks` and `chunk(index)`, and may add val/test loaders.
    """

    def __init__(self):
        super().__init__()
        self.position = 0

    @property
    def num_chunks(self) -> int:
        raise NotImplementedError

    def chunk(self, index: int) -> dict:
        """The training batch for chunk `index` of the epoch: a dict of (B, T, ...) tensors."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: chunks are already batches; no workers, so `position` is read live.
        return _ChunkLoader(_Chunks(self), batch_size=None)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


# _Chunks has a length on purpose (Lightning counts the epoch's batches); it is read in the
# main process only, so the warning about lengths with several workers does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class _ChunkLoader(DataLoader):
    """The train loader. Lightning takes a loader with `state_dict` / `load_state_dict` as one
    that resumes mid-epoch (and warns of any other); this one does, through the datamodule's
    `position`, which Lightning restores before the epoch starts, so it keeps no state itself."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Chunks(IterableDataset):
    """The remaining chunks of the current epoch, starting where the model left off."""

    def __init__(self, data: StreamDataModule):
        self.data = data

    def __len__(self) -> int:
        return self.data.num_chunks

    def __iter__(self):
        for index in range(self.data.position % self.data.num_chunks, self.data.num_chunks):
            yield self.data.chunk(index)
