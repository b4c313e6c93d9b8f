"""EDM's stochastic sampler: Heun's method with churn, Karras et al. (2022), Algorithm 2
(docs/samplers.md#edm-stochastic-sampler)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import LabCompatiblesMixin, VEStateMixin
from .schedules import check_time_grid

FIRST_STAGE, SECOND_STAGE = 1, 2


class EDMStochasticScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, VEStateMixin):
    """Karras et al. (2022), Algorithm 2: the probability-flow ODE dx/dt = (x − D(x; t))/t in the
    VE state x = x₀ + t z (EDM's σ(t) = t, s(t) = 1), solved with Heun's method, with "churn": before
    each step, noise raises the level from t_i to t̂_i = (1 + γ_i) t_i.

        γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ t_i ≤ S_tmax, else 0          (line 3)
        ε_i ~ N(0, S_noise² I)                                                 (line 4)
        t̂_i = t_i + γ_i t_i,  x̂_i = x_i + √(t̂_i² − t_i²) ε_i                    (lines 5–6)
        d_i = (x̂_i − D(x̂_i; t̂_i))/t̂_i,  x_{i+1} = x̂_i + (t_{i+1} − t̂_i) d_i     (lines 7–8: Euler)
        if t_{i+1} ≠ 0:  d′_i = (x_{i+1} − D(x_{i+1}; t_{i+1}))/t_{i+1},
                         x_{i+1} = x̂_i + (t_{i+1} − t̂_i)(½ d_i + ½ d′_i)        (lines 9–11: Heun)

    D(x; t) = x − t ε̂ is the denoiser (Tweedie's x̂₀), so d = ε̂. With S_churn = 0 this is the
    deterministic Algorithm 1. The grid t_0 > … > t_{N−1} runs from ``sigma_max`` to ``sigma_min``
    on ``time_grid`` (``karras``, EDM's ρ = 7, by default; docs/schedules.md#time-grids), then
    t_N = 0. Churn adds noise and the step removes more than it added, so errors the network (or
    an earlier step) made are partly forgotten (Karras et al. 2022, §4); S_noise slightly above 1
    offsets a network's tendency to remove too much noise, and S_tmin/S_tmax keep churn to the
    levels where it helps.

    **On the diffusers contract.** Every network evaluation is one ``timesteps`` entry:
    t̂_0, t_1, t̂_1, t_2, …, t̂_{N−1}: 2N − 1 entries (the last step, to t_N = 0, is Euler only), at
    the fractional labels whose σ_t is that level. The churn of step i + 1 needs fresh noise before
    the network sees x̂_{i+1}, so ``step`` adds it at the end of step i (its second stage) and
    returns x̂_{i+1}; the churn of step 0 is folded into the initial noise:
    ``init_noise_sigma`` = √(t_0² + S_noise² (t̂_0² − t_0²)), the law of x̂_0 (x_0 ~ N(0, t_0² I)).
    Draws are made only where √(t̂_i² − t_i²) > 0. ``order`` is 2 (entries per step); a loop
    started on a second stage takes it as a no-op (its state is already at t_{i+1}) but still adds
    the next step's churn.

    The network sees the VP state x/√(1+t²) at the label of t (``scale_model_input``), and any
    ε-, x̂₀- or v-prediction DDPM network (or a VE network seen as one) drives it
    (docs/parametrization.md#vp-and-ve-are-one-family). t̂_i is capped at the schedule's largest σ,
    so the network is never asked about a level it was not trained on.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        s_churn: S_churn, total churn over the N steps (0 = deterministic Heun, Algorithm 1).
        s_tmin, s_tmax: churn only at levels t_i in [S_tmin, S_tmax].
        s_noise: S_noise, the standard deviation of the churn noise ε_i.
        sigma_max: t_0; None = the schedule's largest σ, capped at ``sigma_max_cap`` (EDM: 80).
        sigma_min: t_{N−1}; None = the schedule's smallest σ (EDM: 0.002).
        sigma_max_cap: the cap applied when ``sigma_max`` is None.
        time_grid: ``"karras"`` (default), ``"log_snr"`` or ``"uniform"`` (equal steps in the label).
        clip_sample: clip D(x; t) to [−1, 1] (images) and use the d consistent with it.
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
        s_churn: float = 30.0,
        s_tmin: float = 0.01,
        s_tmax: float = 1.0,
        s_noise: float = 1.007,
        sigma_max: Optional[float] = None,
        sigma_min: Optional[float] = None,
        sigma_max_cap: float = 80.0,
        time_grid: str = "karras",
        clip_sample: bool = False,
    ):
        self._init_schedule()
        self._init_levels()
        check_time_grid(time_grid)
        for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
        if not (s_noise > 0 and math.isfinite(s_noise)):
            raise ValueError(f"s_noise must be positive, got {s_noise}")
        self.t_steps = torch.zeros(0, dtype=torch.float64)  # t_0 > … > t_{N−1} > t_N = 0
        self.t_hat = torch.zeros(0, dtype=torch.float64)  # t̂_i = (1 + γ_i) t_i
        self.gammas = torch.zeros(0, dtype=torch.float64)  # γ_i
        self.init_noise_sigma = float(self._sigma_range()[0])
        self._stage, self._step_of = [], []
        self._start = None  # (entry, x̂_i, d_i) of the current step's first stage

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """N = ``num_inference_steps`` Heun steps: 2N − 1 entries t̂_0, t_1, t̂_1, …, t̂_{N−1}."""
        self._check_num_inference_steps(num_inference_steps)
        N = num_inference_steps
        levels = self._sigma_levels(N)
        t_steps = torch.cat([levels, levels.new_zeros(1)])  # t_0 > … > t_{N−1} > t_N = 0
        c = self.config
        churn = min(c.s_churn / N, math.sqrt(2.0) - 1.0)
        in_range = (levels >= c.s_tmin) & (levels <= c.s_tmax)
        gammas = torch.where(in_range, torch.full_like(levels, churn), torch.zeros_like(levels))  # γ_i (line 3)
        t_hat = torch.minimum(levels * (1.0 + gammas), torch.tensor(self.schedule.sigma_max, dtype=torch.float64))
        self.num_inference_steps = N
        self.t_steps, self.t_hat, self.gammas = t_steps, t_hat, t_hat / levels - 1.0
        entries, self._stage, self._step_of = [], [], []
        for i in range(N):
            entries.append(float(t_hat[i]))  # network at (x̂_i, t̂_i)
            self._stage.append(FIRST_STAGE)
            self._step_of.append(i)
            if i < N - 1:
                entries.append(float(t_steps[i + 1]))  # network at (x_{i+1}, t_{i+1})
                self._stage.append(SECOND_STAGE)
                self._step_of.append(i)
        self._set_levels(torch.tensor(entries, dtype=torch.float64), device)
        t_0, t_hat_0 = float(t_steps[0]), float(t_hat[0])
        self.init_noise_sigma = math.sqrt(t_0**2 + c.s_noise**2 * (t_hat_0**2 - t_0**2))  # law of x̂_0
        self._start = None

    def _churn(self, x: torch.Tensor, i: int, generator) -> torch.Tensor:
        """x̂_i = x_i + √(t̂_i² − t_i²) ε_i, ε_i ~ N(0, S_noise² I) (Algorithm 2, lines 4–6)."""
        t_i, t_hat_i = float(self.t_steps[i]), float(self.t_hat[i])
        spread = math.sqrt(max(t_hat_i**2 - t_i**2, 0.0))
        if spread == 0.0:
            return x
        epsilon_i = self.config.s_noise * self._randn(x, generator)
        return x + spread * epsilon_i

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One stage of a Heun step (the Euler stage, or the correction plus the next step's churn).

        Args:
            model_output: the network's output at ``scale_model_input(sample, timestep)``.
            timestep: the current entry of ``timesteps``.
            sample: the VE state: x̂_i at a first stage, x_{i+1} at a second.
            generator: source of the churn noise ε_i.
            return_dict: return a :class:`LabSchedulerOutput` rather than a tuple.

        Returns:
            ``(prev_sample, pred_original_sample)``: the next state (x_{i+1} after a first stage,
            x̂_{i+1} after a second, x_N at the end) and the denoiser's D(sample; t).

        Raises:
            ValueError: on the first call, for a timestep that is not an entry of ``timesteps``.
        """
        # x (sample): VE state | t: noise level of the entry | D: denoiser x̂₀ | d: dx/dt = (x − D)/t
        e = self._current_index(timestep)
        if e is None:
            return self._repeat(sample, return_dict)
        t = float(self.sigmas[e])
        i = self._step_of[e]
        _, denoised = self._denoise(model_output, sample, t)  # D(x; t) = x − t ε̂ (clipped if clip_sample)
        d = (sample - denoised) / t  # lines 7 and 10: d = (x − D(x; t))/t
        t_next, t_hat = float(self.t_steps[i + 1]), float(self.t_hat[i])
        if self._stage[e] == FIRST_STAGE:
            prev_sample = sample + (t_next - t_hat) * d  # line 8: x_{i+1} = x̂_i + (t_{i+1} − t̂_i) d_i
            self._start = (e, sample, d) if t_next != 0 else None
        else:
            if self._start is not None and self._start[0] == e - 1:
                _, x_hat, d_i = self._start
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_i + 0.5 * d)  # line 11: Heun's correction
            else:  # a second stage whose first this loop did not take: the state is already x_{i+1}
                x_next = sample
            self._start = None
            prev_sample = self._churn(x_next, i + 1, generator)  # x̂_{i+1} for the next step (lines 4–6)
        return self._finish(e, prev_sample, denoised, return_dict)
