"""Networks whose outputs are exact, for testing and benchmarking samplers (docs/exact-scores.md).

When the data is a Gaussian mixture, or a finite set of images, the noised data's score has a
closed form. These modules compute it (in float64) behind the same call signature as
diffusers' ``UNet2DModel`` — ``net(sample, timestep, class_labels=None).sample`` — so they
can stand in for a trained checkpoint of either family:

- ``family="vp"``: fed the timestep label t, returns E[ε | x_t] for the DDPM schedule;
- ``family="ve"``: fed σ, returns the score ∇log p_σ(x̃) (like a Fourier-embedding UNet).

A sampler that follows the score exactly must then reproduce the data distribution; the
errors that remain are the sampler's own discretisation errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.utils import BaseOutput

from schedulers.parametrization import ModelFamily, epsilon_to_score, vp_scales, x0_to_epsilon
from schedulers.schedules import DiscreteVPSchedule


@dataclass
class _Output(BaseOutput):
    sample: torch.Tensor


class _AnalyticNet(torch.nn.Module):
    def __init__(self, family: str, schedule: DiscreteVPSchedule | None):
        super().__init__()
        if family not in ("vp", "ve"):
            raise ValueError("family must be 'vp' or 've'")
        self.family = family
        self.schedule = schedule or DiscreteVPSchedule()
        self.register_buffer("_dtype_probe", torch.zeros((), dtype=torch.float64))
        self.calls = 0

    def _scales(self, timestep, batch):
        """(a, s) per sample: VP a = √ᾱ_t, s = √(1-ᾱ_t) at the label; VE a = 1, s = σ."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        t = t.expand(batch) if t.numel() == 1 else t
        if self.family == "vp":
            return vp_scales(self.schedule.alpha_bar_at(t))
        return torch.ones_like(t), t

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        self.calls += 1
        x = sample.detach().to(torch.float64).cpu().flatten(1)  # [B, d]
        a, s = self._scales(timestep, x.shape[0])
        epsilon = self.epsilon(x, a[:, None], s[:, None])  # E[ε | x]
        out = epsilon if self.family == "vp" else epsilon_to_score(epsilon, s[:, None])  # VE nets output the score
        out = out.reshape(sample.shape).to(sample.device, sample.dtype)
        return _Output(sample=out) if return_dict else (out,)

    def epsilon(self, x, a, s):  # pragma: no cover - abstract
        raise NotImplementedError

    def model_family(self) -> ModelFamily:
        """How a pipeline should treat this network."""
        if self.family == "vp":
            return ModelFamily(kind="vp", prediction_type="epsilon")
        return ModelFamily(kind="ve", prediction_type="score", data_range=(-1.0, 1.0),
                           sigma_min=self.schedule.sigma_min, sigma_max=self.schedule.sigma_max)


class GaussianMixtureNet(_AnalyticNet):
    """Exact denoiser of x₀ ~ Σ_k w_k N(μ_k, s_k² I) (docs/exact-scores.md).

    With x = a x₀ + s ε, v_k = a² s_k² + s² and responsibilities
    r_k(x) = softmax_k[log w_k − (d/2) log v_k − ‖x − a μ_k‖²/(2 v_k)], the exact prediction is
    E[ε | x] = s Σ_k r_k (x − a μ_k)/v_k.

    Args:
        weights: w_k (normalised here).
        means: μ_k, shape ``[K, d]``; samples have d = numel of one image.
        stds: s_k, the per-component standard deviation.
        family: ``"vp"`` (ε at a DDPM timestep label) or ``"ve"`` (score at σ).
        schedule: the DDPM schedule (VP labels, and the σ range reported for VE).
    """

    def __init__(self, weights: Sequence[float], means, stds: Sequence[float], family: str = "vp",
                 schedule: DiscreteVPSchedule | None = None):
        super().__init__(family, schedule)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if not (len(self.weights) == len(self.means) == len(self.stds)):
            raise ValueError("weights, means and stds need one entry per component")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def responsibilities(self, x, a, s):
        """r_k(x), shape ``[B, K]`` (docs/exact-scores.md)."""
        d = x.shape[1]
        v = a**2 * self.stds[None] ** 2 + s**2  # [B, K]
        sq = ((x[:, None, :] - a[:, :, None] * self.means[None]) ** 2).sum(-1)  # ‖x − a μ_k‖²
        logits = self.weights.log()[None] - 0.5 * d * v.log() - sq / (2 * v)
        return logits.softmax(dim=1), v

    def epsilon(self, x, a, s):
        r, v = self.responsibilities(x, a, s)
        resid = x[:, None, :] - a[:, :, None] * self.means[None]  # [B, K, d]
        return s * (r[:, :, None] * resid / v[:, :, None]).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws, shape ``[n, d]``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each clean sample, shape ``[n]``."""
        x = x.detach().to(torch.float64).cpu().flatten(1)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
        r, _ = self.responsibilities(x, ones, ones * 1e-6)
        return r.argmax(1)

    def statistics(self, x: torch.Tensor) -> dict:
        """Mode weights, per-mode means and per-mode std (averaged over dimensions) of samples."""
        x = x.detach().to(torch.float64).cpu().flatten(1)
        k = self.assign(x)
        weights, means, stds = [], [], []
        for j in range(len(self.weights)):
            xs = x[k == j]
            weights.append(len(xs) / len(x))
            means.append(xs.mean(0) if len(xs) else torch.full((self.dim,), math.nan, dtype=torch.float64))
            stds.append(float(xs.var(0, unbiased=True).mean().sqrt()) if len(xs) > 1 else math.nan)
        return {"weights": torch.tensor(weights), "means": torch.stack(means), "stds": torch.tensor(stds)}


class FiniteSetNet(_AnalyticNet):
    """Exact denoiser of data that is a finite set of images {y_i} with equal weights (docs/exact-scores.md):
    x̂₀ = Σ_i softmax_i(−‖x − a y_i‖²/(2 s²)) y_i, and ε = (x − a x̂₀)/s.

    Deterministic samplers driven by it end on (or very near) one of the y_i.
    """

    def __init__(self, images: torch.Tensor, family: str = "vp", schedule: DiscreteVPSchedule | None = None):
        super().__init__(family, schedule)
        self.images = images.detach().to(torch.float64).cpu().flatten(1)  # [N, d]

    def denoise(self, x, a, s):
        sq = ((x[:, None, :] - a[:, :, None] * self.images[None]) ** 2).sum(-1)  # [B, N]
        r = (-sq / (2 * s**2)).softmax(dim=1)
        return r @ self.images

    def epsilon(self, x, a, s):
        return x0_to_epsilon(self.denoise(x, a, s), x, a, s)
