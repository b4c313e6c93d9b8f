"""Sample-quality statistics on feature vectors (docs/evaluation.md).

FID and KID come from torchmetrics, fed features that were already extracted (the feature
network runs once per image, possibly on another process, and the features are already
gathered, so the metrics never synchronise across processes themselves); precision and recall follow
Kynkäänniemi et al. (2019) with k-nearest-neighbour manifolds, which torchmetrics lacks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class Precomputed(nn.Module):
    """A torchmetrics ``feature=`` network for vectors that are already features: the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½) of two feature sets ``[N, D]`` (torchmetrics' FID)."""
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), normalize=True, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 100) -> tuple[float, float]:
    """KID: the unbiased MMD² with a cubic polynomial kernel, mean and std over random subsets (torchmetrics)."""
    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size, normalize=True,
                                     sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself


def _inside(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each query lies within some support point's k-NN ball."""
    return (torch.cdist(queries, support) <= radii[None, :]).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Precision: the fraction of generated samples inside the real manifold (the union of balls
    around each real feature with radius its k-th nearest-neighbour distance). Recall: the
    fraction of real samples inside the generated manifold.
    """
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def class_histogram(predictions: torch.Tensor, num_classes: int = 10) -> list[float]:
    """Fraction of samples assigned to each class."""
    counts = torch.bincount(predictions.long(), minlength=num_classes).double()
    return (counts / counts.sum()).tolist()
