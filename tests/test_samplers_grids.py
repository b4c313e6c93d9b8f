"""Time grids (docs/schedules.md#time-grids): each grid function against a hand computation, the
VP-SDE's σ ↔ t map, and every custom sampler using the grid it is given without changing its NFE."""

from __future__ import annotations

import math

import pytest
import torch

from schedulers.registry import SAMPLERS, create_scheduler, nfe_of
from schedulers.schedules import (
    TIME_GRIDS,
    VPSDE,
    DiscreteVPSchedule,
    geometric_sigmas,
    karras_grid,
    log_snr_grid,
    sigma_grid,
    uniform_grid,
)

F64 = dict(dtype=torch.float64)
GRID_SAMPLERS = [name for name, spec in SAMPLERS.items() if "time_grid" in spec.defaults()]


# ---- the three grid functions, by hand ----

def test_uniform_grid_by_hand():
    # t_i = 1 + (i/4)(0.001 − 1): steps of −0.24975
    expected = torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 0.001], **F64)
    torch.testing.assert_close(uniform_grid(1.0, 0.001, 5), expected, rtol=0, atol=1e-15)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_log_snr_grid_by_hand():
    # σ from 100 to 0.01 in 5 points: ratio 10 each, so λ = −2 log σ steps by 2 ln 10 = 4.6052
    sigmas = log_snr_grid(100.0, 0.01, 5)
    torch.testing.assert_close(sigmas, torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01], **F64), rtol=1e-12, atol=0)
    lam = -2 * sigmas.log()
    torch.testing.assert_close(lam.diff(), torch.full((4,), 2 * math.log(10), **F64), rtol=1e-12, atol=0)
    assert torch.equal(geometric_sigmas(100.0, 0.01, 5), sigmas)  # SMLD's levels are this grid


def test_karras_grid_by_hand():
    # EDM, σ_max = 80, σ_min = 0.002, ρ = 7, 3 points: 80^{1/7} = 1.870122, 0.002^{1/7} = 0.411560,
    # the middle point is ((1.870122 + 0.411560)/2)^7 = 1.140841^7 = 2.515219
    sigmas = karras_grid(80.0, 0.002, 3)
    torch.testing.assert_close(sigmas, torch.tensor([80.0, 2.515218976147159, 0.002], **F64), rtol=1e-12, atol=0)
    # ρ = 1 is uniform in σ; large ρ tends to the log-SNR grid
    torch.testing.assert_close(karras_grid(10.0, 1.0, 4, rho=1.0), torch.tensor([10.0, 7.0, 4.0, 1.0], **F64))
    torch.testing.assert_close(karras_grid(100.0, 0.01, 5, rho=1e6), log_snr_grid(100.0, 0.01, 5), rtol=1e-4, atol=0)


@pytest.mark.parametrize("bad", [dict(num_points=1), dict(sigma_min=0.0), dict(sigma_min=5.0)])
def test_grids_reject_bad_arguments(bad):
    args = {"sigma_max": 1.0, "sigma_min": 0.1, "num_points": 4, **bad}
    for fn in (log_snr_grid, karras_grid):
        with pytest.raises(ValueError):
            fn(args["sigma_max"], args["sigma_min"], args["num_points"])
    with pytest.raises(ValueError, match="time_grid must be one of"):
        sigma_grid("cosine", 1.0, 0.1, 4, None, None)


# ---- the VP-SDE's σ(t) and its inverse ----

def test_vp_sde_time_of_sigma_by_hand():
    sde = VPSDE.from_config({})  # β(t) = 0.1 + 19.9 t
    # σ(t) = 1 ⇔ m² = ½ ⇔ ½ 19.9 t² + 0.1 t = ln 2 ⇔ t = (−0.1 + √(0.01 + 2·19.9·ln 2))/19.9 = 0.258960
    assert math.isclose(float(sde.time_of_sigma(1.0)), 0.2589602624327966, rel_tol=1e-12)
    assert math.isclose(float(sde.sigma(0.2589602624327966)), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("config", [{}, {"beta_schedule": "squaredcos_cap_v2"},
                                    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}])
