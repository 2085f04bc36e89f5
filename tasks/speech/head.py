"""The classifier on top of the sequence model."""

import torch
from torch import nn

from predictive.memory import column_activity


class SegmentPoolHead(nn.Module):
    """Mean of the features over `segments` equal spans of time, concatenated in order, then
    linear. Pooling makes the answer depend on the whole clip (not only the last step, where a
    short word has long faded), and several segments keep the order of its sounds.

    cells_per_column > 1 (a temporal-memory stack): the features are first taken per column,
    the largest of its cells (1 when the column is active, whichever of its cells fired). The
    cells tell which context a sound came in; a clip heard in training fires the cells of its
    learned context, a new clip bursts its columns, so a head on single cells sees different
    features in test than in training (FSDD, measured: 77% test from cells, 95% from columns,
    docs/results.md "Speech").
    """

    def __init__(
        self, feature_size: int, num_classes: int, segments: int = 4, dropout: float = 0.0, cells_per_column: int = 1
    ):
        super().__init__()
        if cells_per_column < 1 or feature_size % cells_per_column:
            raise ValueError(
                f"task.cells_per_column={cells_per_column} must be >= 1 and divide the "
                f"model's output size {feature_size}"
            )
        self.segments, self.cells_per_column = segments, cells_per_column
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(feature_size // cells_per_column * segments, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, classes) logits."""
        if features.shape[1] < self.segments:
            raise ValueError(f"{features.shape[1]} time steps < task.segments={self.segments}")
        if self.cells_per_column > 1:
            features = column_activity(features, self.cells_per_column)
        pooled = torch.cat([s.mean(1) for s in torch.tensor_split(features, self.segments, dim=1)], 1)
        return self.linear(self.dropout(pooled))
