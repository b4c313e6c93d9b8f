"""The one place that converts between ε, score, x̂₀ and v, and decides what time a network sees.

Every state in this project is written x = a·x₀ + s·ε with a signal scale ``a_t`` (a) and
a noise scale ``s_t`` (s):

- VP / DDPM (docs/schedules.md#ddpm-the-discrete-vp-schedule): a = √ᾱ_t, s = √(1-ᾱ_t);
- VE / SMLD (docs/schedules.md#smld-the-ve-family): a = 1, s = σ.

With that one convention (after EDM's preconditioning) the conversions are:

    x̂₀ = (x - s ε)/a                      ε = (x - a x̂₀)/s
    v  = a ε - s x₀   ⇒   ε = a v + s x    score = ∇ log p(x) = -ε/s   (docs/parametrization.md#score-and-tweedie)

:class:`EpsilonNetwork` uses them to present *any* checkpoint network, VP (ε-, x̂₀- or
v-prediction, fed the timestep label) or VE (σ-conditioned score network, fed σ), as the
ε-prediction network of one discrete VP schedule. Every scheduler, diffusers' or ours, then
drives every checkpoint without asking how it was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # schedules.py imports the σ ↔ ᾱ conversions below
    from .schedules import DiscreteVPSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "score")


def to_epsilon(model_output: torch.Tensor, prediction_type: str, sample: torch.Tensor, a_t, s_t) -> torch.Tensor:
    """Convert a network output of the given parametrisation to ε for the state ``sample``.

    Args:
        model_output: what the network predicted.
        prediction_type: ``"epsilon"``, ``"sample"`` (x̂₀), ``"v_prediction"`` or ``"score"``.
        sample: the state x = a x₀ + s ε the prediction refers to.
        a_t: the signal scale a (a tensor broadcastable to ``sample`` or a float).
        s_t: the noise scale s.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return x0_to_epsilon(model_output, sample, a_t, s_t)
    if prediction_type == "v_prediction":
        return a_t * model_output + s_t * sample  # ε = a v + s x
    if prediction_type == "score":
        return -s_t * model_output  # ε = -s ∇ log p
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


def epsilon_to_x0(epsilon: torch.Tensor, sample: torch.Tensor, a_t, s_t) -> torch.Tensor:
    """Tweedie's denoised estimate x̂₀ = (x - s ε)/a (docs/parametrization.md#score-and-tweedie)."""
    return (sample - s_t * epsilon) / a_t


def clip_denoised(epsilon: torch.Tensor, sample: torch.Tensor, a_t, s_t, limit: float = 1.0):
    """Clip x̂₀ to [−limit, limit] and return the ε̂ consistent with it: (ε̂', x̂₀').

    For images in [−1, 1]: a deterministic step then moves towards a valid image even where the
    network's ε̂ is off (as diffusers' DDIM does with ``use_clipped_model_output``).
    """
    x0 = epsilon_to_x0(epsilon, sample, a_t, s_t).clamp(-limit, limit)
    return x0_to_epsilon(x0, sample, a_t, s_t), x0


def epsilon_to_score(epsilon: torch.Tensor, s_t) -> torch.Tensor:
    """∇ log p_t(x) = -ε/s (docs/parametrization.md#score-and-tweedie)."""
    return -epsilon / s_t


def score_to_epsilon(score: torch.Tensor, s_t) -> torch.Tensor:
    """ε = -s ∇ log p_t(x)."""
    return -s_t * score


def epsilon_to_v(epsilon: torch.Tensor, sample: torch.Tensor, a_t, s_t) -> torch.Tensor:
    """v = a ε - s x̂₀ (docs/schedules.md#ddpm-the-discrete-vp-schedule)."""
    return a_t * epsilon - s_t * epsilon_to_x0(epsilon, sample, a_t, s_t)


def vp_scales(alpha_bar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) = (√ᾱ, √(1-ᾱ)) of a VP state."""
    return alpha_bar_t.sqrt(), (1.0 - alpha_bar_t).sqrt()


def alpha_bar_to_sigma(alpha_bar):
    """σ = √((1−ᾱ)/ᾱ): the VE noise level of a VP state with cumulative product ᾱ."""
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def sigma_to_alpha_bar(sigma):
    """ᾱ = 1/(1+σ²): the inverse of :func:`alpha_bar_to_sigma`."""
    return 1.0 / (1.0 + sigma**2)


def sigma_to_vp_scales(sigma):
    """(a, s) = (1/√(1+σ²), σ/√(1+σ²)): the VP scales of the state x̃/√(1+σ²) of VE level σ.

    A VE state x̃ = x₀ + σ ε divided by √(1+σ²) is the VP state with ᾱ = 1/(1+σ²)
    (docs/parametrization.md, "VP and VE are one family"). Works on floats and tensors.
    """
    if torch.is_tensor(sigma):
        norm = (1.0 + sigma**2).sqrt()
    else:
        norm = math.sqrt(1.0 + float(sigma) ** 2)
    return 1.0 / norm, sigma / norm


def vp_to_ve(x_t: torch.Tensor, a_t) -> torch.Tensor:
    """x̃ = x_t/a: the VE state (x₀ + σ ε) of a VP state x_t = a x₀ + s ε, σ = s/a."""
    return x_t / a_t


def ve_to_vp(x_tilde: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = x̃/√(1+σ²): the VP state of a VE state at level σ (inverse of :func:`vp_to_ve`)."""
    a_t, _ = sigma_to_vp_scales(sigma)
    return x_tilde * a_t


