"""Annealed Langevin dynamics: SMLD / NCSN, Song & Ermon (2019), Algorithm 1 (docs/samplers.md#annealed-langevin-dynamics)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import DDPMScheduleMixin, LabCompatiblesMixin
from .parametrization import (
    epsilon_to_score,
    expand_like,
    forward_marginal,
    score_to_x0,
    sigma_to_vp_scales,
    to_epsilon,
    ve_to_vp,
)
from .schedules import geometric_sigmas


class AnnealedLangevinScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, DDPMScheduleMixin):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Algorithm 1), with NCSNv2's final
    denoising step (Song & Ermon 2020).

    The state is the VE sample x̃ = x₀ + σ z. Starting from x̃ ~ N(0, σ_1² I), for each of the
    ``L`` geometric noise levels σ_1 > … > σ_L it takes ``K = steps_per_level`` Langevin steps

        step_size_i = step_size · σ_i² / σ_L²,   x̃ ← x̃ + step_size_i ∇log p_{σ_i}(x̃) + √(2 step_size_i) z,

    (Song & Ermon write the step size α_i = ε σ_i²/σ_L²), then, if ``final_denoise``, one Tweedie
    step x̃ ← x̃ + σ_L² ∇log p_{σ_L}(x̃).

    **``num_inference_steps`` is the number of noise levels L.** The loop makes
    ``L · K (+1)`` network evaluations, which is ``len(timesteps)``; the levels always run from
    ``sigma_max`` to ``sigma_min`` whatever L is, so a small L anneals coarsely but never stops
    at a large σ. ``order`` is K, the entries of one level (diffusers' pipelines start an
    img2img loop at ``timesteps[t_start * order:]``, the start of a level).

    Any ε-, x̂₀- or v-prediction DDPM network drives it (docs/parametrization.md#vp-and-ve-are-one-family): level σ_i is presented at
    the fractional timestep label whose σ_t equals σ_i, with input x̃/√(1+σ_i²) (this is what
    ``scale_model_input`` returns), and ε̂ becomes the score −ε̂/σ_i.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule
            the network was trained with (as in ``DDPMScheduler``).
        prediction_type: what the network predicts: ``epsilon``, ``sample`` or ``v_prediction``.
        steps_per_level: K, Langevin steps at each noise level.
        step_size: the Langevin step size at the smallest level, step_size_L (Song & Ermon's ε;
            NCSN: 2e-5 on [0, 1] data).
        sigma_max: σ_1; None = the largest σ of the schedule (capped at ``sigma_max_cap``).
        sigma_min: σ_L; None = the smallest σ of the schedule.
        final_denoise: finish with the noise-free Tweedie step (NCSNv2).
        sigma_max_cap: upper bound applied when ``sigma_max`` is None (the linear DDPM schedule
            reaches σ ≈ 157, far beyond the largest distance between images).
    """

    order = 3  # per instance: K = steps_per_level (set in __init__)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list] = None,
        prediction_type: str = "epsilon",
        steps_per_level: int = 3,
        step_size: float = 5e-5,
        sigma_max: Optional[float] = None,
        sigma_min: Optional[float] = None,
        final_denoise: bool = True,
        sigma_max_cap: float = 80.0,
    ):
        self._init_schedule()
        self.order = max(int(steps_per_level), 1)
        self.sigmas = torch.zeros(0)
        self.step_sizes = torch.zeros(0)
        self._labels64 = torch.zeros(0, dtype=torch.float64)
        self.init_noise_sigma = float(self._sigma_range()[0])

    def _sigma_range(self) -> tuple[float, float]:
        sigma_max = self.config.sigma_max or min(self.schedule.sigma_max, self.config.sigma_max_cap)
        sigma_min = self.config.sigma_min or self.schedule.sigma_min
        lo, hi = self.schedule.sigma_min, self.schedule.sigma_max
        if not (lo * (1 - 1e-6) <= sigma_min < sigma_max <= hi * (1 + 1e-6)):
            raise ValueError(f"need {lo:.4g} ≤ sigma_min < sigma_max ≤ {hi:.4g} (the network's noise range), "
                             f"got sigma_min={sigma_min:.4g}, sigma_max={sigma_max:.4g}")
        return sigma_max, sigma_min

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """Set L = ``num_inference_steps`` noise levels; ``timesteps`` gets L·K (+1) entries.

        Raises:
            ValueError: for L < 2, or a step size ≥ 2 σ_L², for which every level diverges.
        """
        self._check_num_inference_steps(num_inference_steps, minimum=2, what="num_inference_steps (noise levels)")
        K = self.config.steps_per_level
        self._check_num_inference_steps(K, minimum=1, what="steps_per_level")
        sigma_max, sigma_min = self._sigma_range()
        step_size = self.config.step_size
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size (Langevin step size) must be positive, got {step_size}")
        delta = step_size / sigma_min**2  # step_size_i/σ_i²: fraction of the level's variance moved per step
        if delta >= 2.0:
            raise ValueError(f"step_size={step_size:g} diverges: each step moves step_size_i/σ_i² = step_size/σ_L² = "
                             f"{delta:.3g} ≥ 2 of the level's variance; use step_size below {2 * sigma_min**2:.3g} "
                             f"(about {0.2 * sigma_min**2:.2g} is safe)")
        self.num_inference_steps = num_inference_steps
        sigma_levels = geometric_sigmas(sigma_max, sigma_min, num_inference_steps)  # σ_1 > … > σ_L
        step_size_levels = step_size * sigma_levels**2 / sigma_min**2  # step_size_i = step_size σ_i²/σ_L²
        sigmas = sigma_levels.repeat_interleave(K)
        step_sizes = step_size_levels.repeat_interleave(K)
        if self.config.final_denoise:
            sigmas = torch.cat([sigmas, sigma_levels[-1:]])
            step_sizes = torch.cat([step_sizes, sigma_levels[-1:] ** 2])  # x̃ + σ_L² ∇log p: Tweedie
        self.sigmas = sigmas
        self.step_sizes = step_sizes
        labels = self.schedule.sigma_to_t(sigmas).float()
        self._labels64 = labels.double()  # a CPU copy, for scale_model_input's look-ups
        self.timesteps = labels.to(device)
        self.init_noise_sigma = float(sigma_max)
        self._reset_loop()

    def _sigma_of(self, timestep) -> torch.Tensor:
        """σ of the level labelled ``timestep`` (float64; one value per element of ``timestep``).

        An entry of ``timesteps`` gives its level's σ exactly; any other label (or any label
        before ``set_timesteps``) the σ the schedule gives it.
        """
        t = torch.as_tensor(timestep).detach().reshape(-1).double().cpu()
        sigma = self.schedule.t_to_sigma(t)
        if len(self._labels64):
            hits = (self._labels64[None, :] - t[:, None]).abs() <= 1e-6 * (1.0 + t.abs()[:, None])
            found = hits.any(dim=1)
            sigma[found] = self.sigmas[hits.float().argmax(dim=1)[found]]
        return sigma

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """x̃/√(1+σ²): the VP state a DDPM network expects at the label of σ (docs/parametrization.md#vp-and-ve-are-one-family).

        σ is that of ``timestep``'s level (of the current entry when ``timestep`` is None); it also
        works before ``set_timesteps`` and for labels that are not entries, from the schedule's σ
        of the label. A tensor of per-sample timesteps scales each sample with its own σ.
        """
        if timestep is None:
            if not len(self.timesteps):
                raise ValueError("scale_model_input needs the timestep before set_timesteps")
            timestep = self.timesteps[min(self._step_index or 0, len(self.timesteps) - 1)]
        sigma = self._sigma_of(timestep)
        if sigma.numel() == 1:
            return ve_to_vp(sample, float(sigma))
        return ve_to_vp(sample, expand_like(sigma, sample))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One Langevin step at the current level (or the final denoising step).

        Args:
            model_output: the network's output at ``scale_model_input(sample)`` and ``timestep``.
            timestep: the current entry of ``timesteps``.
            sample: x̃, the current VE state.
            generator: source of the Langevin noise z.
            return_dict: return a :class:`LabSchedulerOutput` rather than a tuple.

        Returns:
            ``(prev_sample, pred_original_sample)``: the next x̃ and Tweedie's x̂₀ = x̃ + σ_i² ∇log p.

        Raises:
            ValueError: on the first call, for a timestep that is not an entry of ``timesteps``.
        """
        # x̃ (sample): VE state x₀ + σ z | σ_i: current level | step_size_i: Langevin step size | z: fresh N(0, I)
        i = self._current_index(timestep)
        if i is None:
            return self._repeat(sample, return_dict)
        sigma_i = float(self.sigmas[i])
        step_size_i = float(self.step_sizes[i])  # α_i in Song & Ermon 2019, Algorithm 1
        a_t, s_t = sigma_to_vp_scales(sigma_i)  # the network's input is the VP state x̃/√(1+σ_i²)
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, ve_to_vp(sample, sigma_i), a_t, s_t)
        score = epsilon_to_score(epsilon_hat, sigma_i)  # ∇log p_σ(x̃) = -ε̂/σ
        pred_original_sample = score_to_x0(score, sample, sigma_i)  # Tweedie (docs/parametrization.md#score-and-tweedie)
        last = self.config.final_denoise and i == len(self.timesteps) - 1
        if last:
            prev_sample = pred_original_sample  # NCSNv2 final denoising step: x̃ + σ_L² ∇log p
        else:
            z = self._randn(sample, generator)
            prev_sample = sample + step_size_i * score + math.sqrt(2.0 * step_size_i) * z  # Algorithm 1, line 6
        return self._finish(i, prev_sample, pred_original_sample, return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """SMLD perturbation x̃ = x₀ + σ_t z at the σ of each (fractional) timestep label."""
        sigma = self.schedule.t_to_sigma(torch.as_tensor(timesteps).detach().cpu())
        return forward_marginal(original_samples, noise, 1.0, expand_like(sigma, original_samples))  # VE: a = 1, s = σ
