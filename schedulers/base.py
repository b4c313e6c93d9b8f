"""What the custom schedulers share: the DDPM schedule they are configured from, the step
counter for timesteps that repeat, the list of compatible schedulers, and the output type of
``step``."""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .parametrization import (
    clip_denoised,
    epsilon_to_x0,
    expand_like,
    forward_marginal,
    sigma_to_vp_scales,
    to_epsilon,
    ve_to_vp,
)
from .schedules import VPSDE, DiscreteVPSchedule, check_time_grid

MAX_INFERENCE_STEPS = 100_000

# This project's schedulers, by class name → the module of this package that defines it.
LAB_SCHEDULERS = {
    "AnnealedLangevinScheduler": "scheduling_annealed_langevin",
    "VPSDEScheduler": "scheduling_vp_sde",
    "ProbabilityFlowScheduler": "scheduling_probability_flow",
    "ClippedDPMSolverMultistepScheduler": "scheduling_dpmsolver_clipped",
    "EDMStochasticScheduler": "scheduling_edm",
    "IPNDMScheduler": "scheduling_ipndm",
    "AdaptiveSDEScheduler": "scheduling_adaptive_sde",
    "SDEMultistepScheduler": "scheduling_sde_multistep",
}
# diffusers' schedulers configured by the DDPM keys (what DDPMScheduler._compatibles lists), and ours.
DDPM_FAMILY = [e.name for e in KarrasDiffusionSchedulers] + list(LAB_SCHEDULERS)


def check_num_inference_steps(num_inference_steps, minimum: int = 1, what: str = "num_inference_steps"):
    """TypeError unless an integer, ValueError unless in [minimum, MAX_INFERENCE_STEPS]."""
    if not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool):
        raise TypeError(f"{what} must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {num_inference_steps}")
    if num_inference_steps > MAX_INFERENCE_STEPS:
        raise ValueError(f"{what}={num_inference_steps} is more than {MAX_INFERENCE_STEPS}")


