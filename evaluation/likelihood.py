"""Likelihood of held-out data in bits per dimension: the variational bound of a VP (DDPM)
checkpoint and the probability-flow ODE's exact likelihood for either family (docs/likelihood.md).

    python -m evaluation.likelihood --checkpoint checkpoints/mnist-ddpm-cond --num_images 100 --method both
    python -m evaluation.likelihood --checkpoint checkpoints/mnist-ncsn --num_images 100 --method ode --json nll.json

Both methods see the checkpoint's network only through
:class:`~schedulers.parametrization.EpsilonNetwork`, which presents any checkpoint (VP with ε, x̂₀
or v output; VE score network) as the ε-network of one discrete VP schedule.

- :func:`variational_bound`: L = L_0 + Σ_{t≥1} L_t + L_T of Ho et al. (2020, §3.3) with the
  discretised-Gaussian decoder and per-step KL terms of Nichol & Dhariwal (2021), for 8-bit images
  (no dequantisation: the decoder gives each pixel's bin its probability). VP checkpoints only.
- :func:`ode_likelihood`: the instantaneous change of variables along the probability-flow ODE of
  the checkpoint's VP-SDE (Song et al. 2021, App. D.2), with a Hutchinson trace estimator and
  scipy's RK45; images are uniformly dequantised.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from schedulers.parametrization import EpsilonNetwork, epsilon_to_x0, vp_scales
from schedulers.schedules import VPSDE

LN2 = math.log(2.0)
BINS = 256  # 8-bit pixels
DEQUANT_OFFSET_BITS = math.log2(BINS / 2.0)  # [-1, 1] holds 256 bins of width 2/256: +7 bits per dimension
PROBES = ("rademacher", "gaussian", "exact")

VE_BOUND_REASON = (
    "the discrete variational bound (Ho et al. 2020, §3.3) is the likelihood of the DDPM Markov chain "
    "q(x_t | x_{{t-1}}) that a VP checkpoint was trained on, step by step; this is a VE (NCSN) checkpoint, "
    "trained on a continuum of noise levels σ ∈ [{lo:g}, {hi:g}] with no such chain, so any chain would be "
    "a choice its training never made and its bound would depend on that choice (most of all through the "
    "decoder at σ_min). Its likelihood is the probability-flow ODE's: ")
VE_BOUND_OFFER = "use method 'ode' (python -m evaluation.likelihood --method ode, or --nll ode)"
VE_BOUND_MESSAGE = VE_BOUND_REASON + VE_BOUND_OFFER


def ve_bound_message(family, offer: str = VE_BOUND_OFFER) -> str:
    """Why a VE checkpoint has no discrete variational bound, ending with ``offer`` (how to get the ODE likelihood)."""
    return VE_BOUND_REASON.format(lo=family.sigma_min, hi=family.sigma_max) + offer


def json_safe(value):
    """``value`` with every non-finite float (NaN, ±∞) replaced by None and numpy values made plain, so that
    ``json.dumps`` writes valid JSON (``null``) and never the non-standard ``NaN``/``Infinity``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value) -> str:
    """Strict JSON of ``value`` (non-finite numbers as null), indented, with a final newline."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


class LikelihoodError(ValueError):
    """A likelihood that cannot be computed for this model or input; the message says why and what to do."""


class ODEConvergenceError(LikelihoodError):
    """The adaptive ODE solver failed; the message gives its tolerances and the evaluations it spent."""


# ----------------------------------------------------------------------------------------------
# checks and small helpers
# ----------------------------------------------------------------------------------------------

def _check_model(pipe, class_labels, guidance_scale: float = 1.0) -> None:
    """Refuse what is not a likelihood: guided scores, p(x) of a purely conditional network."""
    family = pipe.family
    if guidance_scale != 1.0:
        raise LikelihoodError(f"guidance_scale={guidance_scale:g}: a guided ε̃ = ε(∅) + w(ε(c) − ε(∅)) is not the score "
                              "of any density, so it has no likelihood; use guidance_scale 1 (log p(x | y) with labels, "
                              "or log p(x) without)")
    if class_labels is None and family.is_conditional and family.null_class_label is None:
        raise LikelihoodError("this checkpoint is class-conditional without an unconditional branch (no null label: it "
                              "was trained without label dropout), so the unconditional log p(x) is not available; pass "
                              f"class labels (0..{family.num_classes - 1}) for the conditional log p(x | y)")
    if class_labels is not None and not family.is_conditional:
        raise LikelihoodError("class labels were given but this checkpoint is unconditional; leave them out")


def _labels_tensor(class_labels, n: int, device) -> Optional[torch.Tensor]:
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if labels.numel() != n:
        raise LikelihoodError(f"got {labels.numel()} class labels for {n} images")
    return labels.to(device)


def _stop_if_asked(should_stop: Optional[Callable[[], bool]], what: str) -> None:
    if should_stop is not None and should_stop():
        from pipelines.sampling import SamplingCancelled

        raise SamplingCancelled(f"{what} cancelled")


def _device(pipe) -> torch.device:
    for tensor in list(pipe.unet.parameters()) + list(pipe.unet.buffers()):
        return tensor.device
    return torch.device("cpu")


def _interval(per_item: np.ndarray) -> float:
    """Half-width of the 95 % normal interval of the mean of ``per_item`` (0 for a single item)."""
    per_item = np.asarray(per_item, dtype=np.float64)
    if len(per_item) < 2:
        return 0.0
    return float(1.96 * per_item.std(ddof=1) / math.sqrt(len(per_item)))


def eight_bit_levels(images: torch.Tensor) -> torch.Tensor:
    """The integer pixel levels k ∈ {0..255} of images on the project's grid x = k/127.5 − 1.

    Raises:
        LikelihoodError: for images that are not 8-bit (continuous data needs ``discrete=False``).
    """
    k = (images.double() + 1.0) * 127.5
    if k.min() < -1e-3 or k.max() > 255 + 1e-3 or (k - k.round()).abs().max() > 1e-3:
        raise LikelihoodError("the images are not 8-bit images in [-1, 1] (x = k/127.5 − 1, k = 0..255); for continuous "
                              "data pass discrete=False (bound) or dequantize=False (ODE)")
    return k.round().clamp(0, 255)


def dequantize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform dequantisation: y = 2(k + u)/256 − 1, u ~ U[0, 1)^d, in the cube of pixel level k."""
    k = eight_bit_levels(images)
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64)
    return 2.0 * (k + u) / BINS - 1.0


