"""The adaptive-step reverse-SDE solver (Jolicoeur-Martineau et al. 2021): its tolerance controls its
error and its cost, it runs in the plain diffusers loop (``pipelines/sampling.py`` unchanged) with
timesteps it decides as it goes, and it stays within its budget (docs/samplers.md#adaptive-reverse-sde)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.analytic import GaussianMixtureNet
from pipelines.sampling import SamplerPipeline
from schedulers.base import AdaptiveTimesteps
from schedulers.parametrization import EpsilonNetwork
from schedulers.registry import SAMPLERS, create_scheduler, nfe_of
from schedulers.schedules import DiscreteVPSchedule
from schedulers.scheduling_adaptive_sde import AdaptiveSDEScheduler

# The linear schedule's betas given explicitly: the VP-SDE then follows the network's discrete ᾱ
# (tests/test_convergence_order.py), so the exact marginal at t_ε is known to ~1e-5.
EXPLICIT = {"num_train_timesteps": 1000, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}
WEIGHTS, STDS = [0.3, 0.7], [0.05, 0.15]
MEANS = [[-0.5, 0.3, 0.0, 0.2], [0.4, -0.2, 0.1, -0.3]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mixture():
    net = GaussianMixtureNet(WEIGHTS, MEANS, STDS, family="vp", schedule=DiscreteVPSchedule.from_config(EXPLICIT))
    return net, EpsilonNetwork(net, net.model_family(), net.schedule)


def solve(rtol, budget=20_000, n=4000, seed=0, **kwargs):
    """The plain loop, final denoising off: the sample at t_ε, and the scheduler."""
    net, eps_net = mixture()
    s = AdaptiveSDEScheduler(**EXPLICIT, rtol=rtol, atol=1e-4, final_denoise=False, **kwargs)
    s.set_timesteps(budget)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 4, 1, 1), generator=g, dtype=torch.float64)
    for t in s.timesteps:
        x = s.step(eps_net(s.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    return x, s, net


def variance_error(rtol: float, seed: int) -> tuple[float, int]:
    """|sample variance / exact − 1| at t_ε on data N(0, c² I), c = 0.05, and the evaluations spent.

    A narrow mode makes the last part of the reverse SDE stiff, so a loose tolerance shows there; the
    exact marginal at t_ε is N(0, (m² c² + 1 − m²) I) (docs/exact-scores.md#standard-normal-data, scaled).
    """
    c = 0.05
    net = GaussianMixtureNet([1.0], [[0.0] * 4], [c], family="vp", schedule=DiscreteVPSchedule.from_config(EXPLICIT))
    eps_net = EpsilonNetwork(net, net.model_family(), net.schedule)
    s = AdaptiveSDEScheduler(**EXPLICIT, rtol=rtol, atol=1e-4, final_denoise=False)
    s.set_timesteps(20_000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((4000, 4, 1, 1), generator=g, dtype=torch.float64)
    for t in s.timesteps:
        x = s.step(eps_net(s.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    m = float(s.sde.mean_coeff(s.config.sampling_eps))
    assert s.nfe == 2 * s.accepted + s.rejected  # 2 evaluations a step, 1 more per rejected attempt
    assert s.rejected > 0 and all((error <= 1) == ok for _, _, error, ok in s.history)  # accepted iff E₂ ≤ 1
    assert abs(sum(h for _, h, _, ok in s.history if ok) - (1 - 1e-3)) < 1e-9  # the accepted steps reach t_ε
    return abs(float(x.var()) / (m**2 * c**2 + 1 - m**2) - 1), s.nfe


def test_a_tighter_tolerance_gives_a_smaller_error_for_more_evaluations():
    """Measured over seeds 0–2: ε_rel = 1 → error 0.105 / 0.024 / 0.117 (≈130 NFE); ε_rel = 0.05 → 0.015 /
    0.005 / 0.030 (≈530 NFE). One run's error is noisy (the s.e. of a variance from 16,000 values is
    1.1 %, and the batch's steps depend on its draws), so the test averages three."""
    loose = [variance_error(1.0, seed) for seed in range(3)]
    tight = [variance_error(0.05, seed) for seed in range(3)]
    loose_error, tight_error = (sum(e for e, _ in runs) / 3 for runs in (loose, tight))
    assert tight_error < loose_error / 3 and tight_error < 0.03, (loose, tight)
    assert min(n for _, n in tight) > 2 * max(n for _, n in loose), (loose, tight)


@pytest.mark.parametrize("accepted", [True, False])
def test_one_attempt_by_hand(accepted):
    """Euler–Maruyama x′, improved Euler x″ with the same z, and E₂ = max over samples of ‖(x′ − x″)/δ‖₂/√n."""
    _, eps_net = mixture()
    rtol = 10.0 if accepted else 1e-3
    s = AdaptiveSDEScheduler(**EXPLICIT, rtol=rtol, atol=1e-4)
    s.set_timesteps(20_000)  # a budget that forces no step (the floor h ≥ (t − t_ε)/(steps left) is ≈ 1e-4)
    x = torch.randn((5, 4, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sde, h = s.sde, 0.01

    def drift(x_, t):  # F = ½β x + β s_θ, G = √β, with s_θ = −ε̂/√(1 − m²)
        beta = float(sde.beta(t))
        eps = eps_net(x_, torch.tensor(t * 999.0))
        return 0.5 * beta * x_ - beta * eps / float(sde.std(t)), beta**0.5

    entries = iter(s.timesteps)
    t0 = next(entries)
    x_prime = s.step(eps_net(x, t0), t0, x, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    f, g = drift(x, 1.0)
    torch.testing.assert_close(x_prime, x + h * f + h**0.5 * g * z)  # x′ = x + hF(x, t) + √h G(t) z
    t1 = next(entries)
    assert abs(float(t1) - (1.0 - h) * 999) < 1e-3
    out = s.step(eps_net(x_prime, t1), t1, x_prime, generator=torch.Generator().manual_seed(6)).prev_sample
    f2, g2 = drift(x_prime, 1.0 - h)
    x_second = 0.5 * (x_prime + x + h * f2 + h**0.5 * g2 * z)  # x″ = ½(x′ + x̃)
    delta = torch.clamp(rtol * torch.maximum(x_prime.abs(), x.abs()), min=1e-4)
    error = float(((x_prime - x_second) / delta).flatten(1).pow(2).mean(1).sqrt().max())
    assert abs(s.history[0][2] - error) < 1e-9 * max(error, 1.0) and s.history[0][3] == accepted == (error <= 1)
    if accepted:
        torch.testing.assert_close(out, x_second)  # extrapolation: continue from x″
    else:  # a new attempt from the same x with a smaller h: x + h′F(x, t) + √h′ G z′
        h_new = h * 0.9 * error ** -0.9  # θ h E₂^{−r}
        assert h_new > 0.999 / ((20_000 - 2 - 1 - 1) // 2 + 1)  # above the budget's floor
        z_new = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        torch.testing.assert_close(out, x + h_new * f + h_new**0.5 * g * z_new)


def test_runs_in_the_plain_pipeline_loop_and_reports_its_nfe():
    net, _ = mixture()
    pipe = SamplerPipeline(net, net.model_family(), sampler_config=EXPLICIT, sample_shape=(4, 1, 1))
    seen = []
    out = pipe("adaptive_sde", 1000, {"clip_sample": False}, batch_size=500, seed=0, output_type="pt",
               dtype=torch.float64, callback=lambda i, n, x, x0: seen.append((i, n)))
    assert torch.isfinite(out.images).all()
    assert 3 <= out.nfe < 1000 and len(seen) == out.nfe and seen[0][1] == 1000  # n is the budget
    scheduler, _, _ = pipe.prepare("adaptive_sde", 1000, None)
    assert isinstance(scheduler.timesteps, AdaptiveTimesteps) and len(scheduler.timesteps) == 1000
    assert nfe_of("adaptive_sde", 1000) == 1000  # what the registry's limits and the app's budget see
    stats = net.statistics(out.images)
    assert (stats["weights"] - torch.tensor(WEIGHTS, dtype=torch.float64)).abs().max() < 0.06


@pytest.mark.parametrize("budget", [3, 4, 9, 40])
def test_a_small_budget_still_reaches_t_eps(budget):
    net, eps_net = mixture()
    s = AdaptiveSDEScheduler(**EXPLICIT, rtol=0.01)
    s.set_timesteps(budget)
    x = torch.randn((64, 4, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = []
    for t in s.timesteps:
        labels.append(float(t))
        x = s.step(eps_net(x, t), t, x, generator=torch.Generator().manual_seed(len(labels))).prev_sample
    assert s.nfe == len(labels) <= budget and torch.isfinite(x).all()
    assert abs(labels[-1] - 1e-3 * 999) < 1e-3  # the final denoising evaluation at t_ε
    assert s.timesteps.tolist() == pytest.approx(labels)
    with pytest.raises(IndexError):
        s.step(eps_net(x, labels[-1]), labels[-1], x)
    with pytest.raises(ValueError, match="at least 3"):
        AdaptiveSDEScheduler().set_timesteps(2)


def test_timesteps_are_decided_by_the_steps():
    net, eps_net = mixture()
    s = AdaptiveSDEScheduler(**EXPLICIT)
    s.set_timesteps(100)
    assert [float(t) for t in s.timesteps] == [999.0]  # before any step only the first entry is known
    x = torch.randn((8, 4, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="not the entry the solver asked for"):
        s.step(eps_net(x, 500.0), 500.0, x)
    it = iter(s.timesteps)
    t0 = next(it)
    s.step(eps_net(x, t0), t0, x, generator=torch.Generator().manual_seed(1))
    t1 = next(it)
    assert float(t1) < float(t0) and s.nfe == 1
    assert float(s.timesteps[1]) == float(t1) and len(s.timesteps) == 100
    with pytest.raises(ValueError, match="cannot start"):
        s.set_begin_index(3)


def test_stochastic_and_seeded():
    a, _, _ = solve(0.2, n=200, seed=3)
    b, _, _ = solve(0.2, n=200, seed=3)
    assert torch.equal(a, b)
    scheduler, _ = create_scheduler("adaptive_sde", None, {"rtol": 0.1, "atol": 0.01})
    assert scheduler.config.rtol == 0.1 and SAMPLERS["adaptive_sde"].min_steps == 3
