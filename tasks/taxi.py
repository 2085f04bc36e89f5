"""TaxiTask: online prediction of a scalar series `horizon` steps ahead (Cui et al. 2016: NYC
taxi passenger counts every 30 min, 5 steps = 2.5 h ahead), with time of day and day of week
as extra inputs. Reads the NuPIC/htmresearch CSV format (3 header rows: names, types, flags)
and the NAB format (`timestamp,value`, one header row).

Prequential: the prediction at step t of value[t+horizon] is recorded before anything is
learned from it, and the head learns that target only once value[t+horizon] is in the past
(`BucketHead`). Scored from record `score_from` on (`nrmse`, `mape`, `nll`).
"""

import csv
import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from predictive.harness.settings import COUNT, choice, is_number, number
from predictive.memory import column_activity
from tasks.base import Task
from tasks.encoders import ScalarEncoder, day_of_week_encoder, time_of_day_encoder
from tasks.streams import ArrayStreams

FILES = {"original": "nyc_taxi.csv", "perturbed": "nyc_taxi_perturb.csv"}


def read_series(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, minute of day, day of week 0=Monday) from a NuPIC or NAB CSV file."""
    if not path.is_file():
        raise FileNotFoundError(f"series file not found: {path} (set task.file, paths.data_dir or PREDICTIVE_DATA_DIR)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    column = next((header.index(c) for c in ("value", "passenger_count") if c in header), None)
    if "timestamp" not in header or column is None:
        raise ValueError(f"{path}:1: expected columns 'timestamp' and 'value' (or 'passenger_count'), got {header}")
    stamp = header.index("timestamp")
    # NuPIC files have two more header rows: field types ("datetime", ...) and flags.
    first = 3 if len(rows) > 1 and rows[1] and rows[1][0].strip() == "datetime" else 1
    values, minutes, days = [], [], []
    for line, row in enumerate(rows[first:], start=first + 1):
        if not row:
            continue
        try:
            when = datetime.fromisoformat(row[stamp].strip())
            value = float(row[column])
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}:{line}: malformed row {row}: {e}") from e
        if not math.isfinite(value):
            raise ValueError(f"{path}:{line}: value is {value}")
        values.append(value)
        minutes.append(when.hour * 60 + when.minute)
        days.append(when.weekday())
    if not values:
        raise ValueError(f"{path}: no data rows")
    return np.asarray(values), np.asarray(minutes, dtype=np.float64), np.asarray(days, dtype=np.float64)


def _is_pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(v) for v in value)


def nrmse(prediction: np.ndarray, truth: np.ndarray, data_std: float) -> float:
    """Root mean squared error over the standard deviation of the whole series."""
    return float(np.sqrt(np.mean((prediction - truth) ** 2)) / data_std)


def mape(prediction: np.ndarray, truth: np.ndarray) -> float:
    """sum |error| / sum |truth| (htmresearch's 'alternative MAPE', robust to zeros)."""
    return float(np.abs(prediction - truth).sum() / np.abs(truth).sum())


def bucket_nll(probs: np.ndarray, truth: np.ndarray, low: float, high: float, floor: float = 0.01) -> float:
    """Mean -log p(bucket of truth) over len(probs[0]) equal buckets of [low, high]; values
    outside go to the end buckets; probabilities are floored so one miss costs at most
    -log(floor)."""
    n = probs.shape[1]
    bucket = np.clip(((truth - low) / (high - low) * n).astype(np.int64), 0, n - 1)
    p = probs[np.arange(len(truth)), bucket]
    return float(-np.log(np.maximum(p, floor)).mean())


class SeriesInput(nn.Module):
    """batch {"value", "minute", "weekday"} (B, T) -> concatenated sparse codes (B, T, D)."""

    def __init__(self, value: ScalarEncoder, time_size: int, day_size: int, active: int):
        super().__init__()
        self.value = value
        self.minute = time_of_day_encoder(time_size, active)
        self.weekday = day_of_week_encoder(day_size, active)
        self.output_size = value.size + time_size + day_size

    def forward(self, batch: dict) -> torch.Tensor:
        return torch.cat([self.value(batch["value"]), self.minute(batch["minute"]), self.weekday(batch["weekday"])], -1)


def soft_targets(bucket: torch.Tensor, buckets: int, sigma: float) -> torch.Tensor:
    """(...) bucket indices -> (..., buckets) target distributions: one-hot for sigma = 0, else
    a Gaussian over bucket distance (neighbouring buckets are close values, so a miss by one
    bucket is not a miss by ten)."""
    if sigma <= 0:
        return F.one_hot(bucket, buckets).float()
    distance = torch.arange(buckets, device=bucket.device) - bucket.unsqueeze(-1)
    q = torch.exp(-0.5 * (distance / sigma) ** 2)
    return q / q.sum(-1, keepdim=True)


class BucketHead(nn.Module):
    """A per-bucket softmax readout of the value `horizon` steps ahead (HTM's SDR classifier),
    learned online, one element at a time.

    The value range `edges` is cut into K buckets; the readout gives a distribution over them,
    and the prediction is `mix` x its mean + (1 - mix) x its median, both over each bucket's
    running mean of the values seen in it. The weights learn by the task loss itself: per
    element, one normalised SGD step on the cross-entropy against (Gaussian-smoothed) bucket
    targets, W += rate * f (q - p)^T / |f|^2 (`learn`, called by `TaxiTask.loss`), so the head
    learns at every element whatever the chunk length and the optimizer's period. Only the
    per-bucket bias is a parameter that the harness's optimizer trains (it also gives the task
    loss its gradient path into the model in backprop and hybrid modes, where the features
    are not detached).

    Readout features (`readout`): "cells" (the model's output as is), "columns" (the maximum
    over each group of `group` units: a temporal-memory layer's active columns), or "both".

    Keeps the last `horizon` feature vectors (detached) of each stream: their targets arrive
    with the next chunk, so they are learned then. `forward` returns the predictions for the
    chunk ("value", "probs" over `nll_edges`, "logits") and, for learning, the logits and
    features of every step whose target is now in the past ("learn_logits", "learn_features",
    aligned with the last steps of the chunk).
    """

    def __init__(
        self,
        feature_size: int,
        horizon: int,
        edges: torch.Tensor,
        nll_edges: torch.Tensor,
        rate: float = 6.0,
        sigma: float = 1.0,
        mix: float = 0.3,
        readout: str = "columns",
        group: int = 1,
    ):
        super().__init__()
        if readout not in ("cells", "columns", "both"):
            raise ValueError(f"task.readout must be 'cells', 'columns' or 'both', got {readout!r}")
        if group < 1 or feature_size % group:
            raise ValueError(f"task.group ({group}) must divide the model's output size ({feature_size})")
        if rate <= 0 or sigma < 0 or not 0 <= mix <= 1:
            raise ValueError(f"task.rate must be > 0, task.sigma >= 0, task.mix in [0, 1]; got {rate}, {sigma}, {mix}")
        self.horizon, self.rate, self.sigma, self.mix = horizon, rate, sigma, mix
        self.readout, self.group = readout, group
        columns = feature_size // group
        size = {"cells": feature_size, "columns": columns, "both": feature_size + columns}[readout]
        buckets = len(edges) - 1
        self.register_buffer("edges", edges.double())
        centers = (edges[:-1] + edges[1:]).double() / 2
        self.register_buffer("centers", centers)
        self.register_buffer("weight", torch.zeros(size, buckets))  # learned by `learn`, not by the optimizer
        self.bias = nn.Parameter(torch.zeros(buckets))
        self.register_buffer("value_sum", torch.zeros(buckets, dtype=torch.float64))
        self.register_buffer("value_count", torch.zeros(buckets, dtype=torch.float64))
        # Bucket -> NLL bucket (by the bucket's centre), to report the NLL on the task's buckets.
        to_nll = torch.bucketize(centers, nll_edges.double()[1:-1].contiguous())
        self.register_buffer("to_nll", F.one_hot(to_nll, len(nll_edges) - 1).double())
        self.pending = None  # (B, <= horizon, features); saved and restored by TaxiTask.state_dict

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.readout == "cells":
            return x
        columns = column_activity(x, self.group)
        return columns if self.readout == "columns" else torch.cat([x, columns], -1)

    def bucket(self, value: torch.Tensor) -> torch.Tensor:
        inner = self.edges[1:-1].contiguous()
        return torch.bucketize(value.double().contiguous(), inner)

    def bucket_values(self) -> torch.Tensor:
        """Each bucket's mean of the values seen in it (its centre until it has seen one)."""
        seen = self.value_count > 0
        return torch.where(seen, self.value_sum / self.value_count.clamp(min=1), self.centers)

    def forward(self, x: torch.Tensor) -> dict:
        features = self.features(x)
        pending = features[:, :0] if self.pending is None else self.pending.to(features)
        every = torch.cat([pending.detach(), features], 1)
        self.pending = every[:, -self.horizon :].detach()
        # A copy: `learn` changes the weights in place before the task loss's backward pass.
        logits = every @ self.weight.clone() + self.bias
        now, known = pending.shape[1], max(every.shape[1] - self.horizon, 0)
        with torch.no_grad():
            p = logits[:, now:].double().softmax(-1)
            values = self.bucket_values()
            median = values[(p.cumsum(-1) < 0.5).sum(-1).clamp(max=len(values) - 1)]
            value = self.mix * (p @ values) + (1 - self.mix) * median
        return {
            "value": value,
            "probs": p @ self.to_nll,
            "logits": logits[:, now:],
            "learn_logits": logits[:, :known],
            "learn_features": every[:, :known].detach(),
        }

    @torch.no_grad()
    def learn(self, features: torch.Tensor, target: torch.Tensor):
        """One SGD step per element, in order: features (B, n, F) of the steps whose targets
        (B, n) (raw values) are now known. Streams are averaged."""
        bucket = self.bucket(target)
        q = soft_targets(bucket, self.weight.shape[1], self.sigma)
        norm = features.pow(2).sum(-1).clamp(min=1e-6)  # (B, n): |f|^2, the number of active units
        for t in range(features.shape[1]):
            # The features are sparse (active cells or columns): only their rows of the
            # weights are read and changed, not all of them.
            used = features[:, t].any(0).nonzero().squeeze(1)
            f = features[:, t].index_select(1, used)
            p = torch.addmm(self.bias, f, self.weight.index_select(0, used)).softmax(-1)
            step = (self.rate / features.shape[0]) * (q[:, t] - p) / norm[:, t, None]
            self.weight.index_add_(0, used, f.t() @ step)
            self.value_sum.index_add_(0, bucket[:, t].flatten(), target[:, t].double().flatten())
            self.value_count.index_add_(0, bucket[:, t].flatten(), torch.ones_like(target[:, t], dtype=torch.float64))


class TaxiTask(Task):
    """Scalar series prediction `horizon` steps ahead.

    Args:
        data_dir: data root; default file <data_dir>/sequence_prediction/nyc_taxi[_perturb].csv.
        variant: "original" | "perturbed" (ignored when `file` is set).
        file: a NuPIC or NAB CSV, absolute or relative to data_dir (e.g.
            nab/data/realKnownCause/machine_temperature_system_failure.csv).
        calibration: the first records, which fix the value encoder's and the head's ranges
            (the series' later range is not known in advance online).
        records: use only the first `records` records (quick runs); null: all.
        nll_range: [low, high] of the NLL buckets; null: the series' min and max.
        buckets, head_margin: the head's value buckets: `buckets` equal ones over the
            calibration range widened by `head_margin` x its width on each side (values outside
            fall in the end buckets, whose running means follow them).
        rate, sigma, mix, readout, group: the head's (`BucketHead`) per-element learning rate,
            target smoothing (in buckets), mean/median mix, readout features and cells per
            column (the configs pass `model.cells`).
    """

    streaming = True
    settings = {
        "variant": choice(*FILES),
        "records": number(1, integer=True, null=True),
        **{key: COUNT for key in ("horizon", "chunk", "calibration", "value_size", "time_size", "day_size",
                                  "nll_buckets", "group")},
        "score_from": number(0, integer=True),  # its upper limit depends on the file: checked when it is read
        "features": choice("cells", "predicted"),
        "active": number(1, "value_size", integer=True),
        "nll_range": lambda value, get: None if value is None or (
            _is_pair(value) and value[0] < value[1]) else "[low, high] with low < high, or null",
        "buckets": number(2, integer=True),
        "head_margin": number(0),
        "rate": number(0, low_open=True),
        "sigma": number(0),
        "mix": number(0, 1),
        "readout": choice("cells", "columns", "both"),
    }

    def __init__(
        self,
        data_dir="data",
        variant="original",
        file=None,
        records=None,
        horizon=5,
        score_from=10000,
        chunk=50,
        features="cells",
        calibration=1000,
        value_size=400,
        time_size=240,
        day_size=147,
        active=21,
        nll_buckets=22,
        nll_range=(0.0, 40000.0),
        buckets=100,
        head_margin=0.25,
        rate=6.0,
        sigma=1.0,
        mix=0.3,
        readout="columns",
        group=1,
    ):
        if file is None:
            if variant not in FILES:
                raise ValueError(f"task.variant must be one of {sorted(FILES)}, got {variant!r}")
            path = Path(data_dir) / "sequence_prediction" / FILES[variant]
        else:
            path = Path(file) if Path(file).is_absolute() else Path(data_dir) / file
        if features not in ("cells", "predicted"):
            raise ValueError(f"task.features must be 'cells' or 'predicted', got {features!r}")
        if horizon < 1 or calibration < 1:
            raise ValueError(f"task.horizon and task.calibration must be >= 1, got {horizon}, {calibration}")
        self.values, minutes, days = read_series(path)
        if records is not None:
            if records < 1:
                raise ValueError(f"task.records must be >= 1 or null, got {records}")
            self.values, minutes, days = self.values[:records], minutes[:records], days[:records]
        n = len(self.values)
        if not horizon <= score_from < n - horizon:
            raise ValueError(
                f"task.score_from must be in [{horizon}, {n - horizon}) for {path.name} ({n} records), got {score_from}"
            )
        self.path, self.horizon, self.score_from, self.chunk, self.features = path, horizon, score_from, chunk, features
        self._arrays = {"value": self.values[None], "minute": minutes[None], "weekday": days[None]}
        head = self.values[: min(calibration, n)]
        low, high = head.min(), head.max()
        margin = 0.1 * (high - low) or 1.0
        self.encoder = SeriesInput(
            ScalarEncoder(low - margin, high + margin, value_size, active), time_size, day_size, active
        )
        self.input_size = self.encoder.output_size
        if buckets < 2 or head_margin < 0:
            raise ValueError(f"task.buckets must be >= 2 and task.head_margin >= 0, got {buckets}, {head_margin}")
        spread = head_margin * (high - low) or 1.0
        self.head_edges = torch.linspace(low - spread, high + spread, buckets + 1, dtype=torch.float64)
        self.head_settings = {"rate": rate, "sigma": sigma, "mix": mix, "readout": readout, "group": group}
        self.nll_buckets = nll_buckets
        self.nll_range = (
            tuple(nll_range) if nll_range is not None else (float(self.values.min()), float(self.values.max()))
        )
        self.head, self._pending = None, None  # _pending: restored before the head was built
        self._prediction = np.full(n, np.nan)  # prediction of value[i], made at i - horizon
        self._probs = np.full((n, nll_buckets), np.nan)
        self._seconds, self._elements, self._last = 0.0, 0, None

    def datamodule(self, rank: int = 0) -> ArrayStreams:
        return ArrayStreams(self._arrays, self.chunk)  # one series: every rank streams it

    def build_head(self, feature_size):
        nll_edges = torch.linspace(*self.nll_range, self.nll_buckets + 1, dtype=torch.float64)
        self.head = BucketHead(feature_size, self.horizon, self.head_edges, nll_edges, **self.head_settings)
        self.head.pending = self._pending
        return self.head

    def _bucket(self, value: torch.Tensor) -> torch.Tensor:
        """The NLL bucket of each value."""
        low, high = self.nll_range
        return ((value - low) / (high - low) * self.nll_buckets).long().clamp(0, self.nll_buckets - 1)

    def loss(self, head_out, batch):
        """Cross-entropy of the steps whose targets are now known, against smoothed bucket
        targets. In training the head first learns these steps one by one (`BucketHead.learn`);
        the returned loss (logits from before that) carries the gradient into the model in
        backprop and hybrid modes, and into the head's bias."""
        logits = head_out["learn_logits"]
        known = logits.shape[1]
        if known == 0:
            return head_out["logits"].sum() * 0.0
        target = batch["value"][:, -known:]  # value[t + horizon] of each learnable step t
        if self.head.training:
            self.head.learn(head_out["learn_features"], target)
        q = soft_targets(self.head.bucket(target), logits.shape[-1], self.head.sigma)
        return -(q * logits.log_softmax(-1)).sum(-1).mean()

    def update_metrics(self, stage, head_out, batch, out):
        if stage != "train":
            return
        now = time.perf_counter()
        if self._last is not None:  # one whole chunk cycle; the first one is not timed
            self._seconds += now - self._last
            self._elements += batch["value"].numel()
        self._last = now
        target = batch["index"][0].cpu().numpy() + self.horizon
        inside = target < len(self.values)
        value = head_out["value"][0].detach().double().cpu().numpy()
        probs = head_out["probs"][0].detach().double().cpu().numpy()
        self._prediction[target[inside]] = value[inside]
        self._probs[target[inside]] = probs[inside]

    def compute_metrics(self, stage):
        done = np.flatnonzero(~np.isnan(self._prediction))
        scored = done[done >= self.score_from]
        if stage != "train" or len(scored) == 0:
            return {}
        truth = self.values[scored]
        return {
            "nrmse": nrmse(self._prediction[scored], truth, float(self.values.std())),
            "mape": mape(self._prediction[scored], truth),
            "nll": bucket_nll(self._probs[scored], truth, *self.nll_range),
        }

    def summary(self, ranks: list[dict] | None = None):
        # Every process learns the one series (datamodule): its own figures stand for all.
        out = {key: None for key in ("nrmse", "mape", "nll")}
        out.update(self.compute_metrics("train"))
        out["us_per_element"] = 1e6 * self._seconds / self._elements if self._elements else None
        out["file"] = str(self.path)
        return out

    def curves(self, ranks=None):
        """Absolute error of each prediction, as a running mean over one day (48 records).
        Every process learns the one series (datamodule): its own curve stands for all."""
        done = np.flatnonzero(~np.isnan(self._prediction))
        if len(done) < 48:
            return {}
        error = np.abs(self._prediction[done] - self.values[done])
        smooth = np.convolve(error, np.ones(48) / 48, mode="valid")
        return {"abs_error_1day": ((done[47:] + 1).tolist(), smooth.tolist())}

    def state_dict(self):
        pending = None if self.head is None or self.head.pending is None else self.head.pending.cpu()
        return {
            "prediction": torch.from_numpy(self._prediction.copy()),
            "probs": torch.from_numpy(self._probs.copy()),
            "pending": pending,
            "seconds": self._seconds,
            "elements": self._elements,
        }

    def load_state_dict(self, state):
        self._prediction = state["prediction"].numpy().copy()
        self._probs = state["probs"].numpy().copy()
        self._pending = state["pending"]
        if self.head is not None:
            self.head.pending = self._pending
        self._seconds, self._elements, self._last = state["seconds"], state["elements"], None
