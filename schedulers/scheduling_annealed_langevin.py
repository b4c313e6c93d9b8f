"""Annealed Langevin dynamics: SMLD / NCSN, Song & Ermon (2019), Algorithm 1 (MATH.md §4)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import DDPMScheduleMixin
from .parametrization import epsilon_to_score, expand_like, to_epsilon
from .schedules import geometric_sigmas


class AnnealedLangevinScheduler(SchedulerMixin, ConfigMixin, DDPMScheduleMixin):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Algorithm 1), with NCSNv2's final
    denoising step (Song & Ermon 2020).

    The state is the VE sample x̃ = x₀ + σ z. Starting from x̃ ~ N(0, σ_1² I), for each of the
    ``L`` geometric noise levels σ_1 > … > σ_L it takes ``K = steps_per_level`` Langevin steps

        α_i = ε σ_i² / σ_L²,   x̃ ← x̃ + α_i ∇log p_{σ_i}(x̃) + √(2 α_i) z,

    then, if ``final_denoise``, one Tweedie step x̃ ← x̃ + σ_L² ∇log p_{σ_L}(x̃).

    **``num_inference_steps`` is the number of noise levels L.** The loop makes
    ``L · K (+1)`` network evaluations, which is ``len(timesteps)``; the levels always run from
    ``sigma_max`` to ``sigma_min`` whatever L is, so a small L anneals coarsely but never stops
    at a large σ.

    Any ε-, x̂₀- or v-prediction DDPM network drives it (MATH.md §3): level σ_i is presented at
    the fractional timestep label whose σ_t equals σ_i, with input x̃/√(1+σ_i²) (this is what
    ``scale_model_input`` returns), and ε̂ becomes the score −ε̂/σ_i.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule
            the network was trained with (as in ``DDPMScheduler``).
        prediction_type: what the network predicts: ``epsilon``, ``sample`` or ``v_prediction``.
        steps_per_level: K, Langevin steps at each noise level.
        epsilon: ε, the step size at the smallest level: α_L = ε (NCSN: 2e-5 on [0, 1] data).
        sigma_max: σ_1; None = the largest σ of the schedule (capped at ``sigma_max_cap``).
        sigma_min: σ_L; None = the smallest σ of the schedule.
        final_denoise: finish with the noise-free Tweedie step (NCSNv2).
        sigma_max_cap: upper bound applied when ``sigma_max`` is None (the linear DDPM schedule
            reaches σ ≈ 157, far beyond the largest distance between images).
    """

    order = 1

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
        epsilon: float = 5e-5,
        sigma_max: Optional[float] = None,
        sigma_min: Optional[float] = None,
        final_denoise: bool = True,
        sigma_max_cap: float = 80.0,
    ):
        self._init_schedule()
        self.sigmas = torch.zeros(0)
        self.step_sizes = torch.zeros(0)
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
            ValueError: for L < 2, or a step size ε ≥ 2 σ_L², for which every level diverges.
        """
        self._check_num_inference_steps(num_inference_steps, minimum=2, what="num_inference_steps (noise levels)")
        K = self.config.steps_per_level
        self._check_num_inference_steps(K, minimum=1, what="steps_per_level")
        sigma_max, sigma_min = self._sigma_range()
        epsilon = self.config.epsilon
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise ValueError(f"epsilon (Langevin step size) must be positive, got {epsilon}")
        delta = epsilon / sigma_min**2  # α_i/σ_i²: fraction of the level's variance moved per step
        if delta >= 2.0:
            raise ValueError(f"epsilon={epsilon:g} diverges: each step moves α_i/σ_i² = ε/σ_L² = {delta:.3g} ≥ 2 of the "
                             f"level's variance; use epsilon below {2 * sigma_min**2:.3g} (about {0.2 * sigma_min**2:.2g} is safe)")
        self.num_inference_steps = num_inference_steps
        sigma_levels = geometric_sigmas(sigma_max, sigma_min, num_inference_steps)  # σ_1 > … > σ_L
        alpha_levels = epsilon * sigma_levels**2 / sigma_min**2  # α_i = ε σ_i²/σ_L²
        sigmas = sigma_levels.repeat_interleave(K)
        step_sizes = alpha_levels.repeat_interleave(K)
        if self.config.final_denoise:
            sigmas = torch.cat([sigmas, sigma_levels[-1:]])
            step_sizes = torch.cat([step_sizes, sigma_levels[-1:] ** 2])  # x̃ + σ_L² ∇log p: Tweedie
        self.sigmas = sigmas
        self.step_sizes = step_sizes
        self.timesteps = self.schedule.sigma_to_t(sigmas).float().to(device)
        self.init_noise_sigma = float(sigma_max)
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """x̃/√(1+σ_i²): the VP state a DDPM network expects at the label of σ_i (MATH.md §3)."""
        sigma_i = float(self.sigmas[self._current_index(timestep)])
        return sample / math.sqrt(1.0 + sigma_i**2)

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
        """
        # x̃ (sample): VE state x₀ + σ z | σ_i: current level | α_i: step size | z: fresh N(0, I)
        i = self._current_index(timestep)
        sigma_i = float(self.sigmas[i])
        alpha_i = float(self.step_sizes[i])
        a, s = 1.0 / math.sqrt(1.0 + sigma_i**2), sigma_i / math.sqrt(1.0 + sigma_i**2)  # VP scales of the input
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, sample * a, a, s)
        score = epsilon_to_score(epsilon_hat, sigma_i)  # ∇log p_σ(x̃) = -ε̂/σ
        pred_original_sample = sample + sigma_i**2 * score  # Tweedie (MATH.md §3)
        last = self.config.final_denoise and i == len(self.timesteps) - 1
        if last:
            prev_sample = pred_original_sample  # NCSNv2 final denoising step: x̃ + σ_L² ∇log p
        else:
            z = self._randn(sample, generator)
            prev_sample = sample + alpha_i * score + math.sqrt(2.0 * alpha_i) * z  # Algorithm 1, line 6
        return self._finish(i, prev_sample, pred_original_sample, return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """SMLD perturbation x̃ = x₀ + σ_t z at the σ of each (fractional) timestep label."""
        sigma = self.schedule.t_to_sigma(timesteps.detach().cpu())
        return original_samples + expand_like(sigma, original_samples) * noise
