"""Probability-flow ODE of the VP-SDE, Euler or Heun (Song et al. 2021, §4.3; MATH.md §5)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import VPSDEGridMixin
from .parametrization import epsilon_to_score

SOLVERS = ("euler", "heun")


class ProbabilityFlowScheduler(SchedulerMixin, ConfigMixin, VPSDEGridMixin):
    """Deterministic sampler: the probability-flow ODE dx/dt = f(x,t) − ½ g(t)² ∇log p_t(x) of the
    VP-SDE, whose solutions have the same marginals as the SDE (MATH.md §5).

    Drift d(x, t) = −½ β(t) x − ½ β(t) s_θ(x, t). On the grid t_0 = 1 > … > t_N = t_ε with
    Δt = −(1 − t_ε)/N:

    - Euler: x_{i+1} = x_i + d(x_i, t_i) Δt  (N evaluations);
    - Heun:  x' = x_i + d_i Δt,  x_{i+1} = x_i + ½ (d_i + d(x', t_{i+1})) Δt  (2N evaluations).

    With ``final_denoise`` one more evaluation at t_ε returns Tweedie's x̂₀ = (x − √(1−m²) ε̂)/m
    instead of x(t_ε), removing the noise left at t_ε (score_sde's ``denoise=True``).

    Timesteps are the DDPM labels t·(T−1) (Heun's list holds each second-stage time as its own
    entry), so ``len(timesteps)`` is the number of network evaluations.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        solver: ``"euler"`` or ``"heun"``.
        sampling_eps: t_ε, the end of integration.
        final_denoise: finish with the Tweedie denoising step at t_ε (one extra evaluation).
        clip_sample: clip x̂₀ to [−1, 1] at every evaluation and use the ε̂ consistent with it
            (for images; keeps a network whose ε̂ is off at high noise on valid images).
    """

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list] = None,
        prediction_type: str = "epsilon",
        solver: str = "heun",
        sampling_eps: float = 1e-3,
        final_denoise: bool = True,
        clip_sample: bool = False,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self._init_sde()
        self._x_i = None  # Heun: state and drift at the start of the current step
        self._d_i = None

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """N ODE steps from t = 1 to t_ε: N (Euler) or 2N (Heun) evaluations, +1 with ``final_denoise``."""
        grid = self._time_grid(num_inference_steps)
        if self.config.solver == "heun":
            times = torch.stack([grid[:-1], grid[1:]], dim=1).reshape(-1)  # t_0, t_1, t_1, t_2, …
        else:
            times = grid[:-1]
        self._num_ode_entries = len(times)
        if self.config.final_denoise:
            times = torch.cat([times, grid[-1:]])  # one more evaluation at t_ε
        self._set_entries(times, device)
        self._x_i, self._d_i = None, None

    def _drift(self, model_output, sample, i: int):
        beta_t = self._beta[i]
        epsilon_hat, x0 = self._epsilon_x0(model_output, sample, i)
        drift = -0.5 * beta_t * sample - 0.5 * beta_t * epsilon_to_score(epsilon_hat, self._std[i])  # f − ½ g² s
        return drift, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One Euler step, or one stage of a Heun step. ``generator`` is accepted and unused (deterministic).

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        i = self._current_index(timestep)
        drift, pred_original_sample = self._drift(model_output, sample, i)
        if i >= self._num_ode_entries:  # final denoising step at t_ε
            prev_sample = pred_original_sample
        elif self.config.solver == "euler":
            prev_sample = sample + drift * self.dt  # Euler method
        elif i % 2 == 0:  # Heun, first stage: Euler predictor to t_{i+1}
            self._x_i, self._d_i = sample, drift
            prev_sample = sample + drift * self.dt
        else:  # Heun, second stage: trapezoidal corrector
            prev_sample = self._x_i + 0.5 * (self._d_i + drift) * self.dt
            self._x_i, self._d_i = None, None
        return self._finish(i, prev_sample, pred_original_sample, return_dict)
