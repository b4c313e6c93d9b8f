"""What the custom schedulers share: the DDPM schedule they are configured from, the step
counter for timesteps that repeat, and the output type of ``step``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .parametrization import clip_denoised, epsilon_to_x0, to_epsilon
from .schedules import VPSDE, DiscreteVPSchedule

MAX_INFERENCE_STEPS = 100_000


@dataclass
class LabSchedulerOutput(BaseOutput):
    """Output of ``step``.

    Args:
        prev_sample: the next state of the loop, fed back into ``step``.
        pred_original_sample: the current denoised estimate x̂₀ (Tweedie), for previews.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class DDPMScheduleMixin:
    """Holds the discrete VP schedule named by the config's DDPM keys and a running step index.

    Subclasses' timesteps are (possibly fractional, possibly repeated) labels of that schedule, so
    a DDPM network is called exactly as its training schedule defines; ``step`` therefore cannot
    find its place from the timestep alone and counts calls instead (like diffusers' Euler).
    """

    def _init_schedule(self):
        self.schedule = DiscreteVPSchedule.from_config(self.config)
        self.betas = self.schedule.betas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.num_inference_steps = None
        self.timesteps = torch.zeros(0)
        self._step_index = None

    @staticmethod
    def _check_num_inference_steps(num_inference_steps, minimum: int = 1, what: str = "num_inference_steps"):
        if not isinstance(num_inference_steps, (int,)) or isinstance(num_inference_steps, bool):
            raise TypeError(f"{what} must be an integer, got {num_inference_steps!r}")
        if num_inference_steps < minimum:
            raise ValueError(f"{what} must be at least {minimum}, got {num_inference_steps}")
        if num_inference_steps > MAX_INFERENCE_STEPS:
            raise ValueError(f"{what}={num_inference_steps} is more than {MAX_INFERENCE_STEPS}")

    @property
    def step_index(self) -> Optional[int]:
        """Index into ``timesteps`` of the next ``step`` call (None before the first call)."""
        return self._step_index

    def _current_index(self, timestep) -> int:
        if len(self.timesteps) == 0:
            raise RuntimeError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before sampling")
        if self._step_index is None:  # first call: start at the first occurrence of `timestep`
            t = torch.as_tensor(timestep, dtype=self.timesteps.dtype).reshape(-1)[0].to(self.timesteps.device)
            hits = (self.timesteps - t).abs() <= 1e-4 * (1 + t.abs())
            self._step_index = int(hits.nonzero()[0, 0]) if hits.any() else 0
        if self._step_index >= len(self.timesteps):
            raise IndexError(f"{type(self).__name__}.step called {self._step_index + 1} times, but only "
                             f"{len(self.timesteps)} timesteps were set; call set_timesteps again")
        return self._step_index

    @staticmethod
    def _randn(sample: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

    def _finish(self, i: int, prev_sample, pred_original_sample, return_dict: bool):
        """Advance the step counter and package ``step``'s result."""
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return LabSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self):
        return self.config.num_train_timesteps


class VPSDEGridMixin(DDPMScheduleMixin):
    """The time grid of the VP-SDE samplers: t_0 = 1 > t_1 > … > t_N = t_ε, Δt = −(1 − t_ε)/N, with
    m(t), √(1 − m²) and β(t) of every ``timesteps`` entry computed once in ``set_timesteps``."""

    def _init_sde(self):
        self._init_schedule()
        self.sde = VPSDE.from_config(self.config)
        self.init_noise_sigma = 1.0  # prior N(0, I)
        self.times = torch.zeros(0)

    def _time_grid(self, num_inference_steps: int) -> torch.Tensor:
        """Validate N and t_ε, set Δt and return the N + 1 grid times."""
        self._check_num_inference_steps(num_inference_steps)
        t_eps = self.config.sampling_eps
        if not 0 < t_eps < 1:
            raise ValueError(f"sampling_eps (t_ε) must be in (0, 1), got {t_eps}")
        self.num_inference_steps = num_inference_steps
        self.dt = -(1.0 - t_eps) / num_inference_steps  # Δt
        return torch.linspace(1.0, t_eps, num_inference_steps + 1, dtype=torch.float64)  # t_0 = 1 … t_N = t_ε

    def _set_entries(self, times: torch.Tensor, device) -> None:
        """One ``timesteps`` entry per network evaluation, at the DDPM label t·(T−1)."""
        self.times = times
        self.timesteps = self.sde.label(times).float().to(device)
        self._m = self.sde.mean_coeff(times).tolist()
        self._std = self.sde.std(times).tolist()
        self._beta = self.sde.beta(times).tolist()
        self._step_index = None

    def _epsilon_x0(self, model_output, sample, i: int):
        """(ε̂, x̂₀) at entry i of the VP state ``sample``."""
        m_t, std_t = self._m[i], self._std[i]
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, sample, m_t, std_t)
        if getattr(self.config, "clip_sample", False):
            return clip_denoised(epsilon_hat, sample, m_t, std_t)
        return epsilon_hat, epsilon_to_x0(epsilon_hat, sample, m_t, std_t)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The VP state is what a DDPM network takes: returned unchanged."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward marginal x_t = m(t) x₀ + √(1 − m²) z at the continuous time t = label/(T−1)."""
        return self.sde.add_noise(original_samples, noise, timesteps)
