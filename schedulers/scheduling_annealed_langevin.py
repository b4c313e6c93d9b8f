"""Annealed Langevin dynamics: SMLD / NCSN, Song & Ermon (2019), Algorithm 1 (docs/samplers.md#annealed-langevin-dynamics)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import LabCompatiblesMixin, VEStateMixin
from .parametrization import (
    epsilon_to_score,
    score_to_x0,
    sigma_to_vp_scales,
    to_epsilon,
    ve_to_vp,
)
from .schedules import check_time_grid

DEFAULT_DELTA = 0.1  # δ: step_size_i = δ σ_i² (measured: docs/samplers.md#annealed-langevin-dynamics)
DEFAULT_STEPS_PER_LEVEL = 3  # K


class AnnealedLangevinScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, VEStateMixin):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Algorithm 1), with NCSNv2's final
    denoising step (Song & Ermon 2020).

    The state is the VE sample x̃ = x₀ + σ z. Starting from x̃ ~ N(0, σ_1² I), for each of the
    ``L`` noise levels σ_1 > … > σ_L it takes ``K = steps_per_level`` Langevin steps

        step_size_i = δ σ_i²,   x̃ ← x̃ + step_size_i ∇log p_{σ_i}(x̃) + √(2 step_size_i) z,

    (Song & Ermon write the step size α_i = ε σ_i²/σ_L², so ε = δ σ_L²), then, if
    ``final_denoise``, one Tweedie step x̃ ← x̃ + σ_L² ∇log p_{σ_L}(x̃).

    **The step size is relative to the level** (``delta`` = δ, the fraction of the level's variance
    σ_i² one step moves), so the same δ works on every checkpoint whatever its σ_min. Users who
    think in the paper's absolute ε set ``step_size`` instead: when it is given it wins and
    δ = ε/σ_L² is derived from it (``delta`` is then ignored).

    **Bias and stability** (docs/exact-scores.md#langevin-stationary-variance). Where p_{σ_i} is
    close to a Gaussian of variance v ≥ σ_i² (a mode of width s_k: v = s_k² + σ_i²), the chain
    x ← x + γ(−(x − μ)/v) + √(2γ) z with γ = δσ_i² is stable for γ < 2v (always, for δ < 2) and its
    variance moves as V′ = (1 − γ/v)² V + 2γ towards the stationary value

        V* = v / (1 − γ/(2v))  ≤  v / (1 − δ/2),

    so the discretised chain over-disperses each mode by a relative variance of at most
    δ/(2 − δ) ≈ δ/2 (a width error ≈ δ/4), a bias linear in δ that more steps do not remove; and it
    forgets where it started as (1 − γ/v)^{2K} ≥ (1 − δ)^{2K} after K steps (NCSNv2's Technique 4
    chooses ε from the same recursion). Small δ is accurate but mixes slowly (K must grow like
    1/δ), large δ mixes fast but inflates the modes; in many dimensions over-dispersion also moves
    mass towards the wider modes. The defaults (δ = 0.1, K = 3; the registry adds L = 333, i.e.
    1,000 NFE) were chosen by measurement on a 16-dimensional exact-score mixture, VP and VE: δ
    between 0.08 and 0.12 is best at that budget, K hardly matters
    (docs/samplers.md#annealed-langevin-dynamics).

    **Noise correction** (``noise_correction``, on in the registry). Drawing the noise with variance
    step_size_i (2 − δ) instead of 2 step_size_i,

        x̃ ← x̃ + step_size_i ∇log p_{σ_i}(x̃) + √(step_size_i (2 − δ)) z,

    makes the recursion above exact at the level's own scale: for v = σ_i² (data narrower than the
    level) V′ = (1 − δ)² V + δ(2 − δ) σ_i² has V* = σ_i², so N(μ, σ_i² I) is left invariant and the
    over-dispersion is gone (it stays for wide modes, v ≫ σ_i², where it was small). δ → 0 is
    Algorithm 1; δ = 1 jumps to Tweedie's x̂₀ and adds fresh noise of the level, σ_i z. Measured on
    the 16-dimensional exact-score mixture at the defaults (1,000 NFE, 3,000 samples): mode-weight
    error 0.042 / 0.032 (VP / VE) against Algorithm 1's 0.068 / 0.060, width error 0.022 / 0.019
    against 0.049 / 0.046; Algorithm 1 moves mass into the widest mode (0.47 for 0.40)
    (docs/samplers.md#annealed-langevin-dynamics).

    **``num_inference_steps`` is the number of noise levels L.** The loop makes
    ``L · K (+1)`` network evaluations, which is ``len(timesteps)``; the levels always run from
    ``sigma_max`` to ``sigma_min`` whatever L is, on ``time_grid`` (docs/schedules.md#time-grids):
    ``log_snr``, the paper's geometric levels (default), ``karras`` or ``uniform`` (equal steps in the
    DDPM label). ``order`` is K, the entries of one level (diffusers' pipelines start an img2img loop
    at ``timesteps[t_start * order:]``, the start of a level).

    Any ε-, x̂₀- or v-prediction DDPM network drives it (docs/parametrization.md#vp-and-ve-are-one-family): level σ_i is presented at
    the fractional timestep label whose σ_t equals σ_i, with input x̃/√(1+σ_i²) (this is what
    ``scale_model_input`` returns), and ε̂ becomes the score −ε̂/σ_i.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule
            the network was trained with (as in ``DDPMScheduler``).
        prediction_type: what the network predicts: ``epsilon``, ``sample`` or ``v_prediction``.
        steps_per_level: K, Langevin steps at each noise level.
        delta: δ, the step size relative to the level: step_size_i = δ σ_i² (0 < δ < 2).
        step_size: None, or the paper's ε, the step size at the smallest level (NCSN: 2e-5 on
            [0, 1] data); when given, δ = ε/σ_L² and ``delta`` is ignored.
        sigma_max: σ_1; None = the largest σ of the schedule (capped at ``sigma_max_cap``).
        sigma_min: σ_L; None = the smallest σ of the schedule.
        final_denoise: finish with the noise-free Tweedie step (NCSNv2).
        sigma_max_cap: upper bound applied when ``sigma_max`` is None (the linear DDPM schedule
            reaches σ ≈ 157, far beyond the largest distance between images).
        time_grid: ``"log_snr"`` (geometric levels), ``"karras"`` or ``"uniform"``.
        noise_correction: noise variance step_size_i (2 − δ) instead of Algorithm 1's 2 step_size_i
            (see above); off here (the paper's algorithm), on in the registry.
    """

    order = DEFAULT_STEPS_PER_LEVEL  # per instance: K = steps_per_level (set in __init__)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list] = None,
        prediction_type: str = "epsilon",
        steps_per_level: int = DEFAULT_STEPS_PER_LEVEL,
        delta: float = DEFAULT_DELTA,
        step_size: Optional[float] = None,
        sigma_max: Optional[float] = None,
        sigma_min: Optional[float] = None,
        final_denoise: bool = True,
        sigma_max_cap: float = 80.0,
        time_grid: str = "log_snr",
        noise_correction: bool = False,
    ):
        self._init_schedule()
        check_time_grid(time_grid)
        self.order = max(int(steps_per_level), 1)
        self._init_levels()
        self.step_sizes = torch.zeros(0)
        self.init_noise_sigma = float(self._sigma_range()[0])

    @property
    def delta(self) -> float:
        """δ = step_size_i/σ_i²: ``delta``, or ε/σ_L² when ``step_size`` (ε) is given.

        Raises:
            ValueError: for δ ≤ 0 or δ ≥ 2, where every level diverges.
        """
        _, sigma_min = self._sigma_range()
        step_size = self.config.step_size
        if step_size is not None:
            if not (step_size > 0 and math.isfinite(step_size)):
                raise ValueError(f"step_size (Langevin step size ε) must be positive, got {step_size}")
            delta = step_size / sigma_min**2  # δ = ε/σ_L²
            if delta >= 2.0:
                raise ValueError(f"step_size={step_size:g} diverges: each step moves step_size_i/σ_i² = step_size/σ_L² = "
                                 f"{delta:.3g} ≥ 2 of the level's variance; use step_size below {2 * sigma_min**2:.3g} "
                                 f"(about {DEFAULT_DELTA * sigma_min**2:.2g}, δ = {DEFAULT_DELTA}, is accurate), or set "
                                 f"delta instead")
            return delta
        delta = self.config.delta
        if not (0 < delta < 2 and math.isfinite(delta)):
            raise ValueError(f"delta (Langevin step relative to the level, step_size_i = δ σ_i²) must be in (0, 2), "
                             f"got {delta}; δ ≥ 2 diverges")
        return float(delta)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """Set L = ``num_inference_steps`` noise levels; ``timesteps`` gets L·K (+1) entries.

        Raises:
            ValueError: for L < 2, or a step size δ ≥ 2 (ε ≥ 2 σ_L²), for which every level diverges.
        """
        self._check_num_inference_steps(num_inference_steps, minimum=2, what="num_inference_steps (noise levels)")
        K = self.config.steps_per_level
        self._check_num_inference_steps(K, minimum=1, what="steps_per_level")
        delta = self.delta
        self.num_inference_steps = num_inference_steps
        sigma_levels = self._sigma_levels(num_inference_steps)  # σ_1 > … > σ_L
        step_size_levels = delta * sigma_levels**2  # step_size_i = δ σ_i² (= ε σ_i²/σ_L²)
        sigmas = sigma_levels.repeat_interleave(K)
        step_sizes = step_size_levels.repeat_interleave(K)
        if self.config.final_denoise:
            sigmas = torch.cat([sigmas, sigma_levels[-1:]])
            step_sizes = torch.cat([step_sizes, sigma_levels[-1:] ** 2])  # x̃ + σ_L² ∇log p: Tweedie
        self.step_sizes = step_sizes
        self._set_levels(sigmas, device)
        self.init_noise_sigma = float(sigma_levels[0])

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
            noise_var = 2.0 * step_size_i  # Algorithm 1, line 6
            if self.config.noise_correction:
                noise_var = step_size_i * (2.0 - step_size_i / sigma_i**2)  # α(2 − δ): V* = σ_i² (class docstring)
            prev_sample = sample + step_size_i * score + math.sqrt(noise_var) * z
        return self._finish(i, prev_sample, pred_original_sample, return_dict)
