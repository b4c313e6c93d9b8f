"""Noise schedules, kept apart from the solvers that integrate them (docs/schedules.md#ddpm-the-discrete-vp-schedule, docs/parametrization.md#vp-and-ve-are-one-family, docs/schedules.md#smld-the-ve-family, docs/schedules.md#the-vp-sde).

Every sampler in this project speaks the language of a discrete-time DDPM schedule
(``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``): a network is always
called at a *timestep label* ``t`` in ``[0, T-1]`` (fractional labels are allowed) and the
schedule says what noise level that label stands for. This module holds that one
correspondence:

- ``DiscreteVPSchedule``: β_t, ᾱ_t and σ_t = √((1-ᾱ_t)/ᾱ_t) on the integer labels, and a
  monotone map between fractional labels and σ (piecewise linear in log σ, exactly invertible).
- ``VPSDE``: the continuous-time VP-SDE of Song et al. (2021) matched to the discrete schedule.
- ``geometric_sigmas``: the SMLD noise levels σ_1 > … > σ_L.
- the time grids (docs/schedules.md#time-grids): ``uniform_grid``, ``log_snr_grid`` and
  ``karras_grid``, one function each, and ``sigma_grid``/``VPSDE.time_grid`` that every custom
  sampler calls with its ``time_grid`` option.
- ``linear_betas_for_sigma_range``: the linear DDPM schedule whose σ_t runs from σ_min to σ_max,
  used to present a σ-conditioned (VE) network to every sampler as a VP network (docs/parametrization.md#vp-and-ve-are-one-family).

Everything is computed in float64; callers cast to their own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

from .parametrization import alpha_bar_to_sigma, sigma_to_alpha_bar

TensorLike = Union[torch.Tensor, float, int, np.ndarray]

SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """β_1..β_T of a DDPM schedule in float64, named as in diffusers' ``DDPMScheduler`` config.

    Args:
        num_train_timesteps: T, the number of forward-process steps.
        beta_start: β_1 (linear and scaled_linear schedules).
        beta_end: β_T (linear and scaled_linear schedules).
        beta_schedule: ``"linear"`` (Ho et al. 2020), ``"scaled_linear"`` (latent diffusion) or
            ``"squaredcos_cap_v2"`` (Nichol & Dhariwal 2021).
        trained_betas: explicit betas; overrides the other arguments when given.

    Returns:
        A float64 tensor of shape ``[T]``.
    """
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps).to(torch.float64)
    else:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is not supported; choose one of {SUPPORTED_BETA_SCHEDULES}"
        )
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1)")
    return betas


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing, clamped at the ends."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    w = (x - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


class DiscreteVPSchedule:
    """The discrete VP schedule of DDPM and the label ↔ σ map every sampler shares.

    Attributes (float64 tensors of shape ``[T]``, indexed by the label t = 0..T-1):
        betas: β_t.
        alphas: α_t = 1 - β_t.
        alphas_cumprod: ᾱ_t = ∏_{s≤t} α_s (docs/schedules.md#ddpm-the-discrete-vp-schedule).
        sigmas: σ_t = √((1-ᾱ_t)/ᾱ_t), the VE noise level of label t (docs/schedules.md#timestep-labels-and-the-ve-noise-level).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Sequence[float]] = None,
    ):
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.num_train_timesteps = len(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sigmas = alpha_bar_to_sigma(self.alphas_cumprod)
        self._log_sigmas = self.sigmas.log()
        self._labels = torch.arange(self.num_train_timesteps, dtype=torch.float64)

    @classmethod
    def from_config(cls, config) -> "DiscreteVPSchedule":
        """Build from any scheduler config that carries the DDPM schedule keys."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        return cls(
            num_train_timesteps=get("num_train_timesteps", 1000),
            beta_start=get("beta_start", 1e-4),
            beta_end=get("beta_end", 0.02),
            beta_schedule=get("beta_schedule", "linear"),
            trained_betas=get("trained_betas", None),
        )

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: TensorLike) -> torch.Tensor:
        """Fractional timestep label whose σ_t equals ``sigma`` (linear in log σ between labels)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        return _interp(log_sigma, self._log_sigmas, self._labels)

    def t_to_sigma(self, t: TensorLike) -> torch.Tensor:
        """σ at a fractional timestep label; the exact inverse of :meth:`sigma_to_t`."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return _interp(t, self._labels, self._log_sigmas).exp()

    def alpha_bar_at(self, t: TensorLike) -> torch.Tensor:
        """ᾱ at a fractional label, consistent with :meth:`t_to_sigma`: ᾱ = 1/(1+σ²) (docs/schedules.md#timestep-labels-and-the-ve-noise-level)."""
        return sigma_to_alpha_bar(self.t_to_sigma(t))

    def sigma_grid(self, grid: str, sigma_max: float, sigma_min: float, num_points: int) -> torch.Tensor:
        """``num_points`` levels from σ_max to σ_min on a time grid (docs/schedules.md#time-grids);
        ``uniform`` takes equal steps in the (fractional) DDPM label, the time a network sees."""
        return sigma_grid(grid, sigma_max, sigma_min, num_points, self.sigma_to_t, self.t_to_sigma)


# ---- time grids (docs/schedules.md#time-grids): one function per grid, used by every custom sampler ----

TIME_GRIDS = ("uniform", "log_snr", "karras")
KARRAS_RHO = 7.0  # ρ of Karras et al. (2022), Eq. 5


def _check_grid(start: float, end: float, num_points: int, what: str) -> None:
    if isinstance(num_points, bool) or int(num_points) != num_points or num_points < 2:
        raise ValueError(f"a time grid needs at least 2 points, got {num_points!r}")
    if not (math.isfinite(start) and math.isfinite(end) and start != end):
        raise ValueError(f"a {what} grid needs two distinct finite end points, got {start} and {end}")


def uniform_grid(start: float, end: float, num_points: int) -> torch.Tensor:
    """Equal steps in the diffusion time: ``num_points`` values from ``start`` to ``end``, both included.

    u_i = start + (i/(n−1)) (end − start), i = 0 … n−1 (Song et al. 2021: t from 1 to t_ε; the
    samplers that step in the DDPM label use it on labels). float64.
    """
    _check_grid(start, end, num_points, "uniform")
    return torch.linspace(start, end, int(num_points), dtype=torch.float64)


def log_snr_grid(sigma_max: float, sigma_min: float, num_points: int) -> torch.Tensor:
    """Equal steps in log-SNR: σ_i = σ_max (σ_min/σ_max)^{i/(n−1)}, a geometric sequence, float64.

    The log signal-to-noise ratio of level σ is λ = log(a²/s²) = −2 log σ, so equal steps in λ are
    a constant ratio σ_i/σ_{i+1}: SMLD's geometric noise levels (Song & Ermon 2019) and the time
    variable of DPM-Solver (Lu et al. 2022).
    """
    _check_grid(sigma_max, sigma_min, num_points, "log-SNR")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), int(num_points), dtype=torch.float64)


def karras_grid(sigma_max: float, sigma_min: float, num_points: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """EDM's ρ-spaced noise levels (Karras et al. 2022, Eq. 5), float64:

        σ_i = (σ_max^{1/ρ} + (i/(n−1)) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,   i = 0 … n−1.

    Steps are short near σ_min (ρ = 7 concentrates them there; ρ → ∞ tends to the log-SNR grid).
    """
    _check_grid(sigma_max, sigma_min, num_points, "Karras")
    if not (0 < sigma_min < sigma_max) or not rho > 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and ρ > 0, got sigma_min={sigma_min}, sigma_max={sigma_max}, ρ={rho}")
    ramp = torch.linspace(0.0, 1.0, int(num_points), dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def check_time_grid(grid: str) -> str:
    """``grid`` if it names a time grid, else ValueError listing them."""
    if grid not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {list(TIME_GRIDS)}, got {grid!r}")
    return grid


def sigma_grid(grid: str, sigma_max: float, sigma_min: float, num_points: int, time_of_sigma, sigma_of_time) -> torch.Tensor:
    """``num_points`` noise levels from σ_max down to σ_min on the named grid, end points exact.

    ``uniform`` needs the sampler's time variable: equal steps in u = ``time_of_sigma(σ)``, mapped
    back with ``sigma_of_time``; ``log_snr`` and ``karras`` are defined on σ alone.
    """
    check_time_grid(grid)
    if grid == "log_snr":
        sigmas = log_snr_grid(sigma_max, sigma_min, num_points)
    elif grid == "karras":
        sigmas = karras_grid(sigma_max, sigma_min, num_points)
    else:
        u = uniform_grid(float(time_of_sigma(sigma_max)), float(time_of_sigma(sigma_min)), num_points)
        sigmas = torch.as_tensor(sigma_of_time(u), dtype=torch.float64).clone()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # no round-off at the ends
    return sigmas


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """SMLD noise levels σ_1 > σ_2 > … > σ_L, a geometric sequence (docs/schedules.md#smld-the-ve-family), float64:
    the log-SNR grid (:func:`log_snr_grid`)."""
    if num_levels < 2:
        raise ValueError(f"annealed Langevin needs at least 2 noise levels, got {num_levels}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return log_snr_grid(sigma_max, sigma_min, num_levels)


def linear_betas_for_sigma_range(
    sigma_min: float, sigma_max: float, num_train_timesteps: int = 1000
) -> tuple[float, float]:
    """(beta_start, beta_end) of the linear DDPM schedule with σ_0 = sigma_min and σ_{T-1} = sigma_max.

    A σ-conditioned VE network is exposed to every sampler through this VP schedule: ᾱ_t =
    1/(1+σ_t²) maps each label to a noise level the network was trained on (docs/schedules.md#timestep-labels-and-the-ve-noise-level).
    The default DDPM schedule (1e-4 … 0.02) corresponds to σ from 0.01 to about 157.
    """
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    beta_start = 1.0 - sigma_to_alpha_bar(sigma_min)  # ᾱ_0 = 1 - β_0 = 1/(1+σ_min²)
    target = -math.log1p(sigma_max**2)  # log ᾱ_{T-1} = Σ log(1-β_t)

    def log_alpha_bar_end(beta_end: float) -> float:
        betas = np.linspace(beta_start, beta_end, num_train_timesteps)
        return float(np.log1p(-betas).sum())

    lo, hi = beta_start, 0.999
    if log_alpha_bar_end(hi) > target:
        raise ValueError(f"sigma_max={sigma_max} is too large for {num_train_timesteps} linear steps")
    for _ in range(200):  # bisection: log ᾱ_end decreases in beta_end
        mid = 0.5 * (lo + hi)
        if log_alpha_bar_end(mid) > target:
            lo = mid
        else:
            hi = mid
    return beta_start, 0.5 * (lo + hi)


@dataclass
class VPSDE:
    """The VP-SDE dx = -½ β(t) x dt + √β(t) dw on t ∈ [0, 1] (Song et al. 2021, docs/schedules.md#the-vp-sde).

    For a ``linear`` DDPM schedule β(t) = β_min + t (β_max - β_min) with β_min = T·beta_start and
    β_max = T·beta_end, and the marginal mean coefficient is analytic. For any other schedule
    β(t) and m(t) follow the discrete ᾱ through the label map t ↦ t·(T-1), so that the SDE has
    the same marginals as the network's training schedule.
    """

    schedule: DiscreteVPSchedule
    beta_min: Optional[float] = None
    beta_max: Optional[float] = None

    @classmethod
    def from_config(cls, config) -> "VPSDE":
        """VP-SDE matched to a DDPM scheduler config (docs/schedules.md#the-vp-sde: β_min = N·beta_start, β_max = N·beta_end)."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        schedule = DiscreteVPSchedule.from_config(config)
        if get("beta_schedule", "linear") == "linear" and get("trained_betas", None) is None:
            T = schedule.num_train_timesteps
            return cls(schedule, beta_min=T * get("beta_start", 1e-4), beta_max=T * get("beta_end", 0.02))
        return cls(schedule)

    @property
    def is_linear(self) -> bool:
        return self.beta_min is not None

    def label(self, t: TensorLike) -> torch.Tensor:
        """The timestep label a discrete-time network sees at continuous time t: t·(T-1)."""
        return torch.as_tensor(t, dtype=torch.float64) * (self.schedule.num_train_timesteps - 1)

    def beta(self, t: TensorLike) -> torch.Tensor:
        """β(t), the diffusion rate; g(t)² = β(t)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.is_linear:
            return self.beta_min + t * (self.beta_max - self.beta_min)
        # β(t) = -d/dt log ᾱ(t), with log ᾱ piecewise linear in the label
        T = self.schedule.num_train_timesteps
        dlog = -torch.diff(self.schedule.alphas_cumprod.log())  # per unit label
        mids = torch.arange(T - 1, dtype=torch.float64) + 0.5
        return (T - 1) * _interp(self.label(t), mids, dlog)

    def mean_coeff(self, t: TensorLike) -> torch.Tensor:
        """m(t) = exp(-¼ t² (β_max-β_min) - ½ t β_min) (docs/schedules.md#the-vp-sde): x_t = m(t) x_0 + √(1-m²) z."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.is_linear:
            return torch.exp(-0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)
        labels = torch.arange(self.schedule.num_train_timesteps, dtype=torch.float64)
        return _interp(self.label(t), labels, self.schedule.alphas_cumprod.log()).mul(0.5).exp()

    def std(self, t: TensorLike) -> torch.Tensor:
        """Marginal standard deviation √(1 - m(t)²)."""
        return (-torch.expm1(2.0 * self.mean_coeff(t).log())).sqrt()

    def sigma(self, t: TensorLike) -> torch.Tensor:
        """σ(t) = √(1 − m²)/m, the VE noise level of the state at time t (docs/schedules.md#timestep-labels-and-the-ve-noise-level)."""
        return self.std(t) / self.mean_coeff(t)

    def time_of_sigma(self, sigma: TensorLike) -> torch.Tensor:
        """The time t whose σ(t) is ``sigma``: the inverse of :meth:`sigma`, clamped to [0, 1].

        Linear β: m(t)² = 1/(1+σ²) is ½Δβ t² + β_min t = log(1+σ²), so
        t = (−β_min + √(β_min² + 2 Δβ log(1+σ²)))/Δβ with Δβ = β_max − β_min (Lu et al. 2022a,
        App. D, the inverse of λ(t)). Otherwise log m² is the discrete log ᾱ interpolated linearly in
        the label, inverted on the same piecewise-linear graph.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log1p_sigma2 = torch.log1p(sigma**2)  # −log m(t)²
        if self.is_linear:
            d_beta = self.beta_max - self.beta_min
            if d_beta == 0:
                t = log1p_sigma2 / self.beta_min
            else:
                t = (-self.beta_min + (self.beta_min**2 + 2 * d_beta * log1p_sigma2).sqrt()) / d_beta
            return t.clamp(0.0, 1.0)
        T = self.schedule.num_train_timesteps
        neg_log_alpha_bar = -self.schedule.alphas_cumprod.log()  # increasing in the label
        labels = torch.arange(T, dtype=torch.float64)
        return _interp(log1p_sigma2, neg_log_alpha_bar, labels) / (T - 1)

    def time_grid(self, grid: str, num_steps: int, t_eps: float) -> torch.Tensor:
        """t_0 = 1 > t_1 > … > t_N = t_ε on a time grid (docs/schedules.md#time-grids), float64.

        ``uniform``: Δt = −(1 − t_ε)/N (Song et al. 2021); ``log_snr`` and ``karras``: the σ grid
        between σ(1) and σ(t_ε), mapped to times with :meth:`time_of_sigma`.
        """
        check_time_grid(grid)
        if grid == "uniform":
            return uniform_grid(1.0, t_eps, num_steps + 1)
        sigma_1, sigma_eps = float(self.sigma(1.0)), float(self.sigma(t_eps))
        times = self.time_of_sigma(sigma_grid(grid, sigma_1, sigma_eps, num_steps + 1, None, None))
        times[0], times[-1] = 1.0, t_eps
        return times

    def add_noise(self, x_0: torch.Tensor, noise: torch.Tensor, labels: TensorLike) -> torch.Tensor:
        """Forward marginal x_t = m(t) x₀ + √(1 − m(t)²) z at t = label/(T−1), per sample."""
        t = torch.as_tensor(labels, dtype=torch.float64).cpu() / (self.schedule.num_train_timesteps - 1)
        shape = (-1,) + (1,) * (x_0.ndim - 1) if t.ndim else ()
        m_t = self.mean_coeff(t).reshape(shape).to(x_0.device, x_0.dtype)
        std_t = self.std(t).reshape(shape).to(x_0.device, x_0.dtype)
        return m_t * x_0 + std_t * noise
