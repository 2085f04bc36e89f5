"""The classifier on top of the sequence model."""
import torch
from torch import nn


class SegmentPoolHead(nn.Module):
    """Mean of the features over `segments` equal spans of time, concatenated in order, then
    linear. Pooling makes the answer depend on the whole clip (not only the last step, where a
    short word has long faded), and several segments keep the order of its sounds."""

    def __init__(self, feature_size: int, num_classes: int, segments: int = 4, dropout: float = 0.0):
        super().__init__()
        self.segments = segments
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(feature_size * segments, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, classes) logits."""
        if features.shape[1] < self.segments:
            raise ValueError(f"{features.shape[1]} time steps < task.segments={self.segments}")
        pooled = torch.cat([s.mean(1) for s in torch.tensor_split(features, self.segments, dim=1)], 1)
        return self.linear(self.dropout(pooled))
