"""The predictor–corrector sampler's ancestral predictor (Song et al. 2021, App. F, with the exact
posterior between grid times, Ho et al. 2020, Eq. 7): its step written by hand in the VP variables,
the corrector untouched, and what it buys on a coarse grid (docs/samplers.md#vp-sde-euler-maruyama)."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.analytic import GaussianMixtureNet
from pipelines.sampling import SamplerPipeline
from schedulers.registry import SAMPLERS, create_scheduler, nfe_of
from schedulers.schedules import DiscreteVPSchedule, linear_betas_for_sigma_range
from schedulers.scheduling_vp_sde import VPSDEScheduler
from tests.test_samplers_ipndm import M16, S16, W16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mean_coeff(t: float) -> float:
    """m(t) = exp(−¼ t² (β_max − β_min) − ½ t β_min) of the linear VP-SDE, β_min = 0.1, β_max = 20."""
    return math.exp(-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1)


EPS = [torch.tensor([[v, -0.5 * v, 0.25]], dtype=torch.float64) for v in (0.8, -0.3, 1.1, 0.4, -0.9)]


@pytest.mark.parametrize("grid", ["log_snr", "karras"])
def test_ancestral_predictor_is_the_posterior_step_by_hand(grid):
    """x_s ~ N(μ̃(x_t, x̂₀), β̃ I) between consecutive grid times, ᾱ = m²; the last step returns μ̃."""
    s = VPSDEScheduler(predictor="ancestral", time_grid=grid)
    s.set_timesteps(5)
    times = s.grid.tolist()
    x = torch.tensor([[0.7, -2.0, 1.5]], dtype=torch.float64)
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(s.timesteps):
        out = s.step(EPS[i], t, x, generator=gen)
        ab_t, ab_s = mean_coeff(times[i]) ** 2, mean_coeff(times[i + 1]) ** 2
        x0 = (x - math.sqrt(1 - ab_t) * EPS[i]) / math.sqrt(ab_t)
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-9, atol=1e-9)
        beta_ts = 1.0 - ab_t / ab_s
        mean = math.sqrt(ab_s) * beta_ts / (1 - ab_t) * x0 + math.sqrt(ab_t / ab_s) * (1 - ab_s) / (1 - ab_t) * x
        if i == len(s.timesteps) - 1:
            torch.testing.assert_close(out.prev_sample, mean, rtol=1e-9, atol=1e-9)
            break
        var = (1 - ab_s) / (1 - ab_t) * beta_ts
        z = torch.randn(x.shape, generator=ref, dtype=torch.float64)
        torch.testing.assert_close(out.prev_sample, mean + math.sqrt(var) * z, rtol=1e-9, atol=1e-9)
        x = out.prev_sample


def test_the_corrector_steps_do_not_depend_on_the_predictor():
    """With C = 1 the entries alternate corrector, predictor: the corrector entries are the same Langevin
    step for both predictors, the predictor entries differ."""
    outs = {}
    for predictor in ("euler_maruyama", "ancestral"):
        s = VPSDEScheduler(predictor=predictor, corrector_steps=1, time_grid="log_snr")
        s.set_timesteps(4)
        x = torch.tensor([[0.7, -2.0, 1.5]], dtype=torch.float64)
        outs[predictor] = [s.step(EPS[i % 5], t, x, generator=torch.Generator().manual_seed(i)).prev_sample
                           for i, t in enumerate(s.timesteps)]
    for i, (a, b) in enumerate(zip(outs["euler_maruyama"], outs["ancestral"])):
        assert torch.equal(a, b) == (i % 2 == 0), i


def test_on_a_fine_grid_the_two_predictors_agree():
    """One step of each from the same state and draw, half-way through N steps on [t_ε, 1]: the two agree
    to higher order than the step itself (measured 8.6e-3 at N = 200, 2.7e-4 at N = 2,000, where the step
    moves the state by 0.46 and 0.15)."""
    x = torch.tensor([[0.7, -2.0, 1.5]], dtype=torch.float64)

    def gap(n):
        steps = []
        for predictor in ("euler_maruyama", "ancestral"):
            s = VPSDEScheduler(predictor=predictor)
            s.set_timesteps(n)
            s.set_begin_index(n // 2)
            steps.append(s.step(EPS[0], s.timesteps[n // 2], x, generator=torch.Generator().manual_seed(0)).prev_sample)
        return float((steps[0] - steps[1]).abs().max())

    coarse, fine = gap(200), gap(2000)
    assert fine < 1e-3 and coarse / fine > 10, (coarse, fine)


def mixture_weight_error(family: str, predictor: str, steps: int) -> float:
    schedule = None if family == "vp" else DiscreteVPSchedule(**dict(zip(("beta_start", "beta_end"),
                                                                         linear_betas_for_sigma_range(0.01, 50.0))))
    net = GaussianMixtureNet(W16, M16, S16, family=family, schedule=schedule)
    pipe = SamplerPipeline(net, net.model_family(), sample_shape=(16, 1, 1))
    out = pipe("pc", steps, {"predictor": predictor, "time_grid": "log_snr"}, batch_size=3000, seed=0,
               output_type="pt", dtype=torch.float64)
    assert out.nfe == 2 * steps
    stats = net.statistics(out.images)
    return float((stats["weights"] - torch.tensor(W16, dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("family", ["vp", "ve"])
def test_ancestral_predictor_keeps_the_mode_weights_at_20_nfe(family):
    """The 16-D exact-score mixture, 10 predictor + 10 corrector steps on the log-SNR grid, 3,000 samples.
    Measured mode-weight error: ancestral 0.035 / 0.041 (VP / VE), Euler–Maruyama 0.52 / 0.46."""
    ancestral, euler = mixture_weight_error(family, "ancestral", 10), mixture_weight_error(family, "euler_maruyama", 10)
    assert ancestral < 0.08 < 0.3 < euler, (ancestral, euler)


def test_registry_entry_and_bad_arguments():
    spec = SAMPLERS["pc"]
    assert spec.defaults()["predictor"] == "euler_maruyama" and nfe_of("pc", 10) == 20
    scheduler, _ = create_scheduler("pc", params={"predictor": "ancestral", "time_grid": "log_snr"})
    assert scheduler.config.predictor == "ancestral" and scheduler.config.corrector_steps == 1
    with pytest.raises(ValueError, match="predictor"):
        VPSDEScheduler(predictor="heun")
    with pytest.raises(ValueError, match="predictor"):
        create_scheduler("pc", params={"predictor": "reverse_diffusion"})
