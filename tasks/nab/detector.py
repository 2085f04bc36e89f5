"""One NAB data file through a fresh model, one record at a time: the raw anomaly score of
every record, prequential (what is reported for record t was computed from records <= t).

The input of record t is the value (`ScalarEncoder` over the file's range, which NAB allows),
and optionally the time of day and the day of the week (`RecordEncoder`). Records run in
chunks of `chunk` steps with the model's state carried from chunk to chunk; a temporal-memory
layer's anomaly at t compares the columns active at t with those predicted at t-1, so a chunk
sees nothing ahead of the step it scores.

Raw scores: "columns", the bottom layer's share of active columns that were not predicted
(`PredictiveStack` output `anomaly`); or "error", the error of a linear head's prediction of
the next value (in units of the file's range, clipped to [0, 1]), for models without columns
(the LSTM) or whose segments only a gradient trains (a stack under backprop). Under a rule
whose task loss trains the model (backprop, hybrid), and whenever the error is the raw score,
the head and the model learn online from that next-value loss, one optimizer step per chunk,
after the chunk has been scored.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from tasks.encoders import ScalarEncoder, day_of_week_encoder, time_of_day_encoder
from tasks.nab.corpus import Series


@dataclass
class Settings:
    """The detector's settings (the task's config); one set for every file."""

    chunk: int | None = None  # steps per forward pass; None: 100 under a local rule, 16 otherwise
    value_size: int = 150
    value_active: int = 21
    time_size: int = 0  # 0: no time of day (240: 6 minutes per bit)
    time_active: int = 21
    day_size: int = 0  # 0: no day of week (147: one block of 21 bits per day)
    day_active: int = 21
    value_margin: float = 0.1  # the value code spans the file's range widened by this much each side
    raw: str = "auto"  # columns | error | auto (columns where the model has them and grows them locally)
    ensemble: int = 1  # fresh models per file (seeds seed, seed + 1, ...); the raw score is their mean

    def __post_init__(self):
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"task.chunk must be >= 1 or null, got {self.chunk}")
        if self.raw not in ("auto", "columns", "error"):
            raise ValueError(f"task.raw must be 'auto', 'columns' or 'error', got {self.raw!r}")
        if not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ValueError(f"task.ensemble must be an integer >= 1, got {self.ensemble!r}")
        if self.value_margin < 0:
            raise ValueError(f"task.value_margin must be >= 0, got {self.value_margin}")


def calendar(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """datetime64 -> (minute of the day, day of the week with Monday = 0), as floats."""
    days = times.astype("datetime64[D]")
    minutes = (times.astype("datetime64[m]") - days).astype(np.int64)
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    return minutes.astype(np.float64), weekday.astype(np.float64)


def value_range(values: np.ndarray, margin: float) -> tuple[float, float]:
    """The file's min..max widened by `margin` x its width each side (1 for a flat file)."""
    low, high = float(values.min()), float(values.max())
    spread = (high - low) * margin or 1.0
    return low - spread, high + spread


class RecordEncoder(nn.Module):
    """batch {"value", "minute", "weekday"} (B, T) -> the codes of the value, the time of day
    and the day of the week side by side (B, T, D); a part of size 0 is left out."""

    def __init__(self, low: float, high: float, s: Settings):
        super().__init__()
        self.value = ScalarEncoder(low, high, s.value_size, s.value_active)
        self.minute = time_of_day_encoder(s.time_size, s.time_active) if s.time_size else None
        self.weekday = day_of_week_encoder(s.day_size, s.day_active) if s.day_size else None
        self.output_size = s.value_size + s.time_size + s.day_size

    def forward(self, batch: dict) -> torch.Tensor:
        parts = [self.value(batch["value"])]
        parts += [] if self.minute is None else [self.minute(batch["minute"])]
        parts += [] if self.weekday is None else [self.weekday(batch["weekday"])]
        return torch.cat(parts, -1)


def encoder_for(values: np.ndarray, settings: Settings) -> RecordEncoder:
    return RecordEncoder(*value_range(values, settings.value_margin), settings)


