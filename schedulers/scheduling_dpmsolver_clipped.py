"""diffusers' DPM-Solver++ with x̂₀ thresholding that skips a quantile it does not need.

diffusers clips the data prediction only through dynamic thresholding (Saharia et al. 2022):
s = clamp(quantile(|x̂₀|, ratio), 1, sample_max_value), x̂₀ ← clamp(x̂₀, −s, s)/s, per image.
``torch.clamp`` with min > max returns max, so for ``sample_max_value = c ≤ 1`` the threshold is
the constant s = c whatever the quantile: the step is x̂₀ ← clamp(x̂₀, −c, c)/c (plain clipping
to [−1, 1] for c = 1, images in [−1, 1]), yet ``torch.quantile`` still runs on every step: about
1 ms at batch 16 on one CPU core, 3 % of a small UNet's forward pass. This subclass returns the
same values, bit for bit, without it; for ``sample_max_value > 1`` s depends on the quantile and
diffusers' code runs unchanged.

It also mends where diffusers' loop starts (docs/samplers.md#dpm-solver-2m). With Karras σ the
timesteps are the training labels nearest to each σ_i, so neighbouring σ_i can share a label;
diffusers' ``index_for_timestep`` starts a loop whose first timestep occurs more than once at the
*second* occurrence (meant for img2img starts inside the schedule). When that label is the very
first one, the solver runs one entry ahead of the loop: its second-to-last call already steps to
σ = 0 and the last call indexes ``sigmas`` past the end (an IndexError in diffusers 0.42). That happens on the linear schedule from about 1,040
steps (T = 1000), from about 1,270 on the bundled NCSN model's schedule, and at every step count
from 4 on the cosine schedule (``squaredcos_cap_v2``, where the first label is 998 twice). Here a
loop that starts at the first timestep starts at entry 0, as ``DDPMScheduleMixin`` does for this
project's schedulers; any other start keeps diffusers' rule.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DPMSolverMultistepScheduler

from .base import DDPM_FAMILY, LabCompatiblesMixin, check_num_inference_steps


class ClippedDPMSolverMultistepScheduler(LabCompatiblesMixin, DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` whose thresholding skips the quantile where s is a constant.

    Same config, same steps, same outputs as diffusers' class (tested); only faster when
    ``thresholding=True`` and ``sample_max_value <= 1``.
    """

    _compatibles: ClassVar[list] = list(DDPM_FAMILY)

    def set_timesteps(self, num_inference_steps=None, *args, **kwargs):
        """diffusers' ``set_timesteps``, but a step count below 1 is a ValueError (diffusers sets no timesteps)."""
        if num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps)
        return super().set_timesteps(num_inference_steps, *args, **kwargs)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """diffusers' index, except that the first timestep is entry 0 even when its label repeats.

        diffusers takes the second entry of a repeated label, so that an img2img loop that starts
        inside the schedule never skips a σ; for the first label that skips σ_0 instead and runs the
        solver one entry ahead of the loop, past σ = 0 (see the module docstring).
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if len(schedule_timesteps) and bool(torch.as_tensor(timestep).reshape(-1)[0].to(schedule_timesteps.device)
                                             == schedule_timesteps[0]):
            return 0
        return super().index_for_timestep(timestep, schedule_timesteps)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        c = float(self.config.sample_max_value)
        if c > 1 or not torch.isfinite(sample).all():  # s depends on the quantile (NaN/inf can make it NaN)
            return super()._threshold_sample(sample)
        # diffusers' computation with s = clamp(quantile, min=1, max=c) = c, in the same dtype and order
        dtype = sample.dtype
        batch_size = sample.shape[0]
        x = sample if dtype in (torch.float32, torch.float64) else sample.float()
        x = x.reshape(batch_size, -1)
        s = torch.full((batch_size, 1), c, dtype=x.dtype, device=x.device)
        x = torch.clamp(x, -s, s) / s
        return x.reshape(sample.shape).to(dtype)
