"""The trajectory of one image through a sampling run: x_t, x̂₀ and ε̂ at every sampler step.

Captured once, during the run, from the pipeline's ``callback(i, n, x_t, x0_hat)`` — which is
enough: the state a step starts from is the previous step's output (the first one is the
pipeline's seeded initial draw ``randn(shape, generator) · init_noise_sigma``); the network
input is ``scheduler.scale_model_input(state, t)`` (a VP state x_t = a_t x₀ + s_t ε); and the ε
consistent with x̂₀ is ε̂ = (x_t − a_t x̂₀)/s_t. Stored as float16 for one image (at most
:data:`MAX_ENTRIES` steps, evenly spaced, so a 20,000-step run stays small) in a bounded
per-server store; moving the explorer's slider reads the store and recomputes nothing.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

from schedulers.parametrization import vp_scales, x0_to_epsilon

from .errors import UserError

MAX_ENTRIES = 400  # stored steps per run
MAX_RUNS = 16  # runs kept by the server (a few MB each at most)


@dataclass
class Trajectory:
    """One image's path through a run.

    Attributes:
        step: the sampler step (0-based network evaluation) of each stored entry.
        t: its timestep label; sigma: σ_t = √((1−ᾱ_t)/ᾱ_t) at that label.
        x_t, x0_hat, eps_hat: ``[k, C, H, W]`` float16: the network's input (a VP state), the
            denoised estimate, and the ε consistent with both.
        all_t: every step's label (for the schedule plot).
        checkpoint, latent: the app's checkpoint choice, and whether its states are latents (then an
            entry's x̂₀ is decoded when it is first viewed, :meth:`decoded_x0`, never for the whole run).
    """

    sampler: str
    title: str
    nfe: int
    image_index: int
    sampler_config: dict
    step: list = field(default_factory=list)
    t: list = field(default_factory=list)
    sigma: list = field(default_factory=list)
    x_t: list = field(default_factory=list)
    x0_hat: list = field(default_factory=list)
    eps_hat: list = field(default_factory=list)
    all_t: list = field(default_factory=list)
    checkpoint: str = ""
    latent: bool = False
    x0_image: dict = field(default_factory=dict)  # entry → decoded x̂₀, for the entries viewed so far
    run_id: str = ""
    note: str = ""

    def decoded_x0(self, k: int, to_images) -> torch.Tensor:
        """Entry ``k``'s x̂₀ as an image: decoded with ``to_images`` (the checkpoint's decoder) on first use."""
        if k not in self.x0_image:
            self.x0_image[k] = to_images(self.x0_hat[k].float()).half()
        return self.x0_image[k]

    def __len__(self) -> int:
        return len(self.step)

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (*self.x_t, *self.x0_hat, *self.eps_hat, *self.x0_image.values()))


def known_timesteps(scheduler) -> Optional[list]:
    """The labels a prepared scheduler will visit, or None for one that chooses them during the run
    (an adaptive solver's ``timesteps`` is a budget, not a list)."""
    ts = scheduler.timesteps
    if isinstance(ts, (torch.Tensor, list, tuple)):
        return [float(t) for t in ts]
    return None


class TrajectoryRecorder:
    """A pipeline callback that records image ``image_index`` at (at most :data:`MAX_ENTRIES`) steps.

    Args:
        scheduler: a scheduler prepared exactly as the pipeline's (``pipe.prepare``): its timesteps
            and ``scale_model_input`` (a function of t alone for every registered sampler) are read.
        schedule: the checkpoint's ``DiscreteVPSchedule`` (ᾱ and σ at a label).
        x_init: the run's initial state, ``[B, C, H, W]``.
    """

    def __init__(self, scheduler, schedule, x_init: torch.Tensor, image_index: int, trajectory: Trajectory,
                 max_entries: int = MAX_ENTRIES):
        self.scheduler = scheduler
        self.schedule = schedule
        self.k = image_index
        self.timesteps = known_timesteps(scheduler)
        n = len(self.timesteps or ())
        self.stride = max(1, math.ceil(n / max_entries))
        self.state = x_init[image_index:image_index + 1].detach().clone()
        self.out = trajectory
        self.out.all_t = list(self.timesteps or ())
        if self.timesteps is None:
            self.out.note = ("this sampler chooses its steps during the run, and the pipeline's callback does not say "
                             "which t it evaluated, so no trajectory is stored")

    def __call__(self, i: int, n: int, x_prev: torch.Tensor, x0_hat: torch.Tensor) -> None:
        state, self.state = self.state, x_prev[self.k:self.k + 1].detach().clone()
        if self.timesteps is None or i >= len(self.timesteps) or (i % self.stride and i != n - 1):
            return
        t = self.timesteps[i]
        x_t = self.scheduler.scale_model_input(state, torch.tensor(t)).double()
        a, s = (float(v) for v in vp_scales(self.schedule.alpha_bar_at(t)))
        x0 = x0_hat[self.k:self.k + 1].detach().double().cpu()
        eps = x0_to_epsilon(x0, x_t.cpu(), a, s)
        self.out.step.append(i)
        self.out.t.append(t)
        self.out.sigma.append(s / a)
        self.out.x_t.append(x_t.cpu().half())
        self.out.x0_hat.append(x0.half())
        self.out.eps_hat.append(eps.half())


class TrajectoryStore:
    """The last :data:`MAX_RUNS` trajectories, by run id (thread-safe)."""

    def __init__(self, max_items: int = MAX_RUNS):
        self.max_items = max_items
        self._items: OrderedDict[str, Trajectory] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, trajectory: Trajectory) -> str:
        trajectory.run_id = trajectory.run_id or uuid.uuid4().hex
        with self._lock:
            self._items[trajectory.run_id] = trajectory
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return trajectory.run_id

    def get(self, run_id: Optional[str]) -> Trajectory:
        with self._lock:
            if run_id and run_id in self._items:
                return self._items[run_id]
        raise UserError("No stored trajectory: generate images first (the server keeps the last "
                        f"{self.max_items} runs).")

    def __len__(self) -> int:
        return len(self._items)

    def nbytes(self) -> int:
        with self._lock:
            return sum(t.nbytes() for t in self._items.values())


TRAJECTORIES = TrajectoryStore()
