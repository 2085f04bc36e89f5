"""TaxiTask: online prediction of a scalar series `horizon` steps ahead (Cui et al. 2016: NYC
taxi passenger counts every 30 min, 5 steps = 2.5 h ahead), with time of day and day of week
as extra inputs. Reads the NuPIC/htmresearch CSV format (3 header rows: names, types, flags)
and the NAB format (`timestamp,value`, one header row).

Prequential: the prediction at step t of value[t+horizon] is recorded before anything is
learned from it, and the head learns that target only once value[t+horizon] is in the past
(`DelayedHead`). Scored from record `score_from` on (`nrmse`, `mape`, `nll`).
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


class DelayedHead(nn.Module):
    """Linear readouts of the value `horizon` steps ahead (standardised) and of its bucket
    probabilities.

    Keeps the last `horizon` feature vectors (detached) of each stream: their targets arrive
    with the next chunk, so they are learned then. `forward` returns the predictions for the
    chunk ("value", "logits") and, for learning, the outputs of every step whose target is
    now in the past ("learn_value", "learn_logits", aligned with the last steps of the chunk).
    """

    def __init__(self, feature_size: int, horizon: int, buckets: int):
        super().__init__()
        self.horizon = horizon
        self.value = nn.Linear(feature_size, 1)
        self.logits = nn.Linear(feature_size, buckets)
        self.pending = None  # (B, <= horizon, F); saved and restored by TaxiTask.state_dict

    def forward(self, features: torch.Tensor) -> dict:
        pending = features[:, :0] if self.pending is None else self.pending.to(features)
        every = torch.cat([pending.detach(), features], 1)
        self.pending = every[:, -self.horizon :].detach()
        value, logits = self.value(every).squeeze(-1), self.logits(every)
        now, known = pending.shape[1], max(every.shape[1] - self.horizon, 0)
        return {
            "value": value[:, now:],
            "logits": logits[:, now:],
            "learn_value": value[:, :known],
            "learn_logits": logits[:, :known],
        }


class TaxiTask(Task):
    """Scalar series prediction `horizon` steps ahead.

    Args:
        data_dir: data root; default file <data_dir>/sequence_prediction/nyc_taxi[_perturb].csv.
        variant: "original" | "perturbed" (ignored when `file` is set).
        file: a NuPIC or NAB CSV, absolute or relative to data_dir (e.g.
            nab/data/realKnownCause/machine_temperature_system_failure.csv).
        calibration: the first records, which fix the value encoder's range and the head's
            standardisation (the series' later range is not known in advance online).
        records: use only the first `records` records (quick runs); null: all.
        nll_range: [low, high] of the NLL buckets; null: the series' min and max.
    """

    streaming = True

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
        self.mean, self.std = float(head.mean()), float(head.std()) or 1.0
        self.nll_buckets = nll_buckets
        self.nll_range = (
            tuple(nll_range) if nll_range is not None else (float(self.values.min()), float(self.values.max()))
        )
        self.head, self._pending = None, None  # _pending: restored before the head was built
        self._prediction = np.full(n, np.nan)  # prediction of value[i], made at i - horizon
        self._probs = np.full((n, nll_buckets), np.nan)
        self._seconds, self._elements, self._last = 0.0, 0, None

    def datamodule(self) -> ArrayStreams:
        return ArrayStreams(self._arrays, self.chunk)

    def build_head(self, feature_size):
        self.head = DelayedHead(feature_size, self.horizon, self.nll_buckets)
        self.head.pending = self._pending
        return self.head

    def _bucket(self, value: torch.Tensor) -> torch.Tensor:
        low, high = self.nll_range
        return ((value - low) / (high - low) * self.nll_buckets).long().clamp(0, self.nll_buckets - 1)

    def loss(self, head_out, batch):
        known = head_out["learn_value"].shape[1]
        if known == 0:
            return head_out["value"].sum() * 0.0
        target = batch["value"][:, -known:].float()  # value[t + horizon] of each learnable step t
        mse = F.mse_loss(head_out["learn_value"], (target - self.mean) / self.std)
        return mse + F.cross_entropy(head_out["learn_logits"].flatten(0, 1), self._bucket(target).flatten())

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
        value = head_out["value"][0].detach().double().cpu().numpy() * self.std + self.mean
        probs = head_out["logits"][0].detach().double().softmax(-1).cpu().numpy()
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

    def summary(self):
        out = {key: None for key in ("nrmse", "mape", "nll")}
        out.update(self.compute_metrics("train"))
        out["us_per_element"] = 1e6 * self._seconds / self._elements if self._elements else None
        out["file"] = str(self.path)
        return out

    def curves(self):
        """Absolute error of each prediction, as a running mean over one day (48 records)."""
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
