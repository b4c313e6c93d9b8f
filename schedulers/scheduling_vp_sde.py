"""Reverse-time VP-SDE, Euler–Maruyama (or ancestral) predictor with an optional Langevin corrector
(Song et al. 2021, "Score-Based Generative Modeling through SDEs", docs/samplers.md#vp-sde-euler-maruyama)."""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import LabCompatiblesMixin, VPSDEGridMixin
from .parametrization import epsilon_to_score


PREDICTORS = ("euler_maruyama", "ancestral")


class VPSDEScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, VPSDEGridMixin):
    """Euler–Maruyama on the reverse VP-SDE, optionally as a predictor–corrector sampler.

    Forward SDE dx = -½ β(t) x dt + √β(t) dw, β(t) = β_min + t (β_max − β_min) with
    β_min = T·beta_start, β_max = T·beta_end (docs/samplers.md#vp-sde-euler-maruyama); reverse SDE
    dx = [f(x,t) − g(t)² ∇log p_t(x)] dt + g(t) dw̄. With N = ``num_inference_steps`` the grid is
    t_0 = 1 > t_1 > … > t_N = t_ε on ``time_grid`` (docs/schedules.md#time-grids): ``uniform``
    (Song et al.'s Δt = −(1 − t_ε)/N, the default), ``log_snr`` or ``karras``; with
    Δt_i = t_{i+1} − t_i < 0 each predictor step is

        x̄ = x + [−½ β(t_i) x − β(t_i) s_θ(x, t_i)] Δt_i,    x = x̄ + √β(t_i) √|Δt_i| z,

    returning x̄ (no noise) on the last step. ``predictor="ancestral"`` replaces it with Song et al.'s
    other predictor, ancestral sampling (their Appendix F), here with the exact posterior of the
    forward process between the two grid times t = t_i > s = t_{i+1} (Ho et al. 2020, Eqs. 6–7):

        m_{t|s} = m(t)/m(s),  β_{t|s} = 1 − m_{t|s}²,
        x̄ = m(s) β_{t|s}/σ_t² · x̂₀ + m_{t|s} σ_s²/σ_t² · x,   x = x̄ + σ_s √β_{t|s}/σ_t · z,

    σ_t = √(1 − m(t)²). On a fine grid the two predictors agree to first order; on a coarse one
    Euler–Maruyama's additive noise √(β(t)|Δt|) exceeds the posterior's and its drift overshoots
    (β(t)|Δt| ≈ 1 at high noise with 10 steps), while the ancestral step stays exact for a correct
    x̂₀, which is what makes the predictor–corrector sampler usable at 10–20 NFE on the log-SNR or
    Karras grid (docs/samplers.md#vp-sde-euler-maruyama).

    With ``corrector_steps`` = C > 0, each predictor step
    is preceded by C Langevin corrector steps at t_i (score_sde's PC sampler):

        step_size = 2 α_i (r ‖z‖/‖s_θ‖)²,   x ← x + step_size · s_θ + √(2 step_size) z,

    r = ``snr``, α_i = 1 − β of the discrete DDPM schedule at the label of t_i (score_sde's
    ``sde.alphas[timestep]``; linearly interpolated between integer labels), always in (0, 1).

    ``len(timesteps)`` = N (1 + C) network evaluations, and ``order`` = 1 + C, the entries of one
    predictor step (diffusers' pipelines start an img2img loop at ``timesteps[t_start * order:]``).
    Timesteps are the labels t·(T−1) a DDPM network was trained on; ε̂ becomes the score
    −ε̂/√(1 − m(t)²) with the SDE's own marginal std.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        sampling_eps: t_ε, where integration stops (the score is unreliable at t → 0).
        corrector_steps: C, Langevin corrector steps per predictor step (0 = plain Euler–Maruyama).
        snr: r, the corrector's signal-to-noise ratio.
        time_grid: ``"uniform"``, ``"log_snr"`` or ``"karras"``: where the N + 1 grid times lie (the
            NFE does not depend on it).
        predictor: ``"euler_maruyama"`` (Song et al.'s Algorithm 2, the default) or ``"ancestral"``
            (the forward process's posterior between grid times).
    """

    order = 1  # per instance: 1 + corrector_steps (set in __init__)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list] = None,
        prediction_type: str = "epsilon",
        sampling_eps: float = 1e-3,
        corrector_steps: int = 0,
        snr: float = 0.16,
        time_grid: str = "uniform",
        predictor: str = "euler_maruyama",
    ):
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
        self._init_sde()
        self.order = 1 + max(int(corrector_steps), 0)
        self._alpha = []
        self._dt = []

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """N predictor steps from t = 1 to t_ε; each preceded by ``corrector_steps`` corrector steps."""
        grid = self._time_grid(num_inference_steps)
        C = self.config.corrector_steps
        if C < 0:
            raise ValueError(f"corrector_steps must be ≥ 0, got {C}")
        if C and not self.config.snr > 0:
            raise ValueError(f"snr must be positive, got {self.config.snr}")
        self.is_corrector = torch.tensor(([True] * C + [False]) * num_inference_steps)
        times = grid[:-1].repeat_interleave(C + 1)
        self._set_entries(times, device)
        self._dt = self.dts.repeat_interleave(C + 1).tolist()  # Δt_i of each entry's predictor step
        next_times = grid[1:].repeat_interleave(C + 1)  # s = t_{i+1}: where each entry's predictor step lands
        self._m_next = self.sde.mean_coeff(next_times).tolist()
        self._std_next = self.sde.std(next_times).tolist()
        # α_i = 1 − β of the discrete schedule at the (fractional) label of each entry, in (0, 1)
        labels = self.sde.label(times).numpy()
        self._alpha = np.interp(labels, np.arange(self.schedule.num_train_timesteps), self.schedule.alphas.numpy()).tolist()

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One corrector or Euler–Maruyama predictor step at the current time.

        Returns:
            ``(prev_sample, pred_original_sample)``.

        Raises:
            ValueError: on the first call, for a timestep that is not an entry of ``timesteps``.
        """
        # x (sample): VP state | t: continuous time | β(t): g² | Δt_i < 0 | z: fresh N(0, I) | s: score
        i = self._current_index(timestep)
        if i is None:
            return self._repeat(sample, return_dict)
        beta_t = self._beta[i]
        epsilon_hat, pred_original_sample = self._epsilon_x0(model_output, sample, i)
        score = epsilon_to_score(epsilon_hat, self._std[i])  # s_θ = -ε̂/√(1-m²)
        if bool(self.is_corrector[i]):
            z = self._randn(sample, generator)
            alpha_i = self._alpha[i]  # α = 1 − β of the discrete schedule (score_sde: sde.alphas[timestep])
            # norms averaged over the batch, as in score_sde: a per-sample ‖s_θ‖ can vanish at a mode
            z_norm = z.flatten(1).norm(dim=1).mean()
            s_norm = score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
            step_size = 2 * alpha_i * (self.config.snr * z_norm / s_norm) ** 2  # 2α (r‖z‖/‖s‖)²
            prev_sample = sample + step_size * score + (2 * step_size).sqrt() * z  # Langevin corrector
        else:
            if self.config.predictor == "ancestral":
                m_t, std_t, m_s, std_s = self._m[i], self._std[i], self._m_next[i], self._std_next[i]
                m_ts = m_t / m_s  # m_{t|s}: the forward mean coefficient from s to t
                beta_ts = 1.0 - m_ts**2  # β_{t|s}
                # posterior mean of x_s given x_t and x̂₀ (Ho et al. 2020, Eq. 7)
                x_mean = (m_s * beta_ts / std_t**2) * pred_original_sample + (m_ts * std_s**2 / std_t**2) * sample
                noise_std = std_s * math.sqrt(beta_ts) / std_t  # √β̃: the posterior's std
            else:
                drift = -0.5 * beta_t * sample - beta_t * score  # f − g² s
                dt = self._dt[i]  # Δt_i = t_{i+1} − t_i
                x_mean = sample + drift * dt  # x̄ = x + [f − g² s] Δt_i
                noise_std = math.sqrt(beta_t * abs(dt))  # g √|Δt_i|
            last = i == len(self.timesteps) - 1
            if last:
                prev_sample = x_mean  # noise removal on the last step
            else:
                z = self._randn(sample, generator)
                prev_sample = x_mean + noise_std * z
        return self._finish(i, prev_sample, pred_original_sample, return_dict)
