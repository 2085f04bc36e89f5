"""A readout that learns by counting instead of by a gradient, so that learning one class, or
new examples of it, overwrites nothing that was learned of another (continual learning).

A linear readout trained by a gradient moves every class's weights at every step: trained on
new classes (or new speakers) alone it drifts away from the old ones, whatever the features
below it do. `ClassMeans` keeps one prototype per class, the mean of that class's examples."""

import torch
import torch.nn.functional as F
from torch import nn


class ClassMeans(nn.Module):
    """Nearest-class-mean readout: class c's prototype is the running mean of the unit-length
    features of its examples (`learn`), so the n-th example moves it by 1/n and examples of
    other classes do not move it at all. Scores: cosine similarity of the features with each
    prototype, times a learned `sharpness` (it only scales the scores for a cross-entropy, the
    answer is the same); a class with no example yet scores -1, below any seen class.

    features (..., F) -> scores (..., classes). `learn` is explicit (no gradient), and the
    head calls it in training mode only: evaluation changes nothing.
    """

    def __init__(self, feature_size: int, num_classes: int):
        super().__init__()
        if feature_size < 1 or num_classes < 2:
            raise ValueError(f"ClassMeans: feature_size >= 1 and num_classes >= 2, got {feature_size}, {num_classes}")
        self.register_buffer("sums", torch.zeros(num_classes, feature_size))
        self.register_buffer("counts", torch.zeros(num_classes))
        self.sharpness = nn.Parameter(torch.tensor(10.0))

    @property
    def prototypes(self) -> torch.Tensor:
        """(classes, F) unit-length class means (zero for a class with no example)."""
        return F.normalize(self.sums, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(features, dim=-1) @ self.prototypes.T
        cosine = torch.where(self.counts > 0, cosine, -1.0)
        return self.sharpness * cosine

    @torch.no_grad()
    def learn(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add examples (N, F) of classes `labels` (N,) to their classes' means."""
        unit = F.normalize(features.detach().reshape(-1, features.shape[-1]), dim=-1)
        labels = labels.reshape(-1)
        self.sums.index_add_(0, labels, unit.to(self.sums.dtype))
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))
