"""Probability-flow ODE of the VP-SDE, Euler or Heun (Song et al. 2021, §4.3; MATH.md §5)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import DDPMScheduleMixin, LabSchedulerOutput
from .parametrization import epsilon_to_score, epsilon_to_x0, to_epsilon
from .schedules import VPSDE

SOLVERS = ("euler", "heun")


class ProbabilityFlowScheduler(SchedulerMixin, ConfigMixin, DDPMScheduleMixin):
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
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self._init_schedule()
        self.sde = VPSDE.from_config(self.config)
        self.init_noise_sigma = 1.0
        self.times = torch.zeros(0)
        self._x_i = None  # Heun: state and drift at the start of the current step
        self._d_i = None

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """N ODE steps from t = 1 to t_ε: N (Euler) or 2N (Heun) evaluations, +1 with ``final_denoise``."""
        self._check_num_inference_steps(num_inference_steps)
        t_eps = self.config.sampling_eps
        if not 0 < t_eps < 1:
            raise ValueError(f"sampling_eps (t_ε) must be in (0, 1), got {t_eps}")
        self.num_inference_steps = num_inference_steps
        grid = torch.linspace(1.0, t_eps, num_inference_steps + 1, dtype=torch.float64)
        self.dt = -(1.0 - t_eps) / num_inference_steps  # Δt
        if self.config.solver == "heun":
            self.times = torch.stack([grid[:-1], grid[1:]], dim=1).reshape(-1)  # t_0, t_1, t_1, t_2, …
        else:
            self.times = grid[:-1]
        self._num_ode_entries = len(self.times)
        if self.config.final_denoise:
            self.times = torch.cat([self.times, grid[-1:]])  # one more evaluation at t_ε
        self.timesteps = self.sde.label(self.times).float().to(device)
        self._m = self.sde.mean_coeff(self.times).tolist()  # per entry, computed once
        self._std = self.sde.std(self.times).tolist()
        self._beta = self.sde.beta(self.times).tolist()
        self._step_index, self._x_i, self._d_i = None, None, None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The VP state is what a DDPM network takes: returned unchanged."""
        return sample

    def _drift(self, model_output, sample, i: int):
        m_t, std_t, beta_t = self._m[i], self._std[i], self._beta[i]
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, sample, m_t, std_t)
        drift = -0.5 * beta_t * sample - 0.5 * beta_t * epsilon_to_score(epsilon_hat, std_t)  # f − ½ g² s
        return drift, epsilon_to_x0(epsilon_hat, sample, m_t, std_t)

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
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return LabSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward marginal x_t = m(t) x₀ + √(1 − m²) z at the continuous time t = label/(T−1)."""
        return self.sde.add_noise(original_samples, noise, timesteps)
