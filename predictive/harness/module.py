"""The one LightningModule: task encoder -> sequence model -> task head, for every task and
learning mode.

Optimization is manual: one optimizer holds every trainable parameter (docs/interfaces.md)
and the learning rule decides, by where gradients are cut, what the loss reaches. In local
mode the temporal-memory layers learn inside the forward pass by explicit rules, so their
parameters get no gradient and the optimizer skips them; the head learns from detached
features.

Streaming tasks carry the model state of their B streams from one batch to the next; the
state, the task's metric state and the RNG states go into every checkpoint so that a resumed
run continues exactly where it stopped (the stream position is the datamodule's, see
`tasks.base.StreamDataModule`).

Under DDP, N processes with B streams each learn what one process with N x B streams learns.
Gradients are averaged by DDP. Layers that the rule changes inside the forward pass (local
updates, grown segments) would learn N different models from N sets of streams, and an
update at step t changes what every stream does at t+1, so no merge after the chunk can
undo that: instead every process runs the layers on every process's streams (`gather_streams`),
the same computation everywhere, and keeps its own streams' outputs for its head and metrics.
"""

import dataclasses
import hashlib
import io
import random
import warnings
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from predictive.memory import TemporalMemory
from predictive.sparse import KWinners

# Checkpoints are taken after the optimizer step on purpose: together with the stream position
# (advanced at the end of each step) they describe a consistent point to resume from.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class PredictiveModule(L.LightningModule):
    """Args:
        task: a `tasks.base.Task`.
        model: a sequence model (`PredictiveStack`, `LSTMModel`), see docs/interfaces.md.
        rule: a `predictive.learning.LearningRule`.
        optimizer: a factory `params -> torch.optim.Optimizer` (Hydra `_partial_`).
        gradient_clip_val: clip the global gradient norm to this (None: no clipping).
        scheduler: None, or a factory `optimizer -> lr scheduler`, stepped once per epoch.
    """

    def __init__(
        self, task, model: nn.Module, rule, optimizer, gradient_clip_val: float | None = None, scheduler=None
    ):
        super().__init__()
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"learning.gradient_clip_val must be > 0 or null, got {gradient_clip_val}")
        self.automatic_optimization = False
        task.check_model(model)
        rule.check(model)
        if not rule.trains_model:
            model.requires_grad_(False)
        self.task, self.rule, self.make_optimizer, self.make_scheduler = task, rule, optimizer, scheduler
        self.gradient_clip_val = gradient_clip_val
        self.encoder, self.model = task.encoder, model
        # "prediction" is the model's decoded next input, so it is as wide as the input.
        feature_size = task.input_size if task.features == "prediction" else model.output_size
        self.head = task.build_head(feature_size)
        self.stream_state = None  # streaming tasks: the streams' model state between batches
        self.time_steps = 0  # B x T summed over training batches (throughput)
        self.learns_in_forward = learns_in_forward(model, rule)
        self._rng_to_restore = None
        self._rng_after_build = get_rng_state()

    def on_train_batch_start(self, batch: dict, batch_idx: int):
        # Under a rule that leaves the model as initialised (`Frozen`) it runs in eval mode:
        # no k-WTA duty cycle or batch-norm statistic moves either (Lightning sets train mode).
        if not self.rule.trains_model:
            self.model.eval()

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.make_optimizer(self.rule.parameter_groups(self.model, trainable))
        if self.make_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.make_scheduler(optimizer), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @property
    def shares_streams(self) -> bool:
        """Does every process run every process's streams through the model (DDP, and layers
        that learn inside the forward pass)? Then the stream state holds all N x B streams."""
        return self.learns_in_forward and self.trainer.world_size > 1

    def run(self, batch: dict, state, learn: bool):
        """encoder -> model -> head over one batch, from `state` (None: a fresh one); returns
        (head_out, out, new state). `out` and `head_out` are this process's streams'."""
        x = self.encoder(batch)
        check_finite(x, "encoded input")
        reset = self.task.reset_mask(batch)
        inputs, resets, own = x, reset, None
        if learn and self.shares_streams:
            inputs, resets, own = gather_streams(x, reset)
        if state is None:
            state = self.model.initial_state(inputs.shape[0], self.device)
        out, state = self.model(inputs, state, reset=resets, learning=self.rule if learn else None)
        out = out if own is None else select_streams(out, own)
        features = self.rule.head_features(getattr(out, self.task.features))
        head_out = self.head(features, **self.task.head_inputs(x, batch))
        self.time_steps += x.shape[0] * x.shape[1] if learn else 0
        return head_out, out, state

    def on_fit_start(self):
        if self.trainer.is_global_zero:
            self.task.write_inputs()
        if self.trainer.world_size > 1:
            # Lightning's DDP re-seeds every process as it joins the group, after the model was
            # built; continuing from the build's RNG state, every process draws what one
            # process draws (the layers' random tie-breaks and growth samples among them).
            set_rng_state(self._rng_after_build)

    def training_step(self, batch: dict, batch_idx: int):
        if self._rng_to_restore is not None:  # resumed: continue the RNG streams of the stopped run
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        state = None
        if self.task.streaming and self.stream_state is not None:
            state = {k: v.to(self.device) for k, v in self.stream_state.items()}
        head_out, out, state = self.run(batch, state, learn=True)
        task_loss = self.task.loss(head_out, batch)
        loss = task_loss + self.rule.local_loss_weight * out.local_loss
        check_finite(loss, lambda: f"loss (task loss {task_loss.item():.4g}, local loss {out.local_loss.item():.4g})")

        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()

        self.task.update_metrics("train", detach(head_out), batch, detach(out))
        if self.task.streaming:
            self.stream_state = self.model.detach_state(state)
            self.trainer.datamodule.position += 1  # this chunk is learned: a resume starts after it
        if self.trainer.world_size > 1 and not self.learns_in_forward:
            self.average_duty_cycles()
        if self.logging_step():
            self.log_dict({"train/loss": loss.detach(), "train/task_loss": task_loss.detach(),
                           "train/local_loss": out.local_loss.detach().float()}, prog_bar=True)
            if self.task.streaming:
                self.log_task_metrics("train")  # the prequential curve, as it goes
        return loss.detach()

    def logging_step(self) -> bool:
        """Is this a batch whose step values Lightning writes (every `log_every_n_steps`), or an
        epoch's last (its values are the run's final ones, in summary.json)? Values logged at
        other batches are dropped, and each `log` call costs about 0.4 ms on a CPU (some 20 us
        per element of a 50-element chunk on the sequence task). One optimizer step per batch:
        after it, global_step is the number of batches done, this one included."""
        every = self.trainer.log_every_n_steps
        return self.trainer.is_last_batch or (bool(every) and self.trainer.global_step % every == 0)

    def on_train_epoch_end(self):
        self.log_task_metrics("train")
        scheduler = self.lr_schedulers()  # manual optimization: Lightning leaves the stepping to us
        if scheduler is not None:
            self.log("train/lr", scheduler.get_last_lr()[0])
            scheduler.step()

    def evaluate(self, stage: str, batch: dict):
        """Validation and test: independent batches from a fresh state; the model does not learn."""
        head_out, out, _ = self.run(batch, None, learn=False)
        self.log(f"{stage}/loss", self.task.loss(head_out, batch), batch_size=len(next(iter(batch.values()))))
        self.task.update_metrics(stage, head_out, batch, out)

    def validation_step(self, batch: dict, batch_idx: int):
        self.evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int):
        self.evaluate("test", batch)

    def on_validation_epoch_end(self):
        self.log_task_metrics("val")

    def on_test_epoch_end(self):
        self.log_task_metrics("test")

    def log_task_metrics(self, stage: str):
        metrics = {f"{stage}/{k}": float(v) for k, v in self.task.compute_metrics(stage).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # Every process computes its own streams' metrics; the logged value is their mean.
        self.log_dict(metrics, sync_dist=self.trainer.world_size > 1)

    @torch.no_grad()
    def average_duty_cycles(self):
        """DDP, no layer learning inside the forward pass (backprop): the averaged gradients
        keep the parameters one model, but each process's k-WTA duty cycles count its own
        samples; averaged after every step, every process boosts alike (a duty cycle's horizon,
        `duty_cycle_period`, then counts the samples of one process)."""
        duty = [m.duty_cycle for m in self.model.modules() if isinstance(m, KWinners)]
        if duty:
            mean = self.trainer.strategy.reduce(torch.cat(duty), reduce_op="mean")
            for t, part in zip(duty, mean.split([t.numel() for t in duty])):
                t.copy_(part)

    def on_save_checkpoint(self, checkpoint: dict):
        # On the CPU: gathered from another process, a CUDA tensor would land on that one's device.
        streams = None if self.stream_state is None else {k: v.cpu() for k, v in self.stream_state.items()}
        own = {"stream_state": streams, "task_state": self.task.state_dict(), "rng": get_rng_state()}
        checkpoint.update(own)
        checkpoint["time_steps"] = self.time_steps
        if self.trainer.world_size > 1:  # DDP: every process has its own metrics and RNG (and streams)
            if self.shares_streams:  # every process holds all N x B streams: saved once
                del own["stream_state"]
            ranks = gather_objects({**own, "model": model_digest(self.model)})
            check_one_model([r.pop("model") for r in ranks], self.global_step)
            checkpoint["ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict):
        if self.task.streaming and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint = self.own_streams(checkpoint)
        self.stream_state = checkpoint.get("stream_state")  # checked before loading (harness.resume)
        self.task.load_state_dict(checkpoint.get("task_state", {}))
        self._rng_to_restore = checkpoint.get("rng")
        self.time_steps = checkpoint.get("time_steps", 0)

    def own_streams(self, checkpoint: dict) -> dict:
        """A resumed streaming run continues each process's own streams, metrics and RNG, so
        the checkpoint must come from as many processes as this run has."""
        ranks, world = checkpoint.get("ranks"), self.trainer.world_size
        saved = 1 if ranks is None else len(ranks)
        if saved != world:
            raise ValueError(f"the checkpoint holds the streams of {saved} process(es), this run has {world}: "
                             "resume with the devices and nodes it was saved with")
        return checkpoint if ranks is None else {**checkpoint, **ranks[self.global_rank]}


def learns_in_forward(model: nn.Module, rule) -> bool:
    """Does `rule` change the temporal-memory layers of `model` inside the forward pass, from
    every stream at every step (local updates, or segments grown in gradient-trained layers)?"""
    layers = [m for m in model.modules() if isinstance(m, TemporalMemory)]
    return any(rule.is_local(i) or rule.grows_segments for i in range(len(layers)))


def gather_streams(x: torch.Tensor, reset: torch.Tensor | None):
    """DDP: every process's chunk, in rank order, on every process. x (B, T, D) -> (N B, T, D),
    reset (B, T) or None likewise, and the rows of this process's streams. Those rows are x
    itself, so that a gradient still reaches the encoder through them."""
    width = x.shape[-1]
    packed = x.detach() if reset is None else torch.cat([x.detach(), reset.unsqueeze(-1).to(x.dtype)], -1)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    shape = torch.tensor(packed.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"under DDP, layers that learn as they run take every process's batch, and these differ in shape: "
            f"{[tuple(s.tolist()) for s in shapes]} (batch, time, width); give every process batches of one shape"
        )
    parts = [torch.empty_like(packed) for _ in range(world)]
    torch.distributed.all_gather(parts, packed)
    resets = None if reset is None else torch.cat([p[..., width] > 0 for p in parts])
    inputs = torch.cat([x if r == rank else p[..., :width] for r, p in enumerate(parts)])
    b = x.shape[0]
    return inputs, resets, slice(rank * b, (rank + 1) * b)


def select_streams(out, rows: slice):
    """The model output's (a dataclass of tensors) fields for the streams `rows`; scalars stay."""
    fields = {k: getattr(out, k) for k in out.__dataclass_fields__}
    return dataclasses.replace(out, **{k: v[rows] for k, v in fields.items() if torch.is_tensor(v) and v.dim()})


def model_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer of `model`, bit for bit."""
    digest = hashlib.sha1()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_one_model(digests: list[str], step: int) -> None:
    """DDP keeps one model on every process (averaged gradients, identical local updates)."""
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"under DDP the processes' models differ after {step} steps: something was computed differently "
            "on each process (random numbers drawn per process, or nondeterministic ops: trainer.deterministic)"
        )


def check_finite(t: torch.Tensor, what: str | Callable[[], str]):
    """Stop the run on NaN/inf rather than train on garbage. `what` may be a function that
    builds the name only on failure (reading tensors for it would sync every step). Checked on
    the sum, which is NaN or inf when any value is (or when the values are so large that their
    sum overflows): a tenth of the cost of testing every value."""
    if not torch.isfinite(t.sum()):
        what = what() if callable(what) else what
        raise FloatingPointError(f"non-finite values (NaN or inf) in the {what}; stopping the run")


def detach(x):
    """Detach a tensor, or every tensor field of a dataclass output (the model's `out`)."""
    if torch.is_tensor(x):
        return x.detach()
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(**{k: detach(getattr(x, k)) for k in x.__dataclass_fields__})
    return x


def gather_objects(obj) -> list:
    """Every process's `obj` (what a checkpoint may hold), in rank order, on every process.
    Sent as torch.save bytes: all_gather_object's own pickling of tensors fails to load."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def get_rng_state() -> dict:
    # Plain tensors and lists, so that checkpoints load with torch.load(weights_only=True).
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