class LabCompatiblesMixin:
    """``SchedulerMixin.compatibles`` that also finds this project's classes.

    diffusers resolves the names in ``_compatibles`` on the ``diffusers`` module only, so a custom
    class would not even list itself; this looks the names of :data:`LAB_SCHEDULERS` up here.
    Put it before ``SchedulerMixin`` in the bases. ``from_config`` uses the same list to recognise
    the config keys of a compatible class (kept in the config, not passed to ``__init__``).
    """

    _compatibles: ClassVar[list] = list(DDPM_FAMILY)

    @classmethod
    def _get_compatibles(cls) -> list:
        diffusers_library = importlib.import_module("diffusers")
        classes = []
        for name in dict.fromkeys([cls.__name__] + list(cls._compatibles)):  # ordered, no duplicates
            if name in LAB_SCHEDULERS:
                module = importlib.import_module(f"{__package__}.{LAB_SCHEDULERS[name]}")
                classes.append(getattr(module, name))
            elif hasattr(diffusers_library, name):
                classes.append(getattr(diffusers_library, name))
        return classes


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

    Where a loop starts (the first ``step`` after ``set_timesteps``):

    - after ``set_begin_index(k)`` (what diffusers' img2img pipelines call): at entry k, whose
      label the timestep must be;
    - otherwise at the entry the timestep labels; an unknown timestep is a ``ValueError``. Equal
      labels come in runs of adjacent entries (the K steps of a Langevin level and its final
      denoising step; the correctors and the predictor at one time t_i; the Heun stage that ends
      at t_j and the one that starts there), and the first call cannot tell where in its run the
      loop starts. It takes the run's first entry that begins an inference step (index a multiple
      of ``order``: where a pipeline starts, ``timesteps[t_start * order:]``), else the run's first
      entry. The next calls tell where the loop really started: a call that repeats the label of
      an entry already taken (the loop started earlier in the run) is a no-op that returns
      ``sample`` unchanged, and a call whose label is that of the entry after the run (the loop
      started later in it) skips the rest of the run.

    So a loop started by value at a step start, or anywhere in a Heun schedule, runs exactly as
    from ``set_begin_index``; one started inside a run of repeated labels runs the run's first
    entries: the rest of a Langevin level's steps, or a predictor–corrector group's correctors
    with its predictor skipped; a Langevin loop started past the first entry of its last level
    ends without the final denoising step. ``set_begin_index`` makes every start exact.
    """

    order = 1  # timesteps entries per inference step (diffusers' pipelines start at t_start · order)

    def _init_schedule(self):
        self.schedule = DiscreteVPSchedule.from_config(self.config)
        self.betas = self.schedule.betas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.num_inference_steps = None
        self.timesteps = torch.zeros(0)
        self._reset_loop()

    def _reset_loop(self):
        """Forget where the last loop was (``set_timesteps`` calls this)."""
        self._step_index = None
        self._begin_index = None
        self._run = None  # (label, last entry of the run, repeats still allowed) while the start is ambiguous
        self._last_pred_original_sample = None

    _check_num_inference_steps = staticmethod(check_num_inference_steps)

    @property
    def step_index(self) -> Optional[int]:
        """Index into ``timesteps`` of the next ``step`` call (None before the first call)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The entry the next loop starts at, when set with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the next loop at entry ``begin_index`` of ``timesteps`` (call after ``set_timesteps``)."""
        n = len(self.timesteps)
        if not isinstance(begin_index, numbers.Integral) or isinstance(begin_index, bool) or not 0 <= begin_index < max(n, 1):
            raise ValueError(f"begin_index must be an entry of timesteps (0 to {n - 1}), got {begin_index!r}")
        self._begin_index = int(begin_index)
        self._step_index = None
        self._run = None

    # ---- where the loop is ----

    def _is_label(self, t: float, i: int) -> bool:
        """Whether entry i of ``timesteps`` is the label t (up to float32 rounding)."""
        return 0 <= i < len(self._labels) and abs(self._labels[i] - t) <= 1e-6 * (1.0 + abs(t))

    def _valid_range(self) -> str:
        return (f"{type(self).__name__}.timesteps holds {len(self.timesteps)} labels from "
                f"{max(self._labels):.6g} down to {min(self._labels):.6g}")

    def _start_loop(self, t: float) -> None:
        self._labels = self.timesteps.detach().double().cpu().tolist()
        self._run = None
        if self._begin_index is not None:
            k = self._begin_index
            if not self._is_label(t, k):
                raise ValueError(f"timestep {t:.6g} is not entry {k} ({self._labels[k]:.6g}) of timesteps, where "
                                 f"set_begin_index({k}) starts the loop")
            self._step_index = k
            return
        first = next((i for i in range(len(self._labels)) if self._is_label(t, i)), None)
        if first is None:
            raise ValueError(f"timestep {t:.6g} is not one of the scheduler's timesteps: {self._valid_range()}; "
                             f"pass an entry of scheduler.timesteps (set_timesteps sets them)")
        last = first
        while self._is_label(t, last + 1):
            last += 1
        order = max(int(getattr(self, "order", 1)), 1)
        start = next((i for i in range(first, last + 1) if i % order == 0), first)
        self._step_index = start
        if last > first:
            self._run = (t, last, start - first)

    def _current_index(self, timestep) -> Optional[int]:
        """Index into ``timesteps`` of this ``step`` call, or None for a no-op call (see the class doc)."""
        if len(self.timesteps) == 0:
            raise RuntimeError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before sampling")
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() == 0:
            raise ValueError("timestep is empty")
        t = float(t[0])
        if self._step_index is None:
            self._start_loop(t)
        elif self._run is not None:
            _, last, repeats = self._run
            i = self._step_index
            if i <= last:
                if not self._is_label(t, i):
                    if self._is_label(t, last + 1):
                        self._step_index = last + 1  # the loop started later in the run: skip its rest
                    self._run = None
            elif repeats > 0 and self._is_label(t, last):
                return None  # the loop started earlier in the run: this call repeats a label already taken
            else:
                self._run = None
        if self._step_index >= len(self.timesteps):
            raise IndexError(f"{type(self).__name__}.step called {self._step_index + 1} times, but only "
                             f"{len(self.timesteps)} timesteps were set; call set_timesteps again")
        return self._step_index

    def _repeat(self, sample: torch.Tensor, return_dict: bool):
        """The no-op ``step`` for a call that repeats a label the loop has already passed."""
        label, last, repeats = self._run
        self._run = (label, last, repeats - 1)
        pred_original_sample = self._last_pred_original_sample
        if not return_dict:
            return sample, pred_original_sample
        return LabSchedulerOutput(prev_sample=sample, pred_original_sample=pred_original_sample)

    @staticmethod
    def _randn(sample: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

    def _finish(self, i: int, prev_sample, pred_original_sample, return_dict: bool):
        """Advance the step counter and package ``step``'s result."""
        self._step_index = i + 1
        self._last_pred_original_sample = pred_original_sample
        if not return_dict:
            return prev_sample, pred_original_sample
        return LabSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self):
        return self.config.num_train_timesteps


