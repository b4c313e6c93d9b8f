"""Convergence order of the ODE and SDE samplers, measured on exact scores.

The data is a single Gaussian N(0, c² I), so ``pipelines.analytic.GaussianMixtureNet`` gives the
exact ε at every noise level, the solutions of the samplers' equations are known in closed form,
and the only error left is the sampler's discretisation error. Each sampler runs the plain loop of
diffusers' scheduler contract (``run``), built by ``schedulers.registry.create_scheduler`` and
driven through ``schedulers.parametrization.EpsilonNetwork``.

Deterministic samplers (strong error against the closed-form end point of the same initial noise):

- PF-ODE Euler (order 1) and Heun (order 2), plus a check that fine runs on the default linear
  schedule end on the closed form of the continuous VP-SDE's probability-flow ODE;
- DDIM η = 0 (order 1) and DPM-Solver++ 2M (order 2; order 1 with ``solver_order=1``).

The error of an order-p method falls by ≈ 2^p when N doubles; the tests ask for a ratio in
[1.6, 2.6] for order 1 and above 3 for order 2, at step counts where the asymptotic regime holds
(measured: PF Euler 1.89/1.95, PF Heun 3.58/3.75, DDIM 1.94/2.04, DPM-Solver++ 4.24/4.70 and 1.97/1.99).
``final_denoise`` and the x̂₀ clipping are off (they would end the runs elsewhere than the ODE),
and all runs of one sampler end at the same time.

Stochastic sampler (weak error): VP-SDE Euler–Maruyama; the error of the sample variance against
the exact marginal variance at t_ε halves when N doubles (``test_vp_sde_euler_maruyama_is_weak_order_one``).

Not here, because their step counts do not discretise one fixed equation: annealed Langevin (a
fixed step size per level), the predictor–corrector sampler (its corrector step size is set by the
SNR, not by N) and DDPM (a fixed 1000-step chain); ``tests/test_exact_scores.py`` checks their
sample distributions. The last-step noise removal of the VP-SDE is tested directly in
``tests/test_guards.py``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipelines.analytic import GaussianMixtureNet
from schedulers.parametrization import EpsilonNetwork
from schedulers.registry import create_scheduler
from schedulers.schedules import DiscreteVPSchedule

T = 1000
LINEAR = {"num_train_timesteps": T, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
BETA_MIN, BETA_MAX = T * 1e-4, T * 0.02  # the VP-SDE of the linear schedule: β(t) = β_min + t (β_max − β_min)
DIM, BATCH = 2, 64
C = 0.5  # data std (deterministic tests)
# The linear schedule's betas given explicitly: the VP-SDE then follows the discrete ᾱ (its m(t)
# interpolates log ᾱ between labels) instead of the analytic m(t) of the linear β(t), so the network's
# marginals are exactly the SDE's and the closed forms below are exact to ~1e-5. With the analytic
# β(t) the two differ by ~1e-3 (PF-ODE) to ~1 % (small-c variance), more than the errors measured here.
EXPLICIT = {"num_train_timesteps": T, "trained_betas": np.linspace(1e-4, 0.02, T).tolist()}


def exact_net(std: float, mean: float = 0.0, dim: int = DIM, base: dict = LINEAR) -> EpsilonNetwork:
    """E[ε | x_t] of data N(mean, std² I), as the ε-network every sampler is driven by."""
    schedule = DiscreteVPSchedule.from_config(base)
    net = GaussianMixtureNet([1.0], [[mean] * dim], [std], family="vp", schedule=schedule)
    return EpsilonNetwork(net, net.model_family(), schedule)


def run(name: str, steps: int, params: dict, x_unit: torch.Tensor, net: EpsilonNetwork, base: dict = LINEAR, seed: int = 1):
    """The verbatim loop; ``x_unit`` is the standard-normal initial noise (scaled by init_noise_sigma)."""
    scheduler, step_kwargs = create_scheduler(name, base, params)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = x_unit * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x, generator=g, **step_kwargs).prev_sample
    return x, scheduler


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def ratios(errors: list) -> list:
    return [a / b for a, b in itertools.pairwise(errors)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(BATCH, DIM, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def net():
    return exact_net(C)


# ---------------------------------------------------------------- probability-flow ODE

PF = {"final_denoise": False, "clip_sample": False}  # end at x(t_ε) itself, unclipped
T_EPS = 1e-3


def pf_exact_end(x_T: torch.Tensor, alpha_bar_1: float, alpha_bar_eps: float) -> torch.Tensor:
    """For data N(0, c²) the PF-ODE dx/dt = −½β(x + ∇log p_t), p_t = N(0, v), v = ᾱc² + 1 − ᾱ, moves every
    point along x(t) = x(1)·√(v(t)/v(1)) (d log x/dt = d log √v/dt = −½β(1 − 1/v))."""
    def v(alpha_bar):
        return alpha_bar * C * C + 1 - alpha_bar

    return x_T * math.sqrt(v(alpha_bar_eps) / v(alpha_bar_1))


@pytest.mark.parametrize("solver,steps,lo,hi,finest", [
    ("euler", (40, 80, 160), 1.6, 2.6, 1e-2),  # order 1: error ratio → 2 (measured 1.89, 1.95)
    ("heun", (10, 20, 40), 3.0, None, 5e-3),   # order 2: error ratio → 4 (measured 3.58, 3.75)
])
def test_pf_ode_convergence_order(x_T, solver, steps, lo, hi, finest):
    """Against the closed-form end point, on the schedule whose betas are given explicitly: the VP-SDE
    then interpolates the network's own discrete ᾱ (see ``EXPLICIT``), so the closed form is the exact
    solution of the ODE the sampler integrates (to ~1e-5). Also asks for a small error at the finest N,
    so a solver that converges at the right rate to a wrong ODE fails too."""
    net = exact_net(C, base=EXPLICIT)
    schedule = DiscreteVPSchedule.from_config(EXPLICIT)
    exact = pf_exact_end(x_T, float(schedule.alpha_bar_at(T - 1)), float(schedule.alpha_bar_at(T_EPS * (T - 1))))
    params = {**PF, "solver": solver, "sampling_eps": T_EPS}
    errors = [rel_err(run("pf_ode", n, params, x_T, net, base=EXPLICIT)[0], exact) for n in steps]
    for r in ratios(errors):
        assert r > lo and (hi is None or r < hi), f"{solver}: errors {errors} at N={steps}, ratios {ratios(errors)}"
    assert errors[-1] < finest, errors


def vp_mean_coeff(t: float) -> float:
    """m(t) of the linear VP-SDE, written out here independently of the scheduler."""
    return math.exp(-0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN)


@pytest.mark.parametrize("solver,steps", [("heun", 200), ("euler", 2000)])
def test_pf_ode_solves_the_probability_flow_ode_of_the_linear_vp_sde(x_T, net, solver, steps):
    """The registry's default schedule (analytic β(t), m(t)): a fine run ends at the closed form of the
    continuous VP-SDE's PF-ODE. The network's ᾱ is the discrete schedule's, which differs from m(t)²
    by ~1e-3 — hence the tolerance; a flipped score or g² instead of ½g² is off by tens of percent."""
    x, _ = run("pf_ode", steps, {**PF, "solver": solver, "sampling_eps": T_EPS}, x_T, net)
    exact = pf_exact_end(x_T, vp_mean_coeff(1.0) ** 2, vp_mean_coeff(T_EPS) ** 2)
    assert rel_err(x, exact) < 1e-2


# ---------------------------------------------------------------- DDIM, η = 0

def test_ddim_eta0_is_first_order(x_T, net):
    """DDIM η = 0 is Euler's method for dx̄/dσ = ε(x̄, σ) in x̄ = x/√ᾱ, σ = √((1−ᾱ)/ᾱ). For data
    N(0, c²) ε = σ x̄/(c² + σ²), so x̄(σ) = x̄(σ_0)·√((c² + σ²)/(c² + σ_0²)), and the end (ᾱ = 1, σ = 0)
    of a run that starts at label t_0 is x_{t_0}·c/√(ᾱ_{t_0} c² + 1 − ᾱ_{t_0}). The registry's
    "leading" spacing starts each N at its own t_0; each run is compared with its own exact end."""
    errors = []
    steps = (20, 40, 80)
    schedule = DiscreteVPSchedule.from_config(LINEAR)
    for n in steps:
        x, scheduler = run("ddim", n, {"eta": 0.0, "clip_sample": False}, x_T, net)
        ab = float(schedule.alphas_cumprod[int(scheduler.timesteps[0])])
        exact = x_T * C / math.sqrt(ab * C * C + 1 - ab)
        errors.append(rel_err(x, exact))
    for r in ratios(errors):
        assert 1.6 < r < 2.6, f"errors {errors} at N={steps}"


# ---------------------------------------------------------------- DPM-Solver++ (2M)

def dpm_exact_end(x_T: torch.Tensor, scheduler) -> torch.Tensor:
    """DPM-Solver++ runs the ODE in (x̄, σ) over its Karras σ_max … σ_min and ends with a first-order
    step to σ = 0, which returns Tweedie's x̂₀ at σ_min. For data N(0, c²): x̄(σ_min) = x̄(σ_max)
    √((c² + σ_min²)/(c² + σ_max²)), x̂₀ = c² x̄/(c² + σ²) (as DDIM's closed form)."""
    sigmas = scheduler.sigmas.double()
    s_max, s_min = float(sigmas[0]), float(sigmas[-2])
    assert float(sigmas[-1]) == 0.0  # final_sigmas_type "zero": the last step is the Tweedie step
    x_bar = x_T * math.sqrt(1 + s_max**2)  # x_T is the VP state at σ_max
    x_bar_min = x_bar * math.sqrt((C * C + s_min**2) / (C * C + s_max**2))
    return C * C * x_bar_min / (C * C + s_min**2)


@pytest.mark.parametrize("order,lo,hi", [(2, 3.0, None), (1, 1.6, 2.6)])
def test_dpmsolver_pp_order(x_T, net, order, lo, hi):
    """Order 2 for the registry's 2M solver; order 1 with ``solver_order=1`` (the test tells them apart).
    diffusers rounds Karras timesteps to integer labels, a small inconsistency that does not show at
    these N (measured ratios 4.2, 4.7)."""
    errors = []
    steps = (40, 80, 160)
    for n in steps:
        x, scheduler = run("dpmsolver++", n, {"thresholding": False, "solver_order": order}, x_T, net)
        errors.append(rel_err(x, dpm_exact_end(x_T, scheduler)))
    for r in ratios(errors):
        assert r > lo and (hi is None or r < hi), f"solver_order={order}: errors {errors} at N={steps}"


# ---------------------------------------------------------------- VP-SDE Euler–Maruyama: weak order 1

SDE_C, SDE_MEAN, SDE_DIM, SDE_N = 0.1, 0.0, 4, 20_000
SDE_T_EPS = 99 / (T - 1)  # an integer label (99): the two interpolations of ᾱ agree there exactly




def test_vp_sde_euler_maruyama_is_weak_order_one():
    """E–M has weak order 1: the error of Var[x(t_ε)] against the exact v(t_ε) = ᾱ c² + 1 − ᾱ halves
    when N doubles. Small data (c = 0.1) and t_ε ≈ 0.1 put the errors (−24 %, −11 %, −5 % at N = 40,
    80, 160, exact variance recursion) far above the Monte-Carlo error of 80,000 draws (0.5 %), in
    the asymptotic regime (ratios 2.2, 2.1). A wrong noise scale (no √β|Δt|, 2β|Δt|) or drift makes
    the error stall or blow up. (The noise removal on the last step changes the error by ≈ +β(t_ε)|Δt|,
    also O(1/N): tests/test_guards.py checks it directly.)"""
    net = exact_net(SDE_C, SDE_MEAN, SDE_DIM, base=EXPLICIT)
    schedule = DiscreteVPSchedule.from_config(EXPLICIT)
    ab = float(schedule.alpha_bar_at(SDE_T_EPS * (T - 1)))
    exact_var = ab * SDE_C**2 + 1 - ab
    x_T = torch.randn(SDE_N, SDE_DIM, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = (40, 80, 160)
    errors = []
    for n in steps:
        x, _ = run("vp_sde", n, {"sampling_eps": SDE_T_EPS}, x_T, net, base=EXPLICIT, seed=n)
        errors.append(abs(float(x.var()) - exact_var) / exact_var)
    for r in ratios(errors):
        assert 1.6 < r < 2.8, f"variance errors {errors} at N={steps}"
    assert errors[-1] < 0.1, errors