def test_vp_sde_time_of_sigma_inverts_sigma(config):
    sde = VPSDE.from_config(config)
    t = torch.tensor([1e-3, 0.01, 0.3, 0.7, 0.999], **F64)
    torch.testing.assert_close(sde.time_of_sigma(sde.sigma(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grid", TIME_GRIDS)
def test_vp_sde_time_grid(grid):
    sde, n, t_eps = VPSDE.from_config({}), 4, 1e-3
    times = sde.time_grid(grid, n, t_eps)
    assert len(times) == n + 1 and float(times[0]) == 1.0 and float(times[-1]) == t_eps
    assert bool((times.diff() < 0).all())
    sigmas = sde.sigma(times)
    s1, s_eps = float(sde.sigma(1.0)), float(sde.sigma(t_eps))
    if grid == "uniform":  # Δt = −(1 − t_ε)/N
        torch.testing.assert_close(times.diff(), torch.full((n,), -(1 - t_eps) / n, **F64))
    elif grid == "log_snr":  # σ_i = σ(1) (σ(t_ε)/σ(1))^{i/N}: the middle point is the geometric mean
        assert math.isclose(float(sigmas[2]), math.sqrt(s1 * s_eps), rel_tol=1e-9)
    else:  # the middle of 5 Karras points: ((σ_1^{1/7} + σ_ε^{1/7})/2)^7
        assert math.isclose(float(sigmas[2]), ((s1 ** (1 / 7) + s_eps ** (1 / 7)) / 2) ** 7, rel_tol=1e-9)


def test_label_uniform_grid_takes_equal_steps_in_the_label():
    schedule = DiscreteVPSchedule()
    sigmas = schedule.sigma_grid("uniform", 80.0, 0.01, 5)
    labels = schedule.sigma_to_t(sigmas)
    torch.testing.assert_close(labels.diff(), torch.full((4,), float(labels[1] - labels[0]), **F64), rtol=1e-9, atol=1e-9)
    assert float(sigmas[0]) == 80.0 and float(sigmas[-1]) == 0.01


# ---- every custom sampler takes the grid, with the same NFE ----

def test_every_custom_sampler_offers_the_three_grids():
    assert {"langevin", "vp_sde", "pc", "pf_ode", "edm", "ipndm"} <= set(GRID_SAMPLERS)
    for name in GRID_SAMPLERS:
        param = SAMPLERS[name].param("time_grid")
        assert param.kind == "choice" and tuple(param.choices) == TIME_GRIDS
    assert SAMPLERS["langevin"].defaults()["time_grid"] == "log_snr"  # the paper's geometric levels
    for name in ("vp_sde", "pc", "pf_ode"):
        assert SAMPLERS[name].defaults()["time_grid"] == "uniform"  # the paper's Δt = −(1 − t_ε)/N
    assert SAMPLERS["edm"].defaults()["time_grid"] == "karras"


@pytest.mark.parametrize("name", GRID_SAMPLERS)
def test_the_grid_moves_the_steps_but_not_the_nfe(name):
    nfes = {grid: nfe_of(name, 6, {"time_grid": grid}) for grid in TIME_GRIDS}
    assert len(set(nfes.values())) == 1, nfes
    seen = {}
    for grid in TIME_GRIDS:
        scheduler, _ = create_scheduler(name, None, {"time_grid": grid})
        scheduler.set_timesteps(6)
        if hasattr(scheduler, "grid"):  # the VP-SDE samplers: t_0 = 1 … t_N = t_ε
            expected = scheduler.sde.time_grid(grid, 6, scheduler.config.sampling_eps)
            torch.testing.assert_close(scheduler.grid, expected)
            torch.testing.assert_close(scheduler.dts, expected.diff())
            seen[grid] = scheduler.grid
        else:  # the σ-space samplers: their levels are the schedule's σ grid
            sigma_max, sigma_min = scheduler._sigma_range()
            expected = scheduler.schedule.sigma_grid(grid, sigma_max, sigma_min, 6)
            levels = scheduler.sigmas.unique_consecutive() if name == "langevin" else scheduler.sigmas
            if name == "edm":
                levels = scheduler.t_steps[:-1]
            torch.testing.assert_close(levels, expected)
            seen[grid] = expected
    assert not torch.allclose(seen["uniform"], seen["log_snr"]) and not torch.allclose(seen["log_snr"], seen["karras"])


@pytest.mark.parametrize("name,params", [("vp_sde", {}), ("pc", {}), ("pf_ode", {"solver": "euler", "final_denoise": False}),
                                         ("pf_ode", {"solver": "heun", "final_denoise": False})])
def test_sde_and_ode_steps_use_the_grid_step(name, params):
    """One predictor step at entry k, by hand: x + drift(x, t_i) Δt_i with this grid's Δt_i (EM adds √(β|Δt_i|) z)."""
    scheduler, _ = create_scheduler(name, None, {**params, "time_grid": "karras", "clip_sample": False}
                                    if "clip_sample" in SAMPLERS[name].defaults() else {**params, "time_grid": "karras"})
    scheduler.set_timesteps(5)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 0.4 * x
    for k in range(len(scheduler.timesteps)):
        if name == "pc" and bool(scheduler.is_corrector[k]):
            continue
        if name == "pf_ode" and k % scheduler.order:
            continue  # Heun's second stage needs its first
        i = k // scheduler.order  # the grid step of this entry
        t, dt = float(scheduler.grid[i]), float(scheduler.dts[i])
        assert float(scheduler.times[k]) == t
        scheduler.set_timesteps(5)
        scheduler.set_begin_index(k)
        out = scheduler.step(eps, scheduler.timesteps[k], x, generator=torch.Generator().manual_seed(7)).prev_sample
        beta, std = float(scheduler.sde.beta(t)), float(scheduler.sde.std(t))
        score = -eps / std
        if name == "pf_ode":
            expected = x + (-0.5 * beta * x - 0.5 * beta * score) * dt
        else:
            expected = x + (-0.5 * beta * x - beta * score) * dt
            if k < len(scheduler.timesteps) - 1:
                z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
                expected = expected + math.sqrt(beta * abs(dt)) * z
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