class Learner:
    """The online next-value loss of a model and its linear head: one optimizer step per chunk."""

    def __init__(self, model: nn.Module, rule, optimizer, clip: float | None):
        self.model, self.rule, self.clip = model, rule, clip
        self.head = nn.Linear(model.output_size, 1)
        params = [p for p in [*model.parameters(), *self.head.parameters()] if p.requires_grad]
        self.optimizer = optimizer(params)
        self.last = None  # the prediction of the next value made at the previous chunk's last step

    def step(self, out, target: torch.Tensor) -> np.ndarray:
        """The chunk's errors |prediction made at t-1 - value at t|, then one learning step.
        target: (T,) the chunk's values in units of the file's range."""
        prediction = self.head(self.rule.head_features(out.cells))[0, :, 0]
        before = prediction.detach()
        first = before.new_tensor([target[0].item() if self.last is None else self.last])
        error = (torch.cat([first, before[:-1]]) - target).abs().clamp(0.0, 1.0).numpy()
        self.last = float(before[-1])
        loss = F.mse_loss(prediction[:-1], target[1:]) if len(target) > 1 else prediction.sum() * 0.0
        loss = loss + self.rule.local_loss_weight * out.local_loss
        if loss.requires_grad:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip is not None:
                nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.clip)
            self.optimizer.step()
        return error


def stream(encoder: RecordEncoder, batch: dict, target: torch.Tensor, settings: Settings, model_cfg, rule_cfg,
           optimizer_cfg, clip: float | None) -> np.ndarray:
    """The raw scores of one fresh model over the whole file, chunk by chunk."""
    model = instantiate(model_cfg, input_size=encoder.output_size)
    rule = instantiate(rule_cfg)
    rule.check(model)
    # A stack's columns mean something where its segments grow by the local rule (local, hybrid);
    # under backprop alone they are random and nearly every column is unpredicted.
    grown = rule.is_local(0) or rule.grows_segments
    columns = settings.raw == "columns" or (settings.raw == "auto" and hasattr(model, "layers") and grown)
    learner = None
    if rule.task_loss_trains_model or not columns or not rule.is_local(0):
        learner = Learner(model, rule, instantiate(optimizer_cfg), clip)
    chunk = settings.chunk or (100 if learner is None else 16)
    state = model.initial_state(1)
    raw = np.zeros(len(target))
    for first in range(0, len(target), chunk):
        steps = slice(first, first + chunk)
        x = encoder({k: v[:, steps] for k, v in batch.items()})
        with torch.set_grad_enabled(learner is not None):
            out, state = model(x, state, learning=rule)
            error = None if learner is None else learner.step(out, target[steps])
        raw[steps] = out.anomaly[0].detach().numpy() if columns else error
        state = model.detach_state(state)
    return raw


def detect(series: Series, settings: Settings, model_cfg, rule_cfg, optimizer_cfg, clip: float | None, seed: int):
    """Raw anomaly scores (one per data row; 0 for skipped rows) and the seconds spent: the
    mean over `settings.ensemble` fresh models (seeds seed, seed + 1, ...)."""
    good = series.good
    values = series.values[good]
    minutes, weekdays = calendar(series.times[good])
    encoder = encoder_for(values, settings)
    low, high = encoder.value.minimum, encoder.value.maximum
    target = torch.from_numpy((values - low) / (high - low)).float()
    batch = {k: torch.from_numpy(v)[None] for k, v in (("value", values), ("minute", minutes), ("weekday", weekdays))}
    start = time.perf_counter()
    raw = np.zeros(len(values))
    for member in range(settings.ensemble):
        torch.manual_seed(seed + member)  # every file's fresh model starts alike
        raw += stream(encoder, batch, target, settings, model_cfg, rule_cfg, optimizer_cfg, clip)
    seconds = time.perf_counter() - start
    scores = np.zeros(len(series))
    scores[good] = np.clip(raw / settings.ensemble, 0.0, 1.0)
    return scores, seconds