def _log_normal_cdf_difference(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi, stable in both tails (lo = −∞ or hi = +∞ allowed)."""
    from torch.special import log_ndtr

    upper = lo > 0  # both in the upper tail: Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi)
    a = torch.where(upper, log_ndtr(-lo), log_ndtr(hi))
    b = torch.where(upper, log_ndtr(-hi), log_ndtr(lo))
    return a + torch.log1p(-torch.exp((b - a).clamp(max=0.0)).clamp(max=1.0 - 1e-300))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, std²) for 8-bit data x in [-1, 1] (Ho et al. 2020, Eq. 13).

    Each pixel's bin is [x − 1/255, x + 1/255]; the edge bins extend to ∓∞. Elementwise, in nats.
    """
    half = 1.0 / 255.0
    lo = torch.where(x <= -1.0 + 1e-6, torch.full_like(x, -math.inf), (x - half - mean) / std)
    hi = torch.where(x >= 1.0 - 1e-6, torch.full_like(x, math.inf), (x + half - mean) / std)
    return _log_normal_cdf_difference(lo, hi)


def normal_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) ‖ N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1.0)


# ----------------------------------------------------------------------------------------------
# the variational bound
# ----------------------------------------------------------------------------------------------

@dataclass
class BoundResult:
    """The discrete-time variational bound of a VP checkpoint, in bits per dimension.

    Attributes:
        bits_per_dim: the mean bound over the images.
        ci95: half-width of its 95 % interval over images (noise draws included).
        per_image: ``[N]`` the bound of each image.
        decoder: ``[N]`` L_0, the decoder's −log p(x₀ | x at label 0).
        kl: ``[N, K]`` the per-step KL terms L_t, **unweighted** (one step each).
        kl_labels: ``[K]`` their timestep labels; with a ``rescale`` stride, the centres of the blocks of steps
            (each image's term is at a step drawn inside its block).
        kl_weights: ``[K]`` how many steps each evaluated term stands for in the sum (1 without stride).
        prior: ``[N]`` L_T = KL(q(x_{T−1} | x₀) ‖ N(0, I)).
        settings: stride, stride mode, variances, decoder, data handling, T, network evaluations.
    """

    bits_per_dim: float
    ci95: float
    per_image: np.ndarray
    decoder: np.ndarray
    kl: np.ndarray
    kl_labels: np.ndarray
    kl_weights: np.ndarray
    prior: np.ndarray
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def terms(self) -> np.ndarray:
        """Mean over images of every evaluated term, bits/dim: [L_0, L_{t_1}, …, L_{t_K}, L_T]."""
        return np.concatenate([[self.decoder.mean()], self.kl.mean(0), [self.prior.mean()]])

    @property
    def term_labels(self) -> np.ndarray:
        """Labels of :attr:`terms`: 0 (decoder), the KL labels, then T (the prior)."""
        return np.concatenate([[0], self.kl_labels, [self.settings["num_train_timesteps"]]])

    @property
    def kl_total(self) -> np.ndarray:
        """``[N]`` Σ_t w_t L_t: the middle of the bound."""
        return (self.kl * self.kl_weights[None]).sum(1)

    def to_dict(self, per_image: bool = True) -> dict:
        out = {"method": "bound", "bits_per_dim": self.bits_per_dim, "ci95": self.ci95,
               "decoder_bpd": float(self.decoder.mean()), "kl_bpd": float(self.kl_total.mean()),
               "prior_bpd": float(self.prior.mean()), "terms_bpd": self.terms.tolist(),
               "term_labels": self.term_labels.tolist(), "term_weights": [1.0, *self.kl_weights.tolist(), 1.0],
               "num_images": len(self.per_image), "seconds": self.seconds, **self.settings}
        if per_image:
            out["per_image_bpd"] = self.per_image.tolist()
        return out

    def summary(self) -> str:
        s = self.settings
        stride = "" if s["stride"] == 1 else (f", stride {s['stride']} ({s['stride_mode']}: {s['stride_note']})")
        return (f"variational bound  {self.bits_per_dim:.4f} ± {self.ci95:.4f} bits/dim (95 % over {len(self.per_image)} "
                f"images; L_0 {self.decoder.mean():.4f}, Σ L_t {self.kl_total.mean():.4f}, L_T {self.prior.mean():.2e}; "
                f"{s['network_evaluations_per_image']} evaluations per image{stride}; {s['data']})")


