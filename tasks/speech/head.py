"""The classifier on top of the sequence model."""

import torch
import torch.nn.functional as F
from torch import nn

from predictive.memory import column_activity
from predictive.readout import ClassMeans, LinearDiscriminant

READOUTS = {"linear": None, "class_means": ClassMeans, "discriminant": LinearDiscriminant}


def segment_means(features: torch.Tensor, span: torch.Tensor, segments: int) -> torch.Tensor:
    """(B, T, F) features, (B, 2) spans [start, end) -> (B, segments x F): the means over
    `segments` near-equal parts of each clip's span, in order (a part is at least one frame)."""
    b, t, f = features.shape
    sums = F.pad(features.cumsum(1), (0, 0, 1, 0))  # sums[:, i] = frames 0 .. i-1
    start, length = span[:, :1], span[:, 1:] - span[:, :1]
    edges = start + length * torch.arange(segments + 1, device=span.device) // segments
    low = edges[:, :-1].clamp(max=t - 1)
    high = torch.maximum(edges[:, 1:], low + 1)
    total = lambda i: sums.gather(1, i.unsqueeze(-1).expand(b, segments, f))  # noqa: E731
    return ((total(high) - total(low)) / (high - low).unsqueeze(-1)).flatten(1)


class SegmentPoolHead(nn.Module):
    """Mean of the features over `segments` equal spans of time, concatenated in order, then
    linear. Pooling makes the answer depend on the whole clip (not only the last step, where a
    short word has long faded), and several segments keep the order of its sounds.

    span (from `tasks.speech.features.voiced_span`): the segments divide the span of the clip
    that holds the word instead of the whole clip, so the same part of a word lands in the
    same segment whatever its onset and length.

    cells_per_column > 1 (a temporal-memory stack): the features are first taken per column,
    the largest of its cells (1 when the column is active, whichever of its cells fired). The
    cells tell which context a sound came in; a clip heard in training fires the cells of its
    learned context, a new clip bursts its columns, so a head on single cells sees different
    features in test than in training (docs/results.md, "Speech").

    average > 0: the head also keeps an exponential moving average of its weights, decay
    min(average, (1 + n) / (10 + n)) at training step n (the usual warm-up), and answers with
    the average in eval mode (validation, test). A head trained for a few hundred steps on
    noisy, augmented features ends wherever its last steps left it; the average is a better
    estimate of the weights it was converging to. Only the head is averaged, never the model
    below it.

    readout="class_means" | "discriminant": the pooled features go to a readout that learns by
    counting from the labels passed in training (`label`), instead of the linear map: class
    means, or class means and a shared covariance (`predictive.readout`). Learning new classes
    or speakers then overwrites nothing of the old ones (continual learning). No dropout or
    averaging apply to them.
    """

    def __init__(
        self,
        feature_size: int,
        num_classes: int,
        segments: int = 4,
        dropout: float = 0.0,
        cells_per_column: int = 1,
        average: float = 0.0,
        readout: str = "linear",
    ):
        super().__init__()
        if cells_per_column < 1 or feature_size % cells_per_column:
            raise ValueError(
                f"task.cells_per_column={cells_per_column} must be >= 1 and divide the "
                f"model's output size {feature_size}"
            )
        self.segments, self.cells_per_column = segments, cells_per_column
        self.dropout = nn.Dropout(dropout)
        if not 0.0 <= average < 1.0:
            raise ValueError(f"task.head_average must be in [0, 1), got {average}")
        if readout not in READOUTS:
            raise ValueError(f"task.readout must be one of {list(READOUTS)}, got {readout!r}")
        pooled = feature_size // cells_per_column * segments
        self.linear = nn.Linear(pooled, num_classes) if readout == "linear" else None
        self.counting = READOUTS[readout](pooled, num_classes) if READOUTS[readout] else None
        self.average = average
        if average and self.linear is not None:
            self.register_buffer("average_weight", self.linear.weight.detach().clone())
            self.register_buffer("average_bias", self.linear.bias.detach().clone())
            self.register_buffer("average_steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_average(self) -> None:
        """One step of the moving average towards the current weights."""
        n = self.average_steps.to(self.average_weight.dtype)  # a tensor: no host sync on a GPU
        rate = 1 - ((1 + n) / (10 + n)).clamp(max=self.average)
        self.average_weight.lerp_(self.linear.weight, rate)
        self.average_bias.lerp_(self.linear.bias, rate)
        self.average_steps += 1

    def forward(
        self, features: torch.Tensor, span: torch.Tensor | None = None, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, F) features, span (B, 2) frames [start, end) to pool over (None: all T) ->
        (B, classes) logits. label (B,): the classes, for a counting readout in training."""
        if features.shape[1] < self.segments:
            raise ValueError(f"{features.shape[1]} time steps < task.segments={self.segments}")
        if self.cells_per_column > 1:
            features = column_activity(features, self.cells_per_column)
        if span is None:
            pooled = torch.cat([s.mean(1) for s in torch.tensor_split(features, self.segments, dim=1)], 1)
        else:
            pooled = segment_means(features, span, self.segments)
        if self.counting is not None:
            scores = self.counting(pooled)  # predicted before it learns from this batch
            if self.training and label is not None:
                known = label >= 0  # clips whose label is withheld (task.label_fraction) count for nothing
                self.counting.learn(pooled[known], label[known])
            return scores
        if self.average and not self.training:
            return F.linear(pooled, self.average_weight, self.average_bias)
        if self.average and torch.is_grad_enabled():  # a training step: the weights of the last one
            self.update_average()
        return self.linear(self.dropout(pooled))
