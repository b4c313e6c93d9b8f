"""What the custom schedulers share: the DDPM schedule they are configured from, the step
counter for timesteps that repeat, and the output type of ``step``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import DiscreteVPSchedule

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

    def __len__(self):
        return self.config.num_train_timesteps
