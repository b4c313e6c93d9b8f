"""iPNDM: the improved pseudo-numerical (Adams–Bashforth) multistep solver of the probability-flow
ODE, Zhang & Chen (2023), on EDM's σ-parametrised ODE (docs/samplers.md#ipndm)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import LabCompatiblesMixin, VEStateMixin
from .schedules import check_time_grid

# Adams–Bashforth weights of d_i, d_{i−1}, d_{i−2}, d_{i−3} for orders 1–4 (equal steps)
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class IPNDMScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, VEStateMixin):
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
    §5 and App. "iPNDM"): a linear multistep (Adams–Bashforth) solver of the probability-flow ODE
    written in the VE state x = x₀ + σ z (Karras et al. 2022, Eq. 4 with σ(t) = t):

        dx/dσ = d(x, σ) = (x − D(x; σ))/σ = ε̂(x, σ),

    one network evaluation per step. With d_j = d(x_j, σ_j) and p = min(``max_order``, i + 1):

        x_{i+1} = x_i + (σ_{i+1} − σ_i) Σ_{j<p} b_{p,j} d_{i−j}
        b_1 = (1),  b_2 = (3, −1)/2,  b_3 = (23, −16, 5)/12,  b_4 = (55, −59, 37, −9)/24,

    on σ_0 > … > σ_{N−1} from ``sigma_max`` to ``sigma_min`` on ``time_grid`` (``karras``, ρ = 7, by
    default; docs/schedules.md#time-grids), then σ_N = 0 (the last step lands on D's estimate). The
    "improvement" over PNDM (Liu et al. 2022) is the warm start: the first steps use the lower
    orders with the derivatives they have, instead of Runge–Kutta steps that cost 4 evaluations
    each, so every step costs exactly one evaluation: **NFE = N = ``len(timesteps)``**.

    Why this one (measured, docs/samplers.md#ipndm; ``benchmarks/bench_samplers.py``): of the three
    high-order multistep solvers that published 10-NFE results put ahead of DPM-Solver++(2M) (iPNDM,
    UniPC-3, DPM-Solver++(3M)), it is the one that beats diffusers' DPM-Solver++(2M) with Karras σ
    (the registry's ``dpmsolver++``) on this project's exact-score 16-dimensional mixture, VP and
    VE: at 10 NFE the widest width error of the four modes is 0.05 / 0.03 (VP / VE) against 0.36 /
    0.28, and the mode-weight error 0.008 / 0.007 against 0.028 / 0.012; at 20 NFE the widths are
    within 0.03 against 0.12 / 0.08. DPM-Solver++(3M) and UniPC-3 (diffusers' implementations)
    gained little over 2M there (0.34 / 0.46 width error at 10 NFE). The reasons: in the σ
    parametrisation the ODE's trajectories are nearly straight (Karras et al. 2022, §3), so
    extrapolating the slope d from past steps is accurate; every step, the first and the last
    included, uses one evaluation and the highest order it has the history for, where DPM-Solver++
    spends its first and last steps at order 1. The defaults (order 3, ``log_snr`` grid) were the
    best of orders 2–4 × grids at 5–20 NFE: order 4 overshoots at 10 steps or fewer. On the bundled
    MNIST DDPM model it does *not* beat DPM-Solver++ (classifier-FID 5.32 against 2.03 at 10 NFE,
    3.69 against 3.31 at 20): following that small network's ODE more closely keeps more of its
    error (docs/samplers.md#ipndm).

    The network sees the VP state x/√(1+σ²) at the label of σ (``scale_model_input``), so any
    ε-, x̂₀- or v-prediction DDPM network, or a VE network seen as one, drives it
    (docs/parametrization.md#vp-and-ve-are-one-family). A loop started inside the schedule
    (img2img) starts the warm-up again from order 1.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        max_order: the largest Adams–Bashforth order, 1–4 (1 is Euler in σ, i.e. deterministic DDIM).
        sigma_max: σ_0; None = the schedule's largest σ, capped at ``sigma_max_cap``.
        sigma_min: σ_{N−1}; None = the schedule's smallest σ.
        sigma_max_cap: the cap applied when ``sigma_max`` is None (EDM: 80).
        time_grid: ``"karras"`` (default), ``"log_snr"`` or ``"uniform"`` (equal steps in the label).
        clip_sample: clip D(x; σ) to [−1, 1] (images) and use the d consistent with it.
    """

    order = 1
    DEFAULT_ORDER, DEFAULT_GRID = 3, "log_snr"  # measured best at 5–20 NFE (docs/samplers.md#ipndm)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list] = None,
        prediction_type: str = "epsilon",
        max_order: int = DEFAULT_ORDER,
        sigma_max: Optional[float] = None,
        sigma_min: Optional[float] = None,
        sigma_max_cap: float = 80.0,
        time_grid: str = DEFAULT_GRID,
        clip_sample: bool = False,
    ):
        if max_order not in ADAMS_BASHFORTH:
            raise ValueError(f"max_order must be 1, 2, 3 or 4, got {max_order!r}")
        check_time_grid(time_grid)
        self._init_schedule()
        self._init_levels()
        self.sigma_steps = torch.zeros(0, dtype=torch.float64)  # σ_0 > … > σ_{N−1} > σ_N = 0
        self.init_noise_sigma = float(self._sigma_range()[0])
        self._history = []  # (entry, d_j) of the last steps, newest last

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """N = ``num_inference_steps`` steps, one evaluation each, from σ_0 = ``sigma_max`` to σ_N = 0."""
        self._set_steps_to_zero(num_inference_steps, device)
        self._history = []

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One multistep step from σ_i to σ_{i+1}. ``generator`` is accepted and unused (deterministic).

        Returns:
            ``(prev_sample, pred_original_sample)``: x_{i+1} and D(x_i; σ_i).

        Raises:
            ValueError: on the first call, for a timestep that is not an entry of ``timesteps``.
        """
        # x (sample): VE state at σ_i | D: denoiser x̂₀ | d_i = (x − D)/σ_i = dx/dσ | b: Adams–Bashforth weights
        i = self._current_index(timestep)
        if i is None:
            return self._repeat(sample, return_dict)
        sigma_i, sigma_next = float(self.sigma_steps[i]), float(self.sigma_steps[i + 1])
        _, denoised = self._denoise(model_output, sample, sigma_i)  # D(x; σ) = x − σ ε̂ (clipped if clip_sample)
        d_i = (sample - denoised) / sigma_i  # dx/dσ
        if self._history and self._history[-1][0] != i - 1:
            self._history = []  # not the step after the last one: warm up again
        past = [d for _, d in reversed(self._history)]  # d_{i−1}, d_{i−2}, …
        p = min(self.config.max_order, 1 + len(past))
        b = ADAMS_BASHFORTH[p]
        slope = b[0] * d_i + sum(b_j * d_j for b_j, d_j in zip(b[1:], past))  # Σ_j b_{p,j} d_{i−j}
        prev_sample = sample + (sigma_next - sigma_i) * slope  # x_{i+1} = x_i + (σ_{i+1} − σ_i) Σ b d
        keep = self.config.max_order - 1  # derivatives the next steps can use
        self._history = (self._history + [(i, d_i)])[-keep:] if keep else []
        return self._finish(i, prev_sample, denoised, return_dict)