def _bound_schedule(num_train_timesteps: int, stride: int, stride_mode: str):
    """The KL terms to evaluate for a stride: (first labels of the blocks, block sizes, weights, fixed previous
    labels or None, note). A block of size b > 1 is evaluated at one label drawn uniformly inside it per image."""
    T = num_train_timesteps
    if stride == 1:
        starts = np.arange(1, T)
        return starts, np.ones(T - 1, dtype=int), np.ones(T - 1), None, "every step"
    if stride_mode == "rescale":
        # blocks of consecutive labels 1..T-1 of sizes 1, 1, 2, 2, 4, 4, … growing to `stride`, then `stride` each. The
        # first terms fall like 1/t and carry most of the bound, so blocks there stay narrow relative to their label.
        sizes, total, i = [], 0, 0
        while total < T - 1:
            size = min(stride, 2 ** (i // 2), T - 1 - total)
            sizes.append(size)
            total += size
            i += 1
        sizes = np.asarray(sizes, dtype=int)
        starts = 1 + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        return starts, sizes, sizes.astype(float), None, (
            f"{len(sizes)} terms: the steps 1…T−1 in blocks of 1, 1, 2, 2, 4, … growing to {stride} steps; each block is "
            "evaluated at one step drawn uniformly inside it (per image, seeded) and multiplied by its size: an unbiased "
            "estimate of the full T-step bound")
    if stride_mode == "respace":
        # the shorter chain on evenly spaced labels 0 = τ_0 < … < τ_K = T-1 (improved-diffusion's respacing)
        count = math.ceil((T - 1) / stride) + 1
        chain = np.unique(np.round(np.linspace(0, T - 1, count)).astype(int))
        return chain[1:], np.ones(len(chain) - 1, dtype=int), np.ones(len(chain) - 1), chain[:-1], (
            f"a valid bound of the {len(chain)}-step chain on labels 0, {chain[1]}, …, {T - 1} (β′ = 1 − ᾱ_τ/ᾱ_τ′), "
            "looser than the T-step bound")
    raise ValueError(f"stride_mode must be 'rescale' or 'respace', got {stride_mode!r}")


@torch.no_grad()
def variational_bound(pipe, images: torch.Tensor, *, stride: int = 1, stride_mode: str = "rescale",
                      variance: str = "fixed_small", decoder_variance: Optional[str] = None, discrete: bool = True,
                      clip_denoised: Optional[bool] = None, class_labels=None, guidance_scale: float = 1.0,
                      batch_size: int = 256, seed: int = 0, progress: bool = False,
                      should_stop: Optional[Callable[[], bool]] = None) -> BoundResult:
    """The variational bound −log p(x₀) ≤ L_0 + Σ_{t=1}^{T−1} L_t + L_T of a VP checkpoint, per image.

    Labels t = 0 … T−1 are the project's (label 0 is already noisy; see docs/schedules.md):

    - L_0 = −log p_θ(x₀ | x_0): the decoder N(x̂₀, ·) at label 0 (variance: ``decoder_variance``),
      discretised to 8-bit bins (``discrete``) or a density;
    - L_t = KL(q(x_{t−1} | x_t, x₀) ‖ p_θ(x_{t−1} | x_t)), t ≥ 1, with p_θ's mean the posterior mean at
      x̂₀ and its variance β̃_t (``"fixed_small"``) or β_t (``"fixed_large"``), one noise draw per term;
    - L_T = KL(q(x_{T−1} | x₀) ‖ N(0, I)).

    Args:
        pipe: a :class:`~pipelines.SamplerPipeline` (or anything with ``unet``, ``family``, ``schedule``).
        images: ``[N, ...]`` 8-bit images in [-1, 1] (``discrete``) or continuous data.
        stride: evaluate every ``stride``-th term only (``stride_mode`` says how the rest is accounted for).
        stride_mode: ``"rescale"`` (blocks of steps growing 1, 1, 2, 2, 4, … to ``stride``, each evaluated at
            a step drawn inside it and weighted by its size: an unbiased estimate of the full bound) or
            ``"respace"`` (the bound of the shorter chain on evenly spaced labels, as improved-diffusion
            evaluates respaced models: a valid, looser bound).
        variance: the reverse steps' fixed variance, ``"fixed_small"`` (β̃_t) or ``"fixed_large"`` (β_t).
        decoder_variance: the decoder's variance, ``"posterior"`` (β̃ of the first step, improved-diffusion's
            choice for both fixed variances) or ``"beta"`` (β_0, Ho et al.'s); default ``"posterior"`` with
            ``fixed_small`` and ``"beta"`` with ``fixed_large``. For continuous data only ``fixed_large`` with
            ``"beta"`` makes the bound tight as T grows (docs/likelihood.md).
        discrete: 8-bit data and a discretised decoder (bits/dim of the pixel values) or continuous data
            with a Gaussian decoder (bits/dim of a density).
        clip_denoised: clip x̂₀ to [-1, 1] in the means (default: ``discrete``, as improved-diffusion does).
        class_labels: for a class-conditional checkpoint, the labels (log p(x | y)); default the null label.
        guidance_scale: must be 1 (a guided network has no likelihood; anything else raises with that message).
        batch_size: rows per network call.
        seed: seeds the forward-process noise.
        should_stop: polled before every batch of network calls; True raises
            :class:`~pipelines.SamplingCancelled` (the app's Cancel button).

    Raises:
        LikelihoodError: a VE checkpoint (the message explains why and points to the ODE likelihood),
            a conditional checkpoint without an unconditional branch, or non-8-bit images with ``discrete``.
    """
    family = pipe.family
    if family.kind == "ve":
        raise LikelihoodError(ve_bound_message(family))
    _check_model(pipe, class_labels, guidance_scale)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive whole number, got {stride!r}")
    decoder_variance = decoder_variance or ("posterior" if variance == "fixed_small" else "beta")
    if decoder_variance not in ("posterior", "beta"):
        raise ValueError(f"decoder_variance must be 'posterior' or 'beta', got {decoder_variance!r}")
    clip = discrete if clip_denoised is None else clip_denoised
    start = time.perf_counter()
    device = _device(pipe)
    x0 = images.detach().to(torch.float64).cpu()
    if discrete:
        x0 = eight_bit_levels(x0) / 127.5 - 1.0
    n, dim = x0.shape[0], x0[0].numel()
    labels_all = _labels_tensor(class_labels, n, device)
    schedule = pipe.schedule
    T = schedule.num_train_timesteps
    ab = schedule.alphas_cumprod  # ᾱ_t, float64
    net = EpsilonNetwork(pipe.unet, family, schedule)
    starts, sizes, weights, fixed_prev, stride_note = _bound_schedule(T, int(stride), stride_mode)
    generator = torch.Generator().manual_seed(seed)
    shp = (-1,) + (1,) * (x0.ndim - 1)

    def denoise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t ~ q(x_t | x₀) and x̂₀(x_t) for labels ``t`` of shape ``[G, N]`` (one per image): ``[G, N, ...]``."""
        g = t.shape[0]
        a, s = vp_scales(ab[t.reshape(-1)])
        noise = torch.randn((g, *x0.shape), generator=generator, dtype=torch.float64)
        x_t = (a.reshape(shp) * x0.repeat(g, *([1] * (x0.ndim - 1))) + s.reshape(shp) * noise.reshape(-1, *x0.shape[1:]))
        flat_t = t.reshape(-1).double()
        cls = None if labels_all is None else labels_all.repeat(g)
        x0_hat = torch.empty_like(x_t)
        for i in range(0, len(x_t), batch_size):
            sl = slice(i, i + batch_size)
            eps = net(x_t[sl].to(device), flat_t[sl], class_labels=None if cls is None else cls[sl]).double().cpu()
            x0_hat[sl] = epsilon_to_x0(eps, x_t[sl], a[sl].reshape(shp), s[sl].reshape(shp))
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        return x_t.reshape(g, *x0.shape), x0_hat.reshape(g, *x0.shape)

    reduce = lambda v: v.flatten(start_dim=v.ndim - x0.ndim + 1).sum(-1) / (dim * LN2)  # noqa: E731  nats -> bits/dim

    # L_0: the decoder at label 0: variance β̃ of the first chain step (improved-diffusion) or β_0 (Ho et al.)
    first = 1 if fixed_prev is None else int(starts[0])
    ab0, ab1 = ab[0], ab[first]
    beta1 = 1.0 - ab1 / ab0
    dec_var = beta1 * (1.0 - ab0) / (1.0 - ab1) if decoder_variance == "posterior" else 1.0 - ab0
    _, x0_hat = denoise(torch.zeros(1, n, dtype=torch.long))
    if discrete:
        decoder = -reduce(discretized_gaussian_log_likelihood(x0, x0_hat[0], dec_var.sqrt()))
    else:
        decoder = reduce(0.5 * (torch.log(2 * math.pi * dec_var) + (x0 - x0_hat[0]) ** 2 / dec_var))

    # L_t: KL(q(x_{t'} | x_t, x₀) ‖ p_θ(x_{t'} | x_t)) where t' is the label the step goes to (t − 1 unless respaced)
    k_terms = len(starts)
    offsets = (torch.rand(k_terms, n, generator=generator, dtype=torch.float64)
               * torch.as_tensor(sizes)[:, None]).floor().long()  # uniform in each block (0 for blocks of one step)
    labels_t = torch.as_tensor(starts)[:, None] + offsets  # [K, N]
    labels_p = labels_t - 1 if fixed_prev is None else torch.as_tensor(fixed_prev)[:, None].expand(k_terms, n)
    group = max(1, batch_size // max(n, 1))
    kl = torch.empty(n, k_terms, dtype=torch.float64)
    from tqdm.auto import tqdm

    expand = lambda v: v.reshape(*v.shape, *([1] * (x0.ndim - 1)))  # noqa: E731  [G, N] -> [G, N, 1, …]
    for j in tqdm(range(0, k_terms, group), desc="bound", disable=not progress, leave=False):
        _stop_if_asked(should_stop, "variational bound")
        t, p = labels_t[j:j + group], labels_p[j:j + group]
        x_t, x0_hat = denoise(t)
        ab_t, ab_p = expand(ab[t]), expand(ab[p])
        alpha = ab_t / ab_p
        beta = 1.0 - alpha
        post_var = beta * (1.0 - ab_p) / (1.0 - ab_t)  # β̃ of this step
        c1 = ab_p.sqrt() * beta / (1.0 - ab_t)
        c2 = alpha.sqrt() * (1.0 - ab_p) / (1.0 - ab_t)
        mean_q = c1 * x0[None] + c2 * x_t
        mean_p = c1 * x0_hat + c2 * x_t
        model_var = post_var if variance == "fixed_small" else beta
        kl[:, j:j + len(t)] = reduce(normal_kl(mean_q, post_var, mean_p, model_var)).T

    # L_T: the prior term
    ab_last = ab[-1]
    prior = reduce(normal_kl(ab_last.sqrt() * x0, 1.0 - ab_last, torch.zeros(()), torch.ones((), dtype=torch.float64)))

    w = torch.as_tensor(weights)
    per_image = decoder + (kl * w[None]).sum(1) + prior
    per_image_np = per_image.numpy()
    settings = {
        "num_train_timesteps": T, "stride": int(stride), "stride_mode": stride_mode if stride > 1 else "none",
        "stride_note": stride_note, "variance": variance,
        "decoder_variance": {"posterior": "β̃ of the first step (improved-diffusion)",
                             "beta": "β_0 = 1 − ᾱ_0 (Ho et al.'s σ_1² = β_1)"}[decoder_variance],
        "clip_denoised": clip, "class_labels": None if labels_all is None else "given",
        "data": ("8-bit pixels, discretised-Gaussian decoder (no dequantisation)" if discrete
                 else "continuous data, Gaussian decoder (bits/dim of a density)"),
        "network_evaluations_per_image": k_terms + 1, "seed": seed,
    }
    centres = np.asarray(starts) + (np.asarray(sizes) - 1) / 2.0
    return BoundResult(float(per_image_np.mean()), _interval(per_image_np), per_image_np, decoder.numpy(), kl.numpy(),
                       centres, np.asarray(weights, dtype=np.float64), prior.numpy(), settings, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# the probability-flow ODE
# ----------------------------------------------------------------------------------------------

@dataclass
class ODEResult:
    """The probability-flow ODE likelihood, in bits per dimension.

    Attributes:
        bits_per_dim: mean over images and probes.
        ci95: half-width of the 95 % interval of that mean over images (probe noise included).
        ci95_probes: the part of it due to the Hutchinson probes alone: the interval to use when
            comparing with another figure on the **same** images (None with one probe per image).
        per_image: ``[N]`` each image's bits/dim (mean over its probes).
        per_probe: ``[N, K]`` each image's bits/dim under each probe.
        prior_bound_bpd: mean L_T = KL(q(x(1) | x₀) ‖ prior): bounds the error of using the prior in place of
            the marginal at t = 1 (KL(p_1 ‖ prior) ≤ E L_T); None for a user-given prior.
        nfe: network evaluations of each ODE solve (each evaluation includes one vector–Jacobian product per row).
        settings: solver, tolerances, probes, dequantisation, t range, prior.
    """

    bits_per_dim: float
    ci95: float
    ci95_probes: Optional[float]
    per_image: np.ndarray
    per_probe: np.ndarray
    prior_bound_bpd: Optional[float]
    nfe: list
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, per_image: bool = True) -> dict:
        out = {"method": "ode", "bits_per_dim": self.bits_per_dim, "ci95": self.ci95, "ci95_probes": self.ci95_probes,
               "prior_bound_bpd": self.prior_bound_bpd, "nfe": self.nfe, "mean_nfe": float(np.mean(self.nfe)),
               "num_images": len(self.per_image), "seconds": self.seconds,
               "seconds_per_image": self.seconds / max(len(self.per_image), 1), **self.settings}
        if per_image:
            out["per_image_bpd"] = self.per_image.tolist()
        return out

    def summary(self) -> str:
        s = self.settings
        probes = "" if self.ci95_probes is None else f"; probes alone ± {self.ci95_probes:.4f}"
        return (f"probability-flow ODE {self.bits_per_dim:.4f} ± {self.ci95:.4f} bits/dim (95 % over {len(self.per_image)} "
                f"images × {s['num_probes']} {s['probe']} probe(s){probes}; "
                f"NFE {np.mean(self.nfe):.0f} per solve at rtol {s['rtol']:g}, atol {s['atol']:g}; "
                f"{self.seconds / max(len(self.per_image), 1):.2f} s per image; {s['data']})")


class _TooManyEvaluations(RuntimeError):
    pass


def _sigma_of(sde: VPSDE, t: float) -> float:
    """σ(t) = s(t)/m(t), the VE noise level of the SDE's marginal at time t."""
    return float(sde.std(t) / sde.mean_coeff(t))


def _time_of_sigma(sde: VPSDE, sigma: float) -> float:
    """The SDE time whose marginal has VE noise level σ (σ(t) increases with t)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _sigma_of(sde, mid) < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ode_time_range(pipe, t_eps: Optional[float] = None) -> tuple[VPSDE, float, float]:
    """The checkpoint's VP-SDE and the times it is integrated between.

    The network is called at the label whose σ equals the SDE's σ(t) = √(1−m²)/m (so it sees exactly the
    noise of the SDE's marginal), which must lie in the schedule's [σ_0, σ_{T−1}]: t_eps defaults to the
    time of σ_0, and the end is t = 1 or the time of σ_{T−1} if the SDE goes beyond it.
    """
    sde = VPSDE.from_config(pipe.sampler_config)
    schedule = pipe.schedule
    t_lo = _time_of_sigma(sde, schedule.sigma_min) if _sigma_of(sde, 1e-12) < schedule.sigma_min else 0.0
    if t_eps is None:
        t_eps = t_lo
    elif _sigma_of(sde, t_eps) < schedule.sigma_min * (1 - 1e-6):
        raise LikelihoodError(f"t_eps={t_eps:g} has σ = {_sigma_of(sde, t_eps):.3g}, below the smallest noise level the "
                              f"network was trained on (σ_0 = {schedule.sigma_min:.3g}, t = {t_lo:.3g}); use t_eps ≥ {t_lo:.3g}")
    t_end = 1.0 if _sigma_of(sde, 1.0) <= schedule.sigma_max else _time_of_sigma(sde, schedule.sigma_max)
    return sde, float(t_eps), float(t_end)


def standard_normal_logp(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) per row of ``[M, ...]``."""
    x = x.flatten(1)
    return -0.5 * (x**2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def epsilon_and_trace(net: EpsilonNetwork, x_t: torch.Tensor, label: torch.Tensor, probes: Optional[torch.Tensor],
                      class_labels=None, device="cpu") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(ε̂, vᵀ(∂ε̂/∂x)v per row, whether finite differences were used) at the VP state ``x_t``.

    ``probes`` v has the shape of ``x_t``; None gives the exact trace (one product per dimension).
    The product is a vector–Jacobian product through the network (one backward pass); a network that
    detaches its input (pipelines/analytic.py's) gets central differences instead, with step 1e-4
    in float64 and 1e-2 in lower precision.
    """
    call = getattr(type(net).__call__, "__wrapped__", type(net).__call__)  # EpsilonNetwork.__call__ without its no_grad
    rows, dim = x_t.shape[0], x_t[0].numel()
    with torch.enable_grad():
        xg = x_t.detach().to(device).requires_grad_(True)
        eps = call(net, xg, label, class_labels=class_labels)
        if eps.requires_grad:  # through the network's graph, if x is in it
            if probes is not None:
                (g,) = torch.autograd.grad((eps * probes.to(device, eps.dtype)).sum(), xg, allow_unused=True)
                if g is not None:
                    return eps.detach().double().cpu(), (g.double().cpu() * probes).flatten(1).sum(1), False
            else:
                flat = eps.flatten(1)
                tr = torch.zeros(rows, dtype=torch.float64)
                for i in range(dim):
                    (g,) = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=i < dim - 1, allow_unused=True)
                    if g is None:
                        break
                    tr += g.flatten(1)[:, i].double().cpu()
                else:
                    return eps.detach().double().cpu(), tr, False
    eps = call(net, x_t.to(device), label, class_labels=class_labels).double().cpu()
    unet = net.unet
    net_dtype = next(iter([*unet.parameters(), *unet.buffers()]), torch.zeros((), dtype=torch.float64)).dtype
    h = 1e-4 if net_dtype == torch.float64 else 1e-2
    directions = [probes] if probes is not None else [
        torch.nn.functional.one_hot(torch.full((rows,), i), dim).double().reshape(x_t.shape) for i in range(dim)]
    tr = torch.zeros(rows, dtype=torch.float64)
    for u in directions:
        plus = call(net, (x_t + h * u).to(device), label, class_labels=class_labels).double().cpu()
        minus = call(net, (x_t - h * u).to(device), label, class_labels=class_labels).double().cpu()
        tr += ((plus - minus) / (2 * h) * u).flatten(1).sum(1)
    return eps, tr, True


def _solve_flow(net, sde: VPSDE, schedule, x_rows: torch.Tensor, probes, class_labels, device, t_span, rtol: float,
                atol: float, max_nfe: int, method: str,
                should_stop: Optional[Callable[[], bool]] = None) -> tuple[np.ndarray, int, bool]:
    """One solve of [x, Δ log p] from t_span[0] to t_span[1]: (final state, NFE, finite differences used)."""
    from scipy.integrate import solve_ivp

    rows, shape, dim = x_rows.shape[0], tuple(x_rows.shape[1:]), x_rows[0].numel()
    counter = {"nfe": 0, "finite_differences": False}
    t0, t1 = t_span

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        counter["nfe"] += 1
        if counter["nfe"] > max_nfe:
            raise _TooManyEvaluations
        _stop_if_asked(should_stop, "ODE likelihood")
        x_t = torch.from_numpy(y[:rows * dim]).reshape(rows, *shape)
        m, s = float(sde.mean_coeff(t)), float(sde.std(t))
        beta = float(sde.beta(t))
        label = schedule.sigma_to_t(torch.tensor(s / m, dtype=torch.float64)).expand(rows)  # the network sees σ(t)
        eps, tr, fd = epsilon_and_trace(net, x_t, label, probes, class_labels, device)
        counter["finite_differences"] |= fd
        drift = -0.5 * beta * (x_t - eps / s)  # f − ½g²∇log p with ∇log p = −ε̂/s
        div = -0.5 * beta * dim + 0.5 * beta / s * tr
        return np.concatenate([drift.reshape(-1).numpy(), div.numpy()])

    y0 = np.concatenate([x_rows.reshape(-1).numpy(), np.zeros(rows)])
    try:
        sol = solve_ivp(rhs, (t0, t1), y0, method=method, rtol=rtol, atol=atol)
    except _TooManyEvaluations:
        raise ODEConvergenceError(
            f"the probability-flow ODE did not converge at rtol={rtol:g}, atol={atol:g}: {max_nfe} network "
            f"evaluations spent (max_nfe) before reaching t = {t1:g}; loosen rtol/atol or raise max_nfe") from None
    if not sol.success or not np.isfinite(sol.y[:, -1]).all():
        reached = float(sol.t[-1]) if len(sol.t) else t0
        raise ODEConvergenceError(
            f"the probability-flow ODE did not converge at rtol={rtol:g}, atol={atol:g}: "
            f"{sol.message if not sol.success else 'the state became non-finite'} after {counter['nfe']} network "
            f"evaluations (reached t = {reached:.4g} of {t1:g}); loosen rtol/atol or check the network")
    return sol.y[:, -1], counter["nfe"], counter["finite_differences"]


def ode_likelihood(pipe, images: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5, probe: str = "rademacher",
                   num_probes: int = 1, seed: int = 0, dequantize_data: bool = True, t_eps: Optional[float] = None,
                   class_labels=None, guidance_scale: float = 1.0, batch_size: int = 100, max_nfe: int = 20_000,
                   prior_logp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, method: str = "RK45",
                   progress: bool = False, should_stop: Optional[Callable[[], bool]] = None) -> ODEResult:
    """log p(x) along the probability-flow ODE of the checkpoint's VP-SDE (Song et al. 2021, App. D.2).

    dx/dt = −½β(t)(x − ε̂/s(t)),   d log p(x(t))/dt = −∇·(dx/dt),   so
    log p_{t_eps}(x) = log π(x(1)) + ∫_{t_eps}^{1} ∇·(dx/dt) dt,   ∇·(dx/dt) = −½β d + ½β/s · tr(∂ε̂/∂x),

    with tr(∂ε̂/∂x) ≈ vᵀ(∂ε̂/∂x)v (Hutchinson; one fixed probe v per row along the whole solve, a
    vector–Jacobian product per evaluation). Several probes are rows of the same solve. The data is
    taken as the state at t_eps, and π = N(0, I) (see ``prior_bound_bpd`` for its error).

    Args:
        pipe: a pipeline (``unet``, ``family``, ``schedule``, ``sampler_config``), VP or VE.
        images: ``[N, ...]`` 8-bit images in [-1, 1] (``dequantize_data``) or continuous data.
        rtol, atol: the solver's tolerances.
        probe: ``"rademacher"``, ``"gaussian"`` or ``"exact"`` (the full trace, d products: small data only).
        num_probes: probes per image.
        seed: seeds the probes and the dequantisation noise.
        dequantize_data: uniform dequantisation y = 2(k+u)/256 − 1 and bits/dim of the 8-bit data (+7 bits:
            log₂ of the bin volume (2/256) per dimension); otherwise bits/dim of a density.
        t_eps: start of integration (default: the time whose σ is the schedule's σ_0).
        class_labels: labels for log p(x | y) of a class-conditional checkpoint.
        guidance_scale: must be 1 (a guided network has no likelihood).
        batch_size: images per solve (each solve's step sizes are shared by its rows, as in score_sde).
        max_nfe: evaluations allowed per solve before it is called non-convergent.
        prior_logp: log π of the state at t = 1 (rows of ``[M, ...]``); default N(0, I).
        method: scipy ``solve_ivp`` method.
        should_stop: polled before every network evaluation; True raises :class:`~pipelines.SamplingCancelled`.

    Raises:
        ODEConvergenceError: the solver failed or ran past ``max_nfe`` (message: tolerances and NFE spent).
        LikelihoodError: a guided or purely conditional model, bad images.
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if probe == "exact":
        num_probes = 1
    _check_model(pipe, class_labels, guidance_scale)
    start = time.perf_counter()
    device = _device(pipe)
    sde, t0, t1 = ode_time_range(pipe, t_eps)
    schedule = pipe.schedule
    net = EpsilonNetwork(pipe.unet, pipe.family, schedule)
    generator = torch.Generator().manual_seed(seed)
    x = images.detach().to(torch.float64).cpu()
    x = dequantize(x, generator) if dequantize_data else x
    n, shape, dim = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    if probe == "exact" and dim > 256:
        raise ValueError(f"probe='exact' takes {dim} products per evaluation; use 'rademacher' or 'gaussian'")
    labels_all = _labels_tensor(class_labels, n, device)
    per_probe = np.empty((n, num_probes))
    nfes: list[int] = []
    used_fd = False
    from tqdm.auto import tqdm

    for b0 in tqdm(range(0, n, batch_size), desc="ODE likelihood", disable=not progress, leave=False):
        xb = x[b0:b0 + batch_size]
        nb = xb.shape[0]
        rows = nb * num_probes
        x_rows = xb.repeat_interleave(num_probes, dim=0)  # image i's probes are rows i*K … i*K+K-1
        cls = None if labels_all is None else labels_all[b0:b0 + nb].repeat_interleave(num_probes)
        if probe == "rademacher":
            v = torch.randint(0, 2, x_rows.shape, generator=generator).double() * 2 - 1
        elif probe == "gaussian":
            v = torch.randn(x_rows.shape, generator=generator, dtype=torch.float64)
        else:
            v = None
        y1, nfe, fd = _solve_flow(net, sde, schedule, x_rows, v, cls, device, (t0, t1), rtol, atol, max_nfe, method,
                                  should_stop)
        nfes.append(nfe)
        used_fd |= fd
        x1 = torch.from_numpy(y1[:rows * dim].copy()).reshape(rows, *shape)
        delta = torch.from_numpy(y1[rows * dim:].copy())
        logp = (prior_logp or standard_normal_logp)(x1).double().cpu() + delta
        bpd = -logp / (dim * LN2) + (DEQUANT_OFFSET_BITS if dequantize_data else 0.0)
        per_probe[b0:b0 + nb] = bpd.reshape(nb, num_probes).numpy()

    per_image = per_probe.mean(1)
    if n > 1:
        ci = _interval(per_image)
    else:
        ci = _interval(per_probe[0])
    ci_probes = None  # one probe per image: its noise cannot be told from the images'
    if probe == "exact":
        ci_probes = 0.0
    elif num_probes > 1:
        ci_probes = float(1.96 * math.sqrt(per_probe.var(1, ddof=1).mean() / num_probes / n))
    prior_bound = None
    if prior_logp is None:  # E KL(N(m x₀, s²I) ‖ N(0, I)) at t1 ≥ KL(p_1 ‖ N(0, I))
        m1 = sde.mean_coeff(t1)
        s1sq = 1.0 - m1**2
        kl = normal_kl(m1 * x, s1sq, torch.zeros(()), torch.ones((), dtype=torch.float64)).flatten(1).sum(1)
        prior_bound = float(kl.mean() / (dim * LN2))
    settings = {
        "solver": f"scipy solve_ivp {method}", "rtol": rtol, "atol": atol, "probe": probe, "num_probes": num_probes,
        "seed": seed, "t_eps": t0, "t_end": t1, "sigma_range": [_sigma_of(sde, t0), _sigma_of(sde, t1)],
        "sde": "VP-SDE, linear β(t)" if sde.is_linear else "VP-SDE following the discrete ᾱ",
        "prior": "N(0, I)" if prior_logp is None else "given",
        "data": ("8-bit pixels, uniformly dequantised (y = 2(k+u)/256 − 1; +7 bits/dim for the bin volume)"
                 if dequantize_data else "continuous data (bits/dim of a density)"),
        "trace": "vector–Jacobian product" if not used_fd else "central differences (the network detaches its input)",
        "class_labels": None if labels_all is None else "given", "batch_size": batch_size,
    }
    return ODEResult(float(per_image.mean()), ci, ci_probes, per_image, per_probe, prior_bound, nfes, settings,
                     time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# both, for a checkpoint and held-out digits
# ----------------------------------------------------------------------------------------------

METHODS = ("bound", "ode", "both")


def held_out_images(pipe, num_images: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_images`` held-out MNIST digits at the checkpoint's resolution, and their labels."""
    from data.sources import mnist_digits

    c, h, w = pipe.sample_shape
    if c != 1 or h != w:
        raise LikelihoodError(f"the built-in held-out digits are 1×R×R images; this checkpoint makes {c}×{h}×{w} images")
    images, labels = mnist_digits(split, num_images, resolution=h)
    return ((images + 1) * 127.5).round() / 127.5 - 1, labels  # resized digits back on the 8-bit grid (as saved)


def likelihoods(pipe, images: torch.Tensor, method: str = "both", labels=None, *, stride: int = 1,
                stride_mode: str = "rescale", rtol: float = 1e-5, atol: float = 1e-5, probe: str = "rademacher",
                num_probes: int = 1, seed: int = 0, batch_size: int = 100, progress: bool = False) -> dict:
    """{"bound": dict, "ode": dict, "notes": [...]} for ``method`` in bound/ode/both.

    With ``"both"`` on a VE checkpoint the bound is skipped with its explanation in ``notes``; with
    ``"bound"`` alone it raises :class:`LikelihoodError`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out: dict = {"notes": []}
    if method in ("bound", "both"):
        try:
            out["bound"] = variational_bound(pipe, images, stride=stride, stride_mode=stride_mode, class_labels=labels,
                                             batch_size=max(batch_size, 256), seed=seed, progress=progress).to_dict()
        except LikelihoodError as err:
            if method == "bound" or pipe.family.kind != "ve":
                raise
            out["notes"].append(f"bound skipped: {err}")
    if method in ("ode", "both"):
        out["ode"] = ode_likelihood(pipe, images, rtol=rtol, atol=atol, probe=probe, num_probes=num_probes, seed=seed,
                                    class_labels=labels, batch_size=batch_size, progress=progress).to_dict()
    return out


def main(argv=None) -> int:
    from pipelines import SamplerPipeline
    from pipelines.device import add_device_arguments, describe, device_from_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num_images", type=int, default=100, help="held-out digits (the first N of the 1,000)")
    p.add_argument("--method", choices=METHODS, default="both")
    p.add_argument("--stride", type=int, default=1, help="bound: evaluate every stride-th term")
    p.add_argument("--stride_mode", choices=("rescale", "respace"), default="rescale")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--probe", choices=PROBES[:2], default="rademacher")
    p.add_argument("--num_probes", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=100, help="images per ODE solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_conditional", action="store_true", help="log p(x | y) with the digits' own labels")
    p.add_argument("--json", default=None, help="write the results here")
    add_device_arguments(p)
    args = p.parse_args(argv)
    device, dtype = device_from_args(args)
    pipe = SamplerPipeline.from_pretrained(args.checkpoint, device=device, torch_dtype=dtype)
    print(f"device: {describe(device, dtype)}", flush=True)
    images, digit_labels = held_out_images(pipe, args.num_images)
    labels = digit_labels if args.class_conditional else None
    try:
        results = likelihoods(pipe, images, args.method, labels, stride=args.stride, stride_mode=args.stride_mode,
                              rtol=args.rtol, atol=args.atol, probe=args.probe, num_probes=args.num_probes, seed=args.seed,
                              batch_size=args.batch_size, progress=True)
    except LikelihoodError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint} · {args.num_images} held-out digits" + (" · log p(x | y)" if labels is not None else ""))
    for note in results["notes"]:
        print("  note: " + note)
    if "bound" in results:
        b = results["bound"]
        print(f"  bound {b['bits_per_dim']:.4f} ± {b['ci95']:.4f} bits/dim  (L_0 {b['decoder_bpd']:.4f}, Σ L_t "
              f"{b['kl_bpd']:.4f}, L_T {b['prior_bpd']:.2e}; {b['network_evaluations_per_image']} evaluations per image; "
              f"stride {b['stride']} {b['stride_mode']}; {b['seconds']:.0f} s)")
    if "ode" in results:
        o = results["ode"]
        print(f"  ODE   {o['bits_per_dim']:.4f} ± {o['ci95']:.4f} bits/dim  (NFE {o['mean_nfe']:.0f} per solve at rtol "
              f"{o['rtol']:g}, atol {o['atol']:g}; {o['seconds_per_image']:.2f} s per image; prior error ≤ "
              f"{o['prior_bound_bpd']:.1e} bits/dim)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json_text({"results": results, "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
