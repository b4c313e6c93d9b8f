"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) against a direct transcription of the
algorithm, on an exact-score model, run through the plain diffusers loop."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.analytic import GaussianMixtureNet
from schedulers.parametrization import EpsilonNetwork
from schedulers.registry import SAMPLERS, create_scheduler, nfe_of
from schedulers.schedules import DiscreteVPSchedule, karras_grid
from schedulers.scheduling_edm import EDMStochasticScheduler

MIXTURE = dict(weights=[0.3, 0.7], means=[[-0.5, 0.2, 0.1], [0.4, -0.3, 0.0]], stds=[0.1, 0.2])
SCHEDULE = DiscreteVPSchedule()
BATCH = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exact_denoiser():
    """D(x; σ) of the mixture for a VE state x = x₀ + σ z (EDM's denoiser), and the same model as an ε-network."""
    net = GaussianMixtureNet(**MIXTURE, family="vp", schedule=SCHEDULE)
    eps_net = EpsilonNetwork(net, net.model_family(), SCHEDULE)

    def denoise(x, sigma):  # exact E[x₀ | x₀ + σ z = x], computed in the mixture's own closed form
        flat = x.flatten(1).double()
        one = torch.ones(flat.shape[0], 1, dtype=torch.float64)
        epsilon = net.epsilon(flat, one, one * sigma)  # VE: a = 1, s = σ
        return (flat - sigma * epsilon).reshape(x.shape)

    return denoise, eps_net


def algorithm_2(denoise, t_steps, gammas, s_noise, x_hat_0, generator):
    """Karras et al. (2022), Algorithm 2, line by line. The draws follow the loop's order: x̂_0 is drawn
    whole (lines 1 and 5–6 of step 0 together: N(0, t_0² + S_noise²(t̂_0² − t_0²))), and ε_i is drawn
    when step i's churn is non-zero, after x_i is complete."""
    N = len(t_steps) - 1
    x = x_hat = x_hat_0
    for i in range(N):
        t_i, t_next = float(t_steps[i]), float(t_steps[i + 1])
        gamma_i = float(gammas[i])                                             # line 3
        t_hat = t_i + gamma_i * t_i                                            # line 5
        if i > 0 and gamma_i > 0:
            epsilon_i = s_noise * torch.randn(x.shape, generator=generator, dtype=x.dtype)  # line 4
            x_hat = x + math.sqrt(t_hat**2 - t_i**2) * epsilon_i               # line 6
        elif i > 0:
            x_hat = x
        d_i = (x_hat - denoise(x_hat, t_hat)) / t_hat                          # line 7
        x = x_hat + (t_next - t_hat) * d_i                                     # line 8
        if t_next != 0:                                                        # line 9
            d_prime = (x - denoise(x, t_next)) / t_next                        # line 10
            x = x_hat + (t_next - t_hat) * (0.5 * d_i + 0.5 * d_prime)         # line 11
    return x                                                                   # line 13


def run_loop(scheduler, eps_net, steps, seed):
    """The plain loop of diffusers' contract (as pipelines/sampling.py runs it)."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, 3, 1, 1), generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    x_hat_0 = x.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(eps_net(scheduler.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    return x, x_hat_0, g


@pytest.mark.parametrize("settings", [
    dict(s_churn=30.0, s_tmin=0.01, s_tmax=1.0, s_noise=1.007),   # EDM's CIFAR-10 setting (Table 5)
    dict(s_churn=80.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),  # ImageNet-64
    dict(s_churn=40.0, s_tmin=0.0, s_tmax=1000.0, s_noise=1.0),  # churn on every level, the first included
    dict(s_churn=0.0),                                            # Algorithm 1: deterministic Heun
])
def test_the_loop_is_algorithm_2(settings):
    denoise, eps_net = exact_denoiser()
    steps = 8
    scheduler = EDMStochasticScheduler(**settings)
    out, x_hat_0, _ = run_loop(scheduler, eps_net, steps, seed=1)
    # the grid and churn of Algorithm 2, computed here from the paper's formulas
    t_steps = torch.cat([karras_grid(80.0, SCHEDULE.sigma_min, steps), torch.zeros(1, dtype=torch.float64)])
    churn = min(settings["s_churn"] / steps, math.sqrt(2) - 1)
    gammas = [churn if settings.get("s_tmin", 0.01) <= float(t) <= settings.get("s_tmax", 1.0) else 0.0
              for t in t_steps[:-1]]
    torch.testing.assert_close(scheduler.t_steps, t_steps)
    torch.testing.assert_close(scheduler.gammas, torch.tensor(gammas, dtype=torch.float64))
    assert len(scheduler.timesteps) == 2 * steps - 1 == nfe_of("edm", steps, {"s_churn": settings["s_churn"]})
    t_hat_0 = float(t_steps[0]) * (1 + gammas[0])
    s_noise = settings.get("s_noise", 1.007)
    assert math.isclose(scheduler.init_noise_sigma,
                        math.sqrt(float(t_steps[0]) ** 2 + s_noise**2 * (t_hat_0**2 - float(t_steps[0]) ** 2)))
    # replay the loop's draws: the same generator, past the initial noise
    g = torch.Generator().manual_seed(1)
    torch.randn((BATCH, 3, 1, 1), generator=g, dtype=torch.float64)
    reference = algorithm_2(denoise, t_steps, gammas, s_noise, x_hat_0, g)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    assert any(gammas) == (settings["s_churn"] > 0)
    assert (gammas[0] > 0) == (settings.get("s_tmax", 1.0) >= 80.0)


def test_churn_is_noise_and_s_noise_scales_it():
    _, eps_net = exact_denoiser()
    a, _, _ = run_loop(EDMStochasticScheduler(), eps_net, 6, seed=0)
    b, _, _ = run_loop(EDMStochasticScheduler(), eps_net, 6, seed=0)
    assert torch.equal(a, b)
    det, _, _ = run_loop(EDMStochasticScheduler(s_churn=0.0), eps_net, 6, seed=0)
    assert not torch.allclose(a, det)  # same starting noise, churned path
    s = EDMStochasticScheduler(s_tmax=1000.0)  # churn on every level: t̂ capped at the schedule's largest σ
    s.set_timesteps(4)
    assert float(s.t_hat.max()) <= SCHEDULE.sigma_max * (1 + 1e-12)


def test_reproduces_the_mixture_statistics():
    """A sanity check of the whole sampler on the exact score: weights and widths of the two modes."""
    net = GaussianMixtureNet(**MIXTURE, family="vp", schedule=SCHEDULE)
    eps_net = EpsilonNetwork(net, net.model_family(), SCHEDULE)
    scheduler, _ = create_scheduler("edm", None, {"clip_sample": False})
    scheduler.set_timesteps(SAMPLERS["edm"].default_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3000, 3, 1, 1), generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_net(scheduler.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    stats = net.statistics(x)
    assert (stats["weights"] - torch.tensor(MIXTURE["weights"], dtype=torch.float64)).abs().max() < 0.04
    assert ((stats["stds"] / torch.tensor(MIXTURE["stds"], dtype=torch.float64)) - 1).abs().max() < 0.1


def test_parameters_are_checked():
    for bad in (dict(s_churn=-1.0), dict(s_noise=0.0), dict(time_grid="cosine")):
        with pytest.raises(ValueError):
            EDMStochasticScheduler(**bad)
    with pytest.raises(ValueError, match="between"):
        create_scheduler("edm", None, {"s_noise": 3.0})