def x0_to_epsilon(x0: torch.Tensor, sample: torch.Tensor, a_t, s_t) -> torch.Tensor:
    """ε = (x − a x̂₀)/s: the noise consistent with a denoised estimate."""
    return (sample - a_t * x0) / s_t


def forward_marginal(x0: torch.Tensor, epsilon: torch.Tensor, a_t, s_t) -> torch.Tensor:
    """The forward marginal x = a x₀ + s ε (VP: a = √ᾱ, s = √(1−ᾱ); VE: a = 1, s = σ)."""
    return a_t * x0 + s_t * epsilon


def score_to_x0(score: torch.Tensor, x_tilde: torch.Tensor, sigma) -> torch.Tensor:
    """Tweedie in VE form: x̂₀ = x̃ + σ² ∇log p_σ(x̃)."""
    return x_tilde + sigma**2 * score


def expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample (or scalar) values to broadcast over an image batch x."""
    values = torch.as_tensor(values, device=x.device, dtype=x.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class ModelFamily:
    """How a checkpoint's network was trained: everything :class:`EpsilonNetwork` needs to know.

    Attributes:
        kind: ``"vp"`` (DDPM-style network fed the timestep label) or ``"ve"`` (SMLD/NCSN network
            fed σ, e.g. a ``UNet2DModel`` with Fourier time embedding).
        prediction_type: what the network outputs; VP: ``"epsilon"``, ``"sample"`` or
            ``"v_prediction"``; VE: ``"score"`` (diffusers' Fourier UNet divides by σ) or ``"epsilon"``.
        data_range: the pixel range the network was trained on; samplers work in [-1, 1]
            (diffusers' NCSN++ checkpoints use [0, 1]).
        sigma_min, sigma_max: the VE noise range the network was trained on (VE only).
        input_scaling: VE only: ``"none"`` feeds x̃ as is (diffusers' NCSN++); ``"unit_variance"``
            feeds c_in·x̃ with c_in = 1/√(1+σ²) (EDM's preconditioning, σ in network units), so a
            small network never sees inputs of magnitude σ_max.
        num_class_embeds: size of the class-embedding table (the null label included), or None for
            unconditional nets.
        latent: the network denoises an autoencoder's latents, not pixels (pipelines/latent.py):
            x̂₀ is not an image there, so it is never clipped to [−1, 1].
        null_class_label: the label used for the unconditional branch of classifier-free
            guidance (docs/guidance.md), or None if the network was not trained with label dropout.
    """

    kind: str = "vp"
    prediction_type: str = "epsilon"
    data_range: tuple = (-1.0, 1.0)
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    input_scaling: str = "none"
    num_class_embeds: Optional[int] = None
    null_class_label: Optional[int] = None
    latent: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("vp", "ve"):
            raise ValueError(f"model family kind must be 'vp' or 've', got {self.kind!r}")
        allowed = ("epsilon", "sample", "v_prediction") if self.kind == "vp" else ("score", "epsilon")
        if self.prediction_type not in allowed:
            raise ValueError(f"a {self.kind.upper()} network's prediction_type must be one of {allowed}, "
                             f"got {self.prediction_type!r}")
        if self.input_scaling not in ("none", "unit_variance"):
            raise ValueError(f"input_scaling must be 'none' or 'unit_variance', got {self.input_scaling!r}")
        if self.kind == "ve" and not (self.sigma_min and self.sigma_max and 0 < self.sigma_min < self.sigma_max):
            raise ValueError("a VE network needs 0 < sigma_min < sigma_max")
        if self.kind == "ve" and self.latent:
            raise ValueError("latent networks are VP (DDPM-style) networks here; a VE latent network is not supported")

    @property
    def clip_denoised(self) -> bool:
        """Whether x̂₀ lies in the image range [−1, 1], so samplers may clip it: pixel networks yes, latent ones no."""
        return not self.latent

    @property
    def is_conditional(self) -> bool:
        return self.num_class_embeds is not None

    @property
    def num_classes(self) -> Optional[int]:
        """Number of real classes (the null label, if any, is not one)."""
        if self.num_class_embeds is None:
            return None
        return self.num_class_embeds - (1 if self.null_class_label is not None else 0)


class EpsilonNetwork:
    """Any checkpoint network, seen as the ε-prediction network of one discrete VP schedule.

    The samplers call ``eps = net(model_input, t)`` where ``model_input`` is a VP state
    x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε (what ``scheduler.scale_model_input`` returns) and ``t`` a
    (fractional) label of ``schedule``. Here, and only here, is decided what the network sees:

    - VP network: x_t and the label t itself; its output is converted to ε.
    - VE network: x̃ = x_t/√ᾱ_t = x₀ + σ_t ε and σ_t (docs/parametrization.md#vp-and-ve-are-one-family), both mapped into the
      network's pixel range; its score (or ε̂) output is converted to ε.

    Classifier-free guidance (docs/guidance.md) is applied here too:
    ε̃ = ε(x, ∅) + w (ε(x, c) - ε(x, ∅)).

    Args:
        unet: a module called as ``unet(sample, timestep, class_labels=...)`` returning an object
            with ``.sample`` (diffusers' ``UNet2DModel``) or a tensor.
        family: how the network was trained.
        schedule: the VP schedule the samplers use; for a VE network it must span its σ range.
    """

    def __init__(self, unet, family: ModelFamily, schedule: DiscreteVPSchedule):
        self.unet = unet
        self.family = family
        self.schedule = schedule
        self.nfe = 0  # number of network evaluations (a guided evaluation counts once)
        lo, hi = family.data_range
        self._pixel_scale = (hi - lo) / 2.0  # network pixels x' = c·x + b for x in [-1, 1]
        self._pixel_shift = (hi + lo) / 2.0

    def _net_dtype(self):
        try:
            return next(self.unet.parameters()).dtype
        except (AttributeError, StopIteration):
            return None

    def _call_unet(self, x: torch.Tensor, label: torch.Tensor, class_labels) -> torch.Tensor:
        """The backbone's output for ``x`` at time ``label``: a UNet2DModel or a DiT transformer alike.

        A network that also predicts its variance (DiT's learned σ: twice the input channels) has
        its second half of channels dropped; the first half is its ε (or x̂₀, v) prediction.
        """
        dtype = self._net_dtype() or x.dtype
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        out = self.unet(x.to(dtype), label.to(device=x.device, dtype=dtype if dtype.is_floating_point else x.dtype), **kwargs)
        out = getattr(out, "sample", out)
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (Nichol & Dhariwal 2021; DiT): keep the mean part
            out = out[:, :x.shape[1]]
        return out.to(x.dtype)

    def _epsilon(self, x_t: torch.Tensor, t: torch.Tensor, class_labels) -> torch.Tensor:
        batch = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        alpha_bar_t = self.schedule.alpha_bar_at(t)
        a_t, s_t = vp_scales(alpha_bar_t)
        if self.family.kind == "vp":
            out = self._call_unet(x_t, t, class_labels)
            return to_epsilon(out, self.family.prediction_type, x_t, expand_like(a_t, x_t), expand_like(s_t, x_t))
        # VE: x̃ = x_t/√ᾱ_t = x₀ + σ ε, σ = √((1-ᾱ)/ᾱ)  (docs/parametrization.md#vp-and-ve-are-one-family)
        sigma = s_t / a_t
        x_tilde = vp_to_ve(x_t, expand_like(a_t, x_t))
        c, b = self._pixel_scale, self._pixel_shift
        sigma_net = c * sigma  # the network's own pixel units: x' = c x + b, σ' = c σ
        x_net = c * x_tilde + b
        net_input = x_net
        if self.family.input_scaling == "unit_variance":
            net_input = ve_to_vp(x_net, expand_like(sigma_net, x_t))  # c_in = 1/√(1+σ'²)
        out = self._call_unet(net_input, sigma_net, class_labels)
        return to_epsilon(out, self.family.prediction_type, x_net, 1.0, expand_like(sigma_net, x_t))

    def x0_hat(self, epsilon: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's x̂₀ of the VP state x_t at label t, given ε̂ (for previews of samplers that return none)."""
        a_t, s_t = vp_scales(self.schedule.alpha_bar_at(torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()))
        return epsilon_to_x0(epsilon, x_t, expand_like(a_t, x_t), expand_like(s_t, x_t))

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t, class_labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0):
        """ε_θ(x_t, t) of the VP schedule, guided when ``guidance_scale`` ≠ 1 (docs/guidance.md)."""
        self.nfe += 1
        if class_labels is None or guidance_scale == 1.0:
            if class_labels is None and self.family.is_conditional and self.family.null_class_label is not None:
                class_labels = torch.full((x_t.shape[0],), self.family.null_class_label, device=x_t.device, dtype=torch.long)
            return self._epsilon(x_t, t, class_labels)
        null = torch.full_like(class_labels, self.family.null_class_label)
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        t2 = t.repeat(2) if t.numel() > 1 else t
        eps = self._epsilon(torch.cat([x_t, x_t]), t2, torch.cat([class_labels, null]))
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # ε̃ = ε(∅) + w(ε(c) - ε(∅))
