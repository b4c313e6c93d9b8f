"""Probability-flow ODE of the VP-SDE, Euler or Heun (Song et al. 2021, §4.3; docs/samplers.md#probability-flow-ode)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import LabCompatiblesMixin, VPSDEGridMixin
from .parametrization import epsilon_to_score

SOLVERS = ("euler", "heun")
VARIABLES = ("t", "sigma")


class ProbabilityFlowScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, VPSDEGridMixin):
    """Deterministic sampler: the probability-flow ODE dx/dt = f(x,t) − ½ g(t)² ∇log p_t(x) of the
    VP-SDE, whose solutions have the same marginals as the SDE (docs/samplers.md#probability-flow-ode).

    Drift d(x, t) = −½ β(t) x − ½ β(t) s_θ(x, t). On the grid t_0 = 1 > … > t_N = t_ε of
    ``time_grid`` (docs/schedules.md#time-grids: ``uniform`` with Δt = −(1 − t_ε)/N, the default;
    ``log_snr``; ``karras``), with Δt_i = t_{i+1} − t_i:

    - Euler: x_{i+1} = x_i + d(x_i, t_i) Δt_i  (N evaluations);
    - Heun:  x' = x_i + d_i Δt_i,  x_{i+1} = x_i + ½ (d_i + d(x', t_{i+1})) Δt_i  (2N evaluations).

    With ``variable="sigma"`` the same ODE is stepped in EDM's variables (Karras et al. 2022, Eq. 4 with
    s(t) = 1): the VE state x̃ = x/m(t) at σ(t) = √(1−m²)/m moves as dx̃/dσ = ε̂(x, t), on the same
    grid times. It is the same ODE (both converge to the same samples), stepped in another variable:
    x̃' = x̃_i + ε̂_i Δσ_i (Euler), x̃_{i+1} = x̃_i + ½ (ε̂_i + ε̂') Δσ_i (Heun), with Δσ_i = σ(t_{i+1}) − σ(t_i);
    the state handed back is m(t_{i+1}) x̃, and ε̂ is the one consistent with the (clipped) x̂₀. Which
    variable errs less per step depends on the data (docs/samplers.md#probability-flow-ode): on the
    bundled MNIST DDPM model Heun on the log-SNR grid gives classifier-FID 1.81 at 19 NFE in σ
    against 20.1 in t, while on a 2-D two-mode exact mixture stepping in t is the more accurate.

    With ``final_denoise`` one more evaluation at t_ε returns Tweedie's x̂₀ = (x − √(1−m²) ε̂)/m
    instead of x(t_ε), removing the noise left at t_ε (score_sde's ``denoise=True``).

    Timesteps are the DDPM labels t·(T−1) (Heun's list holds each second-stage time as its own
    entry), so ``len(timesteps)`` is the number of network evaluations, and ``order`` is the
    number of entries per ODE step: 2 for Heun, 1 for Euler (diffusers' pipelines start an img2img
    loop at ``timesteps[t_start * order:]``).

    A loop may start at any entry k (``for t in timesteps[k:]``, after ``add_noise`` to
    ``timesteps[k]``). Heun's list holds each inner time t_j twice: entry 2j − 1, the second stage
    that ends step j − 1 at t_j, then entry 2j, the first stage of step j. A loop that starts on a
    second stage has no first stage to finish, and its state is already at t_j: that entry is a
    no-op (``prev_sample`` is ``sample``) and the Heun step starts at the next entry. Without
    ``set_begin_index`` the two entries cannot be told apart on the first call, so that call
    starts step j and the repeated t_j that follows (if the loop started at 2j − 1) is the no-op
    (see ``DDPMScheduleMixin``). Either way, starting at 2j − 1 gives the sample that starting at
    2j gives, for one more evaluation.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        solver: ``"euler"`` or ``"heun"``.
        sampling_eps: t_ε, the end of integration.
        final_denoise: finish with the Tweedie denoising step at t_ε (one extra evaluation).
        clip_sample: clip x̂₀ to [−1, 1] at every evaluation and use the ε̂ consistent with it
            (for images; keeps a network whose ε̂ is off at high noise on valid images).
        time_grid: ``"uniform"``, ``"log_snr"`` or ``"karras"`` (the NFE does not depend on it).
        variable: ``"t"`` (Song et al. 2021: steps in t on the VP state, the default) or ``"sigma"``
            (the same ODE stepped in σ on the VE state, as EDM does).
    """

    order = 2  # per instance: 2 for Heun, 1 for Euler (set in __init__)

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
        time_grid: str = "uniform",
        variable: str = "t",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if variable not in VARIABLES:
            raise ValueError(f"variable must be one of {VARIABLES}, got {variable!r}")
        self._init_sde()
        self.order = 2 if solver == "heun" else 1
        self._heun_start = None  # Heun: entry, state and drift of the current step's first stage
        self._x_i = None
        self._d_i = None
        self._dt = []
        self._sigma_steps = []  # per entry: (σ at the step's start, σ at its end, m at its end)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """N ODE steps from t = 1 to t_ε: N (Euler) or 2N (Heun) evaluations, +1 with ``final_denoise``."""
        grid = self._time_grid(num_inference_steps)
        sigma, m = self.sde.sigma(grid).tolist(), self.sde.mean_coeff(grid).tolist()
        ends = [(sigma[j], sigma[j + 1], m[j + 1]) for j in range(num_inference_steps)]
        if self.config.solver == "heun":
            times = torch.stack([grid[:-1], grid[1:]], dim=1).reshape(-1)  # t_0, t_1, t_1, t_2, …
            dts = self.dts.repeat_interleave(2)  # both stages of step i use Δt_i
            ends = [e for e in ends for _ in range(2)]
        else:
            times = grid[:-1]
            dts = self.dts
        self._sigma_steps = ends
        self._num_ode_entries = len(times)
        if self.config.final_denoise:
            times = torch.cat([times, grid[-1:]])  # one more evaluation at t_ε
        self._set_entries(times, device)
        self._dt = dts.tolist()
        self._heun_start, self._x_i, self._d_i = None, None, None

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

        A Heun second stage whose first stage this loop did not take (the loop started on it) is a
        no-op: ``sample`` is already the state at its time.

        Returns:
            ``(prev_sample, pred_original_sample)``.

        Raises:
            ValueError: on the first call, for a timestep that is not an entry of ``timesteps``.
        """
        i = self._current_index(timestep)
        if i is None:
            return self._repeat(sample, return_dict)
        if self.config.variable == "sigma" and i < self._num_ode_entries:
            return self._sigma_step(model_output, sample, i, return_dict)
        drift, pred_original_sample = self._drift(model_output, sample, i)
        if i >= self._num_ode_entries:  # final denoising step at t_ε
            prev_sample = pred_original_sample
        elif self.config.solver == "euler":
            prev_sample = sample + drift * self._dt[i]  # Euler method: x + d Δt_i
        elif i % 2 == 0:  # Heun, first stage: Euler predictor to t_{i+1}
            self._heun_start, self._x_i, self._d_i = i, sample, drift
            prev_sample = sample + drift * self._dt[i]
        elif self._heun_start == i - 1:  # Heun, second stage: trapezoidal corrector
            prev_sample = self._x_i + 0.5 * (self._d_i + drift) * self._dt[i]
            self._heun_start, self._x_i, self._d_i = None, None, None
        else:  # a second stage without its first: the loop starts here, at the end of a step
            prev_sample = sample
        return self._finish(i, prev_sample, pred_original_sample, return_dict)

    def _sigma_step(self, model_output, sample, i: int, return_dict: bool):
        """One Euler step or Heun stage of dx̃/dσ = ε̂ on the VE state x̃ = x/m (``variable="sigma"``)."""
        # x̃: VE state | d = (x̃ − x̂₀)/σ = ε̂ | Δσ = σ(t_{i+1}) − σ(t_i) of the step this entry belongs to
        _, x0 = self._epsilon_x0(model_output, sample, i)
        sigma_start, sigma_end, m_end = self._sigma_steps[i]
        m_i = self._m[i]
        x_tilde = sample / m_i
        d = (x_tilde - x0) / (self._std[i] / m_i)  # ε̂ consistent with the (clipped) x̂₀
        d_sigma = sigma_end - sigma_start
        if self.config.solver == "euler":
            x_next = x_tilde + d * d_sigma  # Euler in σ
        elif i % 2 == 0:  # Heun, first stage
            self._heun_start, self._x_i, self._d_i = i, x_tilde, d
            x_next = x_tilde + d * d_sigma
        elif self._heun_start == i - 1:  # Heun, second stage: trapezoidal corrector in σ
            x_next = self._x_i + 0.5 * (self._d_i + d) * d_sigma
            self._heun_start, self._x_i, self._d_i = None, None, None
        else:  # a second stage without its first: the state is already at its time
            return self._finish(i, sample, x0, return_dict)
        return self._finish(i, m_end * x_next, x0, return_dict)
