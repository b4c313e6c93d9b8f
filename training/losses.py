"""The two training objectives (docs/schedules.md#ddpm-the-discrete-vp-schedule, docs/schedules.md#smld-the-ve-family): sample a noise level, add noise, weight, square."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from schedulers.parametrization import epsilon_to_v, forward_marginal, score_to_epsilon, ve_to_vp, vp_scales
from schedulers.schedules import DiscreteVPSchedule, linear_betas_for_sigma_range


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, distribution: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Training labels t ∈ {0..T-1} for a batch.

    - ``"uniform"``: t ~ U{0..T-1} (Ho et al. 2020, Algorithm 1);
    - ``"logit_normal"``: t = ⌊T·sigmoid(m + s·n)⌋ with n ~ N(0, 1) (Esser et al. 2024, §3.1): the middle
      labels, where the sample's layout is decided, are drawn more often than the two ends.
    """
    if distribution == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    if distribution == "logit_normal":
        n = torch.randn(batch, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(logit_mean + logit_std * n)
        return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {distribution!r}")


def ddpm_loss(unet, x_0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
              prediction_type: str = "epsilon", class_labels=None, timestep_sampling: str = "uniform",
              logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """DDPM Algorithm 1: t ~ U{0..T-1}, ε ~ N(0, I), ‖target − net(√ᾱ_t x₀ + √(1-ᾱ_t) ε, t)‖².

    Args:
        unet: network called as ``unet(x_t, t, class_labels=...)``.
        x_0: clean images in [-1, 1].
        alphas_cumprod: ᾱ_t on the training labels (on ``x_0``'s device).
        generator: a CPU generator; all randomness of the step comes from it.
        prediction_type: ``"epsilon"`` (target ε), ``"sample"`` (x₀) or ``"v_prediction"``
            (v = √ᾱ ε − √(1-ᾱ) x₀).
        timestep_sampling, logit_mean, logit_std: how t is drawn (:func:`sample_timesteps`).
    """
    b = x_0.shape[0]
    t = sample_timesteps(b, len(alphas_cumprod), generator, timestep_sampling, logit_mean, logit_std).to(x_0.device)
    epsilon = torch.randn(x_0.shape, generator=generator).to(x_0.device, x_0.dtype)
    alpha_bar_t = alphas_cumprod[t].to(x_0.dtype).view(b, 1, 1, 1)
    a_t, s_t = vp_scales(alpha_bar_t)
    x_t = forward_marginal(x_0, epsilon, a_t, s_t)  # q(x_t | x_0)
    if prediction_type == "epsilon":
        target = epsilon
    elif prediction_type == "sample":
        target = x_0
    elif prediction_type == "v_prediction":
        target = epsilon_to_v(epsilon, x_t, a_t, s_t)
    else:
        raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    prediction = unet(x_t, t, **kwargs).sample
    return F.mse_loss(prediction.float(), target.float())


SIGMA_SAMPLING = ("log_uniform", "vp_uniform")


def sample_sigmas(batch: int, sigma_min: float, sigma_max: float, generator: torch.Generator,
                  num_levels: int | None = None, distribution: str = "log_uniform") -> torch.Tensor:
    """σ for each image.

    - ``num_levels``: one of that many geometric levels σ_1 > … > σ_L (NCSN);
    - ``"log_uniform"``: log σ uniform on [log σ_min, log σ_max];
    - ``"vp_uniform"``: σ_t at a uniformly drawn (fractional) label t of the linear DDPM schedule that
      spans [σ_min, σ_max] — the noise levels DDPM training visits, which weights the middle and
      high σ that shape a sample far more than log-uniform draws do.
    """
    if num_levels:
        levels = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64)
        return levels[torch.randint(0, num_levels, (batch,), generator=generator)].float()
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if distribution == "log_uniform":
        return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).float()
    if distribution == "vp_uniform":
        schedule = _vp_schedule(sigma_min, sigma_max)
        return schedule.t_to_sigma(u * (schedule.num_train_timesteps - 1)).float()
    raise ValueError(f"sigma distribution must be one of {SIGMA_SAMPLING}, got {distribution!r}")


@functools.lru_cache(maxsize=4)
def _vp_schedule(sigma_min: float, sigma_max: float) -> DiscreteVPSchedule:
    beta_start, beta_end = linear_betas_for_sigma_range(sigma_min, sigma_max)
    return DiscreteVPSchedule(beta_start=beta_start, beta_end=beta_end)


def ncsn_loss(unet, x_0: torch.Tensor, sigma_min: float, sigma_max: float, generator: torch.Generator,
              num_levels: int | None = None, class_labels=None, input_scaling: str = "none",
              sigma_distribution: str = "log_uniform") -> torch.Tensor:
    """Denoising score matching with λ(σ) = σ²: E ‖σ s_θ(x₀ + σ ε, σ) + ε‖² (docs/schedules.md#smld-the-ve-family).

    The network is a ``UNet2DModel`` with Fourier time embedding fed σ; diffusers divides its
    output by σ, so ``unet(...).sample`` is the score s_θ and σ·s_θ ≈ −ε is of unit scale.
    With ``input_scaling="unit_variance"`` the network sees x̃/√(1+σ²) (EDM's c_in), not x̃.
    """
    b = x_0.shape[0]
    sigma = sample_sigmas(b, sigma_min, sigma_max, generator, num_levels, sigma_distribution).to(x_0.device)
    epsilon = torch.randn(x_0.shape, generator=generator).to(x_0.device, x_0.dtype)
    sigma_ = sigma.to(x_0.dtype).view(b, 1, 1, 1)
    x_tilde = forward_marginal(x_0, epsilon, 1.0, sigma_)  # perturbation x̃ = x + σ ε
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    net_input = ve_to_vp(x_tilde, sigma_) if input_scaling == "unit_variance" else x_tilde  # EDM's c_in
    score = unet(net_input, sigma, **kwargs).sample
    return F.mse_loss(score_to_epsilon(score, sigma_).float(), epsilon.float())  # ‖σ s + ε‖², per dimension
