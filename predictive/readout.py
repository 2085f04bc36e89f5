"""Readouts that learn by counting instead of by a gradient, so that learning one class, or
new examples of it, overwrites nothing that was learned of another (continual learning).

A linear readout trained by a gradient moves every class's weights at every step: trained on
new classes (or new speakers) alone it drifts away from the old ones, whatever the features
below it do. `ClassMeans` keeps one prototype per class, the mean of that class's examples;
`LinearDiscriminant` adds one covariance shared by the classes (streaming linear
discriminant analysis), as accurate as a trained linear readout where the means alone are not
(docs/results.md, "Continual learning")."""

import torch
import torch.nn.functional as F
from torch import nn


class ClassMeans(nn.Module):
    """Nearest-class-mean readout: class c's prototype is the running mean of the unit-length
    features of its examples (`learn`), so the n-th example moves it by 1/n and examples of
    other classes do not move it at all. Scores: cosine similarity of the features with each
    prototype, times a learned `sharpness` > 0 (it only scales the scores for a cross-entropy,
    the answer is the same); a class with no example yet scores below every seen class.

    features (..., F) -> scores (..., classes). `learn` is explicit (no gradient), and the
    head calls it in training mode only: evaluation changes nothing.
    """

    def __init__(self, feature_size: int, num_classes: int):
        super().__init__()
        if feature_size < 1 or num_classes < 2:
            raise ValueError(f"ClassMeans: feature_size >= 1 and num_classes >= 2, got {feature_size}, {num_classes}")
        self.register_buffer("sums", torch.zeros(num_classes, feature_size))
        self.register_buffer("counts", torch.zeros(num_classes))
        self.log_sharpness = nn.Parameter(torch.tensor(10.0).log())

    @property
    def sharpness(self) -> torch.Tensor:
        return self.log_sharpness.exp()

    @property
    def prototypes(self) -> torch.Tensor:
        """(classes, F) unit-length class means (zero for a class with no example)."""
        return F.normalize(self.sums, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sharpness * self.unseen_last(F.normalize(features, dim=-1) @ self.prototypes.T)

    def unseen_last(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores of the classes with no example yet set 1 below the lowest seen one."""
        seen = self.counts > 0
        if not seen.any():
            return torch.zeros_like(scores)
        floor = scores.masked_fill(~seen, float("inf")).amin(-1, keepdim=True) - 1
        return torch.where(seen, scores, floor)

    def example(self, features: torch.Tensor) -> torch.Tensor:
        """What a class mean averages: the unit-length features."""
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def learn(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add examples (N, F) of classes `labels` (N,) to their classes' means; returns them
        as counted (N, F) and the labels (N,)."""
        x = self.example(features.detach().reshape(-1, features.shape[-1])).to(self.sums.dtype)
        labels = labels.reshape(-1)
        self.sums.index_add_(0, labels, x)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))
        return x, labels


class LinearDiscriminant(ClassMeans):
    """Streaming linear discriminant analysis (Hayes & Kanan 2020): the class means of
    `ClassMeans` (of the raw features) and the within-class covariance shared by all classes,
    both kept as running sums of every example seen, so nothing learned is overwritten. Scores:
    the linear discriminant w_c . x + b_c, w_c = S^-1 mu_c, b_c = -w_c . mu_c / 2, with S the
    covariance shrunk towards its mean variance by `shrinkage` (there are fewer examples than
    features); a class with no example yet scores below every seen class.

    Solving for w costs O(F^3) (seconds at 4,096 features), so the solution is cached: in eval
    mode it is solved again whenever something was learned since; in training mode at most every
    `refresh` calls of `learn` (the scores of a training step are then up to that stale; they
    only train `sharpness`, the statistics learn from the labels).
    """

    def __init__(self, feature_size: int, num_classes: int, shrinkage: float = 0.1, refresh: int = 25):
        super().__init__(feature_size, num_classes)
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"LinearDiscriminant: shrinkage must be in (0, 1], got {shrinkage}")
        self.shrinkage, self.refresh = shrinkage, refresh
        self.register_buffer("second", torch.zeros(feature_size, feature_size))  # sum of x x^T
        self.log_sharpness.data.zero_()
        self._solution, self._stale = None, 0

    def example(self, features: torch.Tensor) -> torch.Tensor:
        return features  # the raw features: the covariance says how to weigh them

    @torch.no_grad()
    def learn(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = super().learn(features, labels)
        self.second.addmm_(x.t(), x)
        self._stale += 1
        return x, labels

    @torch.no_grad()
    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w (classes, F), b (classes,)) from the statistics so far, in float64."""
        counts = self.counts.double().clamp(min=1)
        means = self.sums.double() / counts[:, None]
        n = self.counts.double().sum().clamp(min=1)
        within = (self.second.double() - (means.t() * self.counts.double()) @ means) / n
        scale = within.diagonal().mean().clamp(min=1e-12)
        shrunk = (1 - self.shrinkage) * within + self.shrinkage * scale * torch.eye(len(within), dtype=within.dtype)
        w = torch.linalg.solve(shrunk, means.t()).t()
        b = -0.5 * (w * means).sum(-1)
        return w.to(self.sums.dtype), b.to(self.sums.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self._solution is None or (self._stale and (not self.training or self._stale >= self.refresh)):
            self._solution, self._stale = self.solve(), 0
        w, b = self._solution
        return self.sharpness * self.unseen_last(features @ w.t() + b)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._solution = None  # solved again from the loaded statistics
