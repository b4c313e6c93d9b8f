"""Inception Score: exp E_x[KL(p(y | x) ‖ p(y))] (Salimans et al. 2016; docs/likelihood.md#inception-score).

- :func:`inception_score` works on any classifier's class probabilities; the lab feeds it the
  bundled MNIST classifier's ("classifier IS", the form used for MNIST in the literature).
  Its maximum is the number of classes (every image classified with certainty, the classes
  equally often); its minimum 1 (every image gets the same distribution).
- :func:`torchmetrics_inception` computes torchmetrics' Inception-v3 IS and FID, only where
  torch-fidelity and its Inception weights are already on disk; otherwise it returns a one-line
  note and computes nothing (no download is ever attempted).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads into the torch hub cache


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` equal parts of IS = exp(mean_x KL(p(y|x) ‖ p(y))).

    Args:
        probs: ``[N, C]`` class probabilities p(y | x) (rows sum to 1).
        splits: the images are cut, in order, into this many parts; p(y) is each part's mean.

    Raises:
        ValueError: fewer than ``splits × C`` images. A part of n images scores at most n (its
            p(y) is a mixture of n distributions), so a part smaller than the number of classes
            could not reach the maximum C and its score would be biased low.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C] class probabilities, got shape {tuple(probs.shape)}")
    n, c = probs.shape
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive whole number, got {splits!r}")
    if n < splits * c:
        raise ValueError(f"the Inception Score with {splits} split(s) needs at least {splits * c} images ({c} per split, one "
                         f"per class: a split of n images scores at most n), got {n}; use more images or fewer splits")
    scores = []
    for part in torch.tensor_split(probs, splits):
        p_y = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, p_y)  # p log p − p log p(y); 0 log 0 = 0
        scores.append(math.exp(float(kl.sum(1).mean())))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    return float(scores_t.mean()), float(scores_t.std()) if splits > 1 else 0.0


def auto_splits(num_images: int, num_classes: int = 10, max_splits: int = 10, per_class: int = 10) -> int:
    """Splits for a sample count: up to ``max_splits``, each with at least ``per_class`` images per class.

    The plug-in p(y) of a small split makes IS biased low (held-out MNIST digits under the bundled
    classifier: 7.11 as one split of 1,000, 6.84 in 10 splits of 100, 4.99 in 10 splits of 10),
    so splits keep ≥ 100 images for 10 classes. Between ``num_classes`` and that many images there is one split (no spread); below
    ``num_classes`` images, 0 (no score).
    """
    if num_images < num_classes:
        return 0
    return max(1, min(max_splits, num_images // (per_class * num_classes)))


@torch.no_grad()
def classifier_probabilities(classifier, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Softmax outputs ``[N, C]`` of the classifier on images in [-1, 1] (clamped, as shown)."""
    device = next(classifier.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float().clamp(-1, 1)
        out.append(classifier(x).double().softmax(1).cpu())
    return torch.cat(out)


def inception_weights_path() -> Path:
    """Where torch-fidelity keeps its Inception-v3 weights (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def inception_available() -> Optional[str]:
    """None if torchmetrics' Inception IS/FID can run offline, else a one-line reason."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "torchmetrics Inception IS/FID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    if not inception_weights_path().exists():
        return (f"torchmetrics Inception IS/FID skipped: no Inception weights at {inception_weights_path()} "
                "(nothing is downloaded)")
    return None


def _to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def torchmetrics_inception(fake: torch.Tensor, real: Optional[torch.Tensor] = None,
                           splits: int = 10) -> tuple[dict, Optional[str]]:
    """torchmetrics' Inception IS (and FID against ``real``) of images in [-1, 1], where available offline.

    Returns:
        (results, note): results has ``inception_is``, ``inception_is_std`` and, with ``real``,
        ``inception_fid``; if the weights are not on disk, results is empty and note says why.
    """
    note = inception_available()
    if note is not None:
        return {}, note
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    out = {}
    metric = InceptionScore(splits=splits, sync_on_compute=False)
    for i in range(0, len(fake), 100):
        metric.update(_to_rgb_uint8(fake[i:i + 100]))
    mean, std = metric.compute()
    out.update(inception_is=float(mean), inception_is_std=float(std))
    if real is not None:
        fid = FrechetInceptionDistance(feature=2048, sync_on_compute=False)
        for i in range(0, len(real), 100):
            fid.update(_to_rgb_uint8(real[i:i + 100]), real=True)
        for i in range(0, len(fake), 100):
            fid.update(_to_rgb_uint8(fake[i:i + 100]), real=False)
        out["inception_fid"] = float(fid.compute())
    return out, None
