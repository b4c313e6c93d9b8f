"""Adaptive-step reverse-SDE solver: Jolicoeur-Martineau et al. (2021), "Gotta Go Fast When
Generating Data with Score-Based Models", Algorithm 1 (docs/samplers.md#adaptive-reverse-sde)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import AdaptiveTimesteps, DDPMScheduleMixin, LabCompatiblesMixin, LabSchedulerOutput
from .parametrization import clip_denoised, epsilon_to_score, epsilon_to_x0, to_epsilon
from .schedules import VPSDE

EULER, IMPROVED_EULER, DENOISE, DONE = "euler", "improved_euler", "denoise", "done"


class AdaptiveSDEScheduler(LabCompatiblesMixin, SchedulerMixin, ConfigMixin, DDPMScheduleMixin):
    """The reverse VP-SDE with a step size chosen by an error estimate (Jolicoeur-Martineau et al.
    2021, Algorithm 1): the user sets a tolerance, not a step count, and the solver reports the
    evaluations it spent (``nfe``).

    Going backwards in time by h > 0 from t, the reverse SDE dx = [f − g² ∇log p_t] dt + g dw̄ of
    the VP-SDE (docs/schedules.md#the-vp-sde) has the drift F(x, t) = ½β(t) x + β(t) s_θ(x, t)
    and G(t) = √β(t). One attempt, with one draw z ~ N(0, I):

        x′  = x + h F(x, t) + √h G(t) z                          (Euler–Maruyama)
        x̃   = x + h F(x′, t − h) + √h G(t − h) z
        x″  = ½ (x′ + x̃)                                         (improved Euler, same z)
        δ   = max(ε_abs, ε_rel · max(|x′|, |x′_prev|))           (element-wise)
        E₂  = ‖(x′ − x″)/δ‖₂ / √n                                (n: elements of one sample)

    accepted when E₂ ≤ 1: x ← x″ (extrapolation: continue from the higher-order solution),
    t ← t − h, x′_prev ← x′; then, accepted or not, h ← min(t − t_ε, θ h E₂^{−r}) with safety
    θ = ``safety`` and exponent r = ``exponent``. A rejected attempt redraws z and reuses F(x, t),
    so it costs one evaluation; an accepted step costs two. The run ends at t_ε, with Tweedie's
    x̂₀ = (x − √(1 − m²) ε̂)/m if ``final_denoise`` (one more evaluation).

    **One step size for the batch.** The loop calls the network at one time per entry, so the
    whole batch shares t and h (the paper steps each sample on its own); E₂ is the largest of the
    samples' errors, so every sample meets the tolerance.

    **On the diffusers contract.** The times are not known in advance, so ``timesteps`` is an
    :class:`~schedulers.base.AdaptiveTimesteps`: each ``step`` decides the next entry, and the
    plain ``for t in scheduler.timesteps`` loop runs unchanged, ending when the solver reaches
    t_ε. ``num_inference_steps`` is a **budget**, the most evaluations allowed, and
    ``len(timesteps)`` equals it; where the remaining budget would not reach t_ε, the step size is
    raised to (t − t_ε)/(steps left) and that step is accepted whatever its error, so a run always
    ends at t_ε within the budget. The evaluations actually made are ``nfe``; accepted and
    rejected attempts are counted in ``accepted`` and ``rejected``. Entries are labels t·(T − 1)
    of the DDPM schedule, as for the other VP-SDE samplers; each ``step`` returns the state the
    next entry evaluates (x′ after a proposal, x after an acceptance).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM schedule.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        rtol: ε_rel, the relative tolerance (the paper uses 0.01–0.05).
        atol: ε_abs, the absolute tolerance (0.0078: one 8-bit level of an image in [−1, 1]).
        sampling_eps: t_ε, where integration stops.
        final_denoise: end with Tweedie's x̂₀ at t_ε (one more evaluation).
        h_init: the first step size attempted.
        safety: θ < 1 in the step-size update.
        exponent: r in the step-size update (the paper: 0.9; ½ is the textbook value for order ½).
        extrapolation: continue from x″ (True, the paper's choice) or from x′.
        clip_sample: clip x̂₀ to [−1, 1] in the score at every evaluation (images).
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
        rtol: float = 0.05,
        atol: float = 0.0078,
        sampling_eps: float = 1e-3,
        final_denoise: bool = True,
        h_init: float = 0.01,
        safety: float = 0.9,
        exponent: float = 0.9,
        extrapolation: bool = True,
        clip_sample: bool = False,
    ):
        for name, value in (("rtol", rtol), ("atol", atol), ("h_init", h_init), ("exponent", exponent)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < safety <= 1:
            raise ValueError(f"safety (θ) must be in (0, 1], got {safety}")
        if not 0 < sampling_eps < 1:
            raise ValueError(f"sampling_eps (t_ε) must be in (0, 1), got {sampling_eps}")
        self._init_schedule()
        self.sde = VPSDE.from_config(self.config)
        self.init_noise_sigma = 1.0  # prior N(0, I)
        self._stage = DONE
        self.nfe, self.accepted, self.rejected = 0, 0, 0
        self.history = []  # (t, h, E₂, accepted) of every attempt

    # ---- the loop ----

    def min_budget(self) -> int:
        """The smallest budget that reaches t_ε: one step (2 evaluations), plus the final denoising."""
        return 2 + int(bool(self.config.final_denoise))

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """Start a run with a budget of ``num_inference_steps`` evaluations (``len(timesteps)``)."""
        self._check_num_inference_steps(num_inference_steps, minimum=self.min_budget(),
                                        what="num_inference_steps (the NFE budget)")
        self.num_inference_steps = num_inference_steps
        self._budget = int(num_inference_steps)
        self._t, self._h = 1.0, float(self.config.h_init)  # t_0 = 1, first step size
        self._t_eval = 1.0  # time of the next evaluation
        self._stage = EULER
        self._x, self._drift, self._g, self._x_prime, self._z, self._x_prime_prev = (None,) * 6
        self._forced = False
        self.nfe, self.accepted, self.rejected = 0, 0, 0
        self.history = []
        self._device = device
        self._reset_loop()
        self.timesteps = AdaptiveTimesteps(self, num_inference_steps)

    def set_begin_index(self, begin_index: int = 0):
        """Only 0: the solver's times are not known in advance, so it cannot start inside a run."""
        if begin_index != 0:
            raise ValueError("an adaptive solver starts at t = 1; it cannot start at a later entry")
        super().set_begin_index(0)

    def _label(self, t: float) -> float:
        return float(self.sde.label(t))

    def _next_label(self) -> Optional[float]:
        """The label of the next evaluation, or None when the run is over (read by AdaptiveTimesteps)."""
        return None if self._stage == DONE else self._label(self._t_eval)

    # ---- the equations ----

    def _score_x0(self, model_output, sample, t: float):
        """(s_θ, x̂₀) of the VP state ``sample`` at time t."""
        m_t, std_t = float(self.sde.mean_coeff(t)), float(self.sde.std(t))
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, sample, m_t, std_t)
        if self.config.clip_sample:
            epsilon_hat, x0 = clip_denoised(epsilon_hat, sample, m_t, std_t)
        else:
            x0 = epsilon_to_x0(epsilon_hat, sample, m_t, std_t)
        return epsilon_to_score(epsilon_hat, std_t), x0  # s_θ = −ε̂/√(1 − m²)

    def _reverse_drift(self, score, sample, t: float):
        """(F, G) backwards in time: F = ½β(t) x + β(t) s_θ = −(f − g² s_θ), G = √β(t)."""
        beta_t = float(self.sde.beta(t))
        return 0.5 * beta_t * sample + beta_t * score, math.sqrt(beta_t)

    def _steps_left(self) -> int:
        """How many more steps the budget allows after this evaluation, if all are accepted."""
        remaining = self._budget - self.nfe - int(bool(self.config.final_denoise))  # evaluations left for steps
        return 1 + max(remaining - 1, 0) // 2  # this step's second evaluation, then 2 per step

    def _propose(self, generator) -> torch.Tensor:
        """Draw z and take the Euler–Maruyama attempt x′ from (x, t) with the current h."""
        span = self._t - self.config.sampling_eps
        h_min = span / self._steps_left()  # what reaching t_ε within the budget needs
        self._forced = self._h < h_min * (1 - 1e-12)
        h = min(max(self._h, h_min), span)
        self._h = h
        self._z = self._randn(self._x, generator)
        self._x_prime = self._x + h * self._drift + math.sqrt(h) * self._g * self._z  # x′ = x + hF + √h G z
        self._t_eval = self._t - h
        self._stage = IMPROVED_EULER
        return self._x_prime

    def _error(self, x_prime, x_second) -> float:
        """E₂ = max over samples of ‖(x′ − x″)/δ‖₂/√n, δ = max(ε_abs, ε_rel max(|x′|, |x′_prev|))."""
        c = self.config
        scale = torch.maximum(x_prime.abs(), self._x_prime_prev.abs())
        delta = torch.clamp(c.rtol * scale, min=c.atol)
        per_sample = ((x_prime - x_second) / delta).flatten(1).pow(2).mean(dim=1).sqrt()  # ‖·‖₂/√n
        return float(per_sample.max())

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """Use the network's output at the current entry and decide the next one.

        Args:
            model_output: the network's output at ``sample`` and ``timestep``.
            timestep: the current entry of ``timesteps``.
            sample: the VP state this entry evaluates (what the previous ``step`` returned).
            generator: source of the Brownian increments z.
            return_dict: return a :class:`LabSchedulerOutput` rather than a tuple.

        Returns:
            ``(prev_sample, pred_original_sample)``: the state the next entry evaluates (the final
            sample after the last entry) and Tweedie's x̂₀ at this entry.

        Raises:
            RuntimeError: before ``set_timesteps``; IndexError: after the run has ended.
            ValueError: for a timestep that is not the entry the solver asked for.
        """
        # x: VP state at t | h > 0: step backwards | F, G: reverse drift and diffusion | z: N(0, I) | E₂: error
        if not isinstance(self.timesteps, AdaptiveTimesteps):
            raise RuntimeError(f"call {type(self).__name__}.set_timesteps(budget) before sampling")
        if self._stage == DONE:
            raise IndexError(f"{type(self).__name__}: the run already reached t_ε after {self.nfe} evaluations; "
                             "call set_timesteps again")
        t_given = float(torch.as_tensor(timestep).reshape(-1)[0])
        expected = self._label(self._t_eval)
        if abs(t_given - expected) > 1e-4 * (1.0 + abs(expected)):
            raise ValueError(f"timestep {t_given:.6g} is not the entry the solver asked for ({expected:.6g}); "
                             "iterate over scheduler.timesteps")
        self.nfe += 1
        t_eval = self._t_eval
        score, x0 = self._score_x0(model_output, sample, t_eval)
        if self._stage == EULER:  # at (x, t): the drift of this step's attempts
            self._x = sample
            if self._x_prime_prev is None:
                self._x_prime_prev = sample  # x′_prev starts as x (Algorithm 1)
            self._drift, self._g = self._reverse_drift(score, sample, t_eval)
            prev_sample = self._propose(generator)
        elif self._stage == IMPROVED_EULER:  # at (x′, t − h): accept or reject the attempt
            h = self._h
            drift_prime, g_prime = self._reverse_drift(score, sample, t_eval)
            x_tilde = self._x + h * drift_prime + math.sqrt(h) * g_prime * self._z  # x̃ = x + hF(x′, t−h) + √h G(t−h) z
            x_second = 0.5 * (self._x_prime + x_tilde)  # x″ = ½(x′ + x̃)
            error = self._error(self._x_prime, x_second)
            accept = error <= 1.0 or self._forced
            self.history.append((self._t, h, error, accept))
            growth = self.config.safety * max(error, 1e-10) ** (-self.config.exponent)  # θ E₂^{−r}
            if accept:
                self.accepted += 1
                self._x = x_second if self.config.extrapolation else self._x_prime
                self._x_prime_prev = self._x_prime
                self._t = t_eval
                self._h = min(h * growth, max(self._t - self.config.sampling_eps, 0.0))
                if self._t <= self.config.sampling_eps * (1 + 1e-9):
                    self._t = self.config.sampling_eps
                    self._stage = DENOISE if self.config.final_denoise else DONE
                else:
                    self._stage = EULER
                self._t_eval = self._t
                prev_sample = self._x
            else:
                self.rejected += 1
                self._h = h * growth
                prev_sample = self._propose(generator)  # same x and F(x, t), fresh z
        else:  # DENOISE at t_ε: Tweedie's x̂₀
            self._stage = DONE
            prev_sample = x0
        if not return_dict:
            return prev_sample, x0
        return LabSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The VP state is what a DDPM network takes: returned unchanged."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward marginal x_t = m(t) x₀ + √(1 − m²) z at the continuous time t = label/(T−1)."""
        return self.sde.add_noise(original_samples, noise, timesteps)