class VPSDEGridMixin(DDPMScheduleMixin):
    """The time grid of the VP-SDE samplers: t_0 = 1 > t_1 > … > t_N = t_ε on the config's
    ``time_grid`` (``uniform``: Δt = −(1 − t_ε)/N; ``log_snr``, ``karras``: docs/schedules.md#time-grids),
    steps Δt_i = t_{i+1} − t_i < 0 (``dts``), with m(t), √(1 − m²) and β(t) of every ``timesteps``
    entry computed once in ``set_timesteps``."""

    def _init_sde(self):
        self._init_schedule()
        check_time_grid(getattr(self.config, "time_grid", "uniform"))
        self.sde = VPSDE.from_config(self.config)
        self.init_noise_sigma = 1.0  # prior N(0, I)
        self.times = torch.zeros(0)
        self.grid = torch.zeros(0, dtype=torch.float64)
        self.dts = torch.zeros(0, dtype=torch.float64)

    def _time_grid(self, num_inference_steps: int) -> torch.Tensor:
        """Validate N and t_ε, set the steps Δt_i (``dts``) and return the N + 1 grid times."""
        self._check_num_inference_steps(num_inference_steps)
        t_eps = self.config.sampling_eps
        if not 0 < t_eps < 1:
            raise ValueError(f"sampling_eps (t_ε) must be in (0, 1), got {t_eps}")
        self.num_inference_steps = num_inference_steps
        grid = self.sde.time_grid(getattr(self.config, "time_grid", "uniform"), num_inference_steps, t_eps)
        self.grid = grid  # t_0 = 1 … t_N = t_ε
        self.dts = grid[1:] - grid[:-1]  # Δt_i = t_{i+1} − t_i < 0
        return grid

    def _set_entries(self, times: torch.Tensor, device) -> None:
        """One ``timesteps`` entry per network evaluation, at the DDPM label t·(T−1)."""
        self.times = times
        self.timesteps = self.sde.label(times).float().to(device)
        self._m = self.sde.mean_coeff(times).tolist()
        self._std = self.sde.std(times).tolist()
        self._beta = self.sde.beta(times).tolist()
        self._reset_loop()

    def _epsilon_x0(self, model_output, sample, i: int):
        """(ε̂, x̂₀) at entry i of the VP state ``sample``."""
        m_t, std_t = self._m[i], self._std[i]
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, sample, m_t, std_t)
        if getattr(self.config, "clip_sample", False):
            return clip_denoised(epsilon_hat, sample, m_t, std_t)
        return epsilon_hat, epsilon_to_x0(epsilon_hat, sample, m_t, std_t)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The VP state is what a DDPM network takes: returned unchanged (before ``set_timesteps`` too)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward marginal x_t = m(t) x₀ + √(1 − m²) z at the continuous time t = label/(T−1)."""
        return self.sde.add_noise(original_samples, noise, timesteps)


class VEStateMixin(DDPMScheduleMixin):
    """Samplers whose state is the VE sample x̃ = x₀ + σ z (annealed Langevin, EDM, iPNDM): one noise
    level σ per ``timesteps`` entry (``sigmas``), presented to a DDPM network at the fractional
    label whose σ_t is that σ, with input x̃/√(1+σ²) (docs/parametrization.md#vp-and-ve-are-one-family)."""

    def _init_levels(self):
        self.sigmas = torch.zeros(0, dtype=torch.float64)
        self._labels64 = torch.zeros(0, dtype=torch.float64)

    def _sigma_range(self) -> tuple[float, float]:
        """(σ_max, σ_min) of the run: the config's, else the network's range (σ_max capped at
        ``sigma_max_cap``); refused outside the network's noise range."""
        sigma_max = self.config.sigma_max or min(self.schedule.sigma_max, self.config.sigma_max_cap)
        sigma_min = self.config.sigma_min or self.schedule.sigma_min
        lo, hi = self.schedule.sigma_min, self.schedule.sigma_max
        if not (lo * (1 - 1e-6) <= sigma_min < sigma_max <= hi * (1 + 1e-6)):
            raise ValueError(f"need {lo:.4g} ≤ sigma_min < sigma_max ≤ {hi:.4g} (the network's noise range), "
                             f"got sigma_min={sigma_min:.4g}, sigma_max={sigma_max:.4g}")
        return sigma_max, sigma_min

    def _sigma_levels(self, n: int) -> torch.Tensor:
        """n noise levels σ_max = σ_0 > … > σ_{n−1} = σ_min on the config's ``time_grid`` (float64)."""
        sigma_max, sigma_min = self._sigma_range()
        if n == 1:
            return torch.tensor([sigma_max], dtype=torch.float64)
        return self.schedule.sigma_grid(self.config.time_grid, sigma_max, sigma_min, n)

    def _set_steps_to_zero(self, num_inference_steps: int, device) -> torch.Tensor:
        """One evaluation per step on N levels σ_0 > … > σ_{N−1} (``time_grid``), then σ_N = 0 (iPNDM, SDE
        multistep): sets ``sigma_steps`` (N + 1 values), ``timesteps`` and ``init_noise_sigma``; returns the levels."""
        self._check_num_inference_steps(num_inference_steps)
        levels = self._sigma_levels(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.sigma_steps = torch.cat([levels, levels.new_zeros(1)])
        self._set_levels(levels, device)
        self.init_noise_sigma = float(levels[0])
        return levels

    def _set_levels(self, sigmas: torch.Tensor, device) -> None:
        """``sigmas`` (float64, one per entry) and the labels a network sees them at become ``timesteps``."""
        self.sigmas = sigmas
        labels = self.schedule.sigma_to_t(sigmas).float()
        self._labels64 = labels.double()  # a CPU copy, for scale_model_input's look-ups
        self.timesteps = labels.to(device)
        self._reset_loop()

    def _sigma_of(self, timestep) -> torch.Tensor:
        """σ of the level labelled ``timestep`` (float64; one value per element of ``timestep``).

        An entry of ``timesteps`` gives its level's σ exactly; any other label (or any label
        before ``set_timesteps``) the σ the schedule gives it.
        """
        t = torch.as_tensor(timestep).detach().reshape(-1).double().cpu()
        sigma = self.schedule.t_to_sigma(t)
        if len(self._labels64):
            hits = (self._labels64[None, :] - t[:, None]).abs() <= 1e-6 * (1.0 + t.abs()[:, None])
            found = hits.any(dim=1)
            sigma[found] = self.sigmas[hits.float().argmax(dim=1)[found]]
        return sigma

    def _denoise(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float):
        """(ε̂, D(x̃; σ)) of the network's output at the VE state ``sample``: the denoiser x̂₀ = x̃ − σ ε̂, clipped
        to [−1, 1] with the ε̂ consistent with it when the config says ``clip_sample``."""
        a_t, s_t = sigma_to_vp_scales(sigma)  # the network saw the VP state x̃/√(1+σ²)
        epsilon_hat = to_epsilon(model_output, self.config.prediction_type, ve_to_vp(sample, sigma), a_t, s_t)
        if getattr(self.config, "clip_sample", False):
            return clip_denoised(epsilon_hat, sample, 1.0, sigma)  # VE: a = 1, s = σ
        return epsilon_hat, epsilon_to_x0(epsilon_hat, sample, 1.0, sigma)  # D(x̃; σ) = x̃ − σ ε̂

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """x̃/√(1+σ²): the VP state a DDPM network expects at the label of σ (docs/parametrization.md#vp-and-ve-are-one-family).

        σ is that of ``timestep``'s level (of the current entry when ``timestep`` is None); it also
        works before ``set_timesteps`` and for labels that are not entries, from the schedule's σ
        of the label. A tensor of per-sample timesteps scales each sample with its own σ.
        """
        if timestep is None:
            if not len(self.timesteps):
                raise ValueError("scale_model_input needs the timestep before set_timesteps")
            timestep = self.timesteps[min(self._step_index or 0, len(self.timesteps) - 1)]
        sigma = self._sigma_of(timestep)
        if sigma.numel() == 1:
            return ve_to_vp(sample, float(sigma))
        return ve_to_vp(sample, expand_like(sigma, sample))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """SMLD perturbation x̃ = x₀ + σ_t z at the σ of each (fractional) timestep label."""
        sigma = self.schedule.t_to_sigma(torch.as_tensor(timesteps).detach().cpu())
        return forward_marginal(original_samples, noise, 1.0, expand_like(sigma, original_samples))  # VE: a = 1, s = σ


class AdaptiveTimesteps:
    """The ``timesteps`` of a solver that chooses its steps as it goes: entries are decided by ``step``.

    The plain loop of diffusers' contract works unchanged::

        for t in scheduler.timesteps:             # each entry is decided by the step before it
            x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample

    - Iterating yields the label of the next network evaluation the solver asked for, as a 0-d
      float32 tensor like any ``timesteps`` entry, and stops when the solver is done. An entry is
      only decided by the ``step`` call that precedes it, so iterating without stepping (e.g.
      ``list(timesteps)`` before the loop) yields the entries decided so far and then stops.
    - ``len()`` is the budget: the most evaluations the solver will make (what ``num_inference_steps``
      sets; the registry's limits and the app's work budget read it). The run may end earlier; the
      evaluations made are ``scheduler.nfe``.
    - Indexing and ``tolist()`` see the entries decided so far.

    Args:
        scheduler: the solver; it exposes ``_next_label()`` (the label of the next evaluation, or
            None when done) and ``nfe`` (evaluations made so far, i.e. ``step`` calls).
        budget: the most evaluations, ``len(timesteps)``.
    """

    def __init__(self, scheduler, budget: int):
        self._scheduler = scheduler
        self._budget = int(budget)
        self.decided = []  # labels of the entries decided so far (float64)

    def __len__(self) -> int:
        return self._budget

    def __iter__(self):
        yielded = 0
        while yielded < self._budget:
            if self._scheduler.nfe < yielded:  # the last entry was never stepped: nothing new is decided
                return
            label = self._scheduler._next_label()
            if label is None:
                return
            if len(self.decided) <= yielded:
                self.decided.append(float(label))
            yield torch.tensor(self.decided[yielded], dtype=torch.float32)
            yielded += 1

    def __getitem__(self, index):
        return torch.tensor(self.decided, dtype=torch.float32)[index]

    def tolist(self) -> list:
        return list(self.decided)

    def __repr__(self) -> str:
        return f"AdaptiveTimesteps(at most {self._budget} entries, {len(self.decided)} decided)"
