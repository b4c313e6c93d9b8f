"""Formulas against docs/ (schedules.md, parametrization.md, exact-scores.md): forward marginals, β̃, the VP-SDE marginal, the SMLD between-level
step, the parametrisation conversions and the σ ↔ label map."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from schedulers import AnnealedLangevinScheduler, ProbabilityFlowScheduler, VPSDEScheduler
from schedulers.parametrization import (
    alpha_bar_to_sigma, clip_denoised, epsilon_to_score, epsilon_to_v, epsilon_to_x0, forward_marginal, score_to_epsilon,
    score_to_x0, sigma_to_alpha_bar, sigma_to_vp_scales, to_epsilon, ve_to_vp, vp_scales, vp_to_ve, x0_to_epsilon,
)
from schedulers.schedules import VPSDE, DiscreteVPSchedule, geometric_sigmas, linear_betas_for_sigma_range

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def test_discrete_schedule_matches_ddpm_and_math():
    sched = DiscreteVPSchedule()
    ddpm = DDPMScheduler()
    torch.testing.assert_close(sched.alphas_cumprod.float(), ddpm.alphas_cumprod)
    # ᾱ_t = ∏ (1 - β_s), β linear from 1e-4 to 0.02 (docs/schedules.md#ddpm-the-discrete-vp-schedule)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - betas, 0))


def test_posterior_variance_beta_tilde():
    """β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t is diffusers' fixed_small variance (docs/schedules.md#ddpm-the-discrete-vp-schedule)."""
    ddpm = DDPMScheduler(variance_type="fixed_small")
    ddpm.set_timesteps(1000)
    s = DiscreteVPSchedule()
    for t in (1, 10, 500, 999):
        beta_tilde = (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t]) * s.betas[t]
        assert math.isclose(float(ddpm._get_variance(t)), float(beta_tilde), rel_tol=1e-3)  # diffusers works in float32


@pytest.mark.parametrize("cls", [VPSDEScheduler, ProbabilityFlowScheduler])
def test_forward_marginal_of_add_noise(cls):
    """x_t = m(t) x₀ + √(1-m²) z: the empirical mean and variance match the SDE's marginal."""
    s = cls()
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=G(0), dtype=torch.float64)
    label = torch.full((20000,), 600.0)
    x_t = s.add_noise(x0, z, label)
    m = float(s.sde.mean_coeff(600 / 999))
    assert abs(float(x_t.mean()) - 0.7 * m) < 0.02
    assert abs(float(x_t.var()) - (1 - m**2)) < 0.03


def test_vp_sde_marginal_matches_discrete_alpha_bar():
    """m(t)² at t = label/(T-1) tracks the discrete ᾱ of the same label (docs/schedules.md#the-vp-sde)."""
    sde = VPSDE.from_config(DDPMScheduler().config)
    assert sde.beta_min == pytest.approx(0.1) and sde.beta_max == pytest.approx(20.0)
    labels = torch.arange(0, 1000, 37)
    m2 = sde.mean_coeff(labels / 999.0) ** 2
    ab = sde.schedule.alphas_cumprod[labels]
    # log ᾱ agree to a few per cent of their magnitude (the discrete sum vs the integral of β)
    assert torch.all((m2.log() - ab.log()).abs() <= 0.03 * ab.log().abs() + 2e-4)
    # and the closed form of m(t) is exp(-¼t²(β_max-β_min) - ½tβ_min)
    t = torch.tensor(0.37, dtype=torch.float64)
    assert float(sde.mean_coeff(t)) == pytest.approx(math.exp(-0.25 * 0.37**2 * 19.9 - 0.5 * 0.37 * 0.1))


def test_vp_sde_for_a_cosine_schedule_follows_its_alpha_bar():
    sde = VPSDE.from_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config)
    assert not sde.is_linear
    labels = torch.tensor([0.0, 250.0, 800.0])
    torch.testing.assert_close(sde.mean_coeff(labels / 999) ** 2, sde.schedule.alphas_cumprod[labels.long()], rtol=1e-6, atol=0)
    # β(t) integrates to -log ᾱ: ∫₀¹ β dt ≈ log ᾱ_0 - log ᾱ_{T-1}
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)
    integral = torch.trapezoid(sde.beta(ts), ts)
    expected = float(sde.schedule.alphas_cumprod[0].log() - sde.schedule.alphas_cumprod[-1].log())
    assert float(integral) == pytest.approx(expected, rel=1e-3)


def test_smld_between_level_step_has_the_next_level_variance():
    """x_{σ'} = x_σ + √(σ'² − σ²) ε turns N(0, σ²) into N(0, σ'²) (docs/schedules.md#smld-the-ve-family)."""
    sigma, sigma_next = 0.3, 1.7
    x = sigma * torch.randn(200000, generator=G(1), dtype=torch.float64)
    x_next = x + math.sqrt(sigma_next**2 - sigma**2) * torch.randn(200000, generator=G(2), dtype=torch.float64)
    assert float(x_next.std()) == pytest.approx(sigma_next, rel=0.01)
    # and the Langevin scheduler's add_noise is x₀ + σ_t z at the label of σ
    s = AnnealedLangevinScheduler()
    label = s.schedule.sigma_to_t(torch.tensor([sigma_next]))
    out = s.add_noise(torch.zeros(1, 1), torch.ones(1, 1), label)
    assert float(out) == pytest.approx(sigma_next, rel=1e-6)


def test_geometric_levels():
    sig = geometric_sigmas(50.0, 0.01, 10)
    ratios = sig[:-1] / sig[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (5000) ** (1 / 9)))
    assert float(sig[0]) == pytest.approx(50) and float(sig[-1]) == pytest.approx(0.01)


def test_conversions_round_trip():
    g = G(3)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(4, 3, dtype=torch.float64, generator=g)
    alpha_bar = torch.tensor(0.3, dtype=torch.float64)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x = a * x0 + s * eps
    torch.testing.assert_close(epsilon_to_x0(eps, x, a, s), x0)
    torch.testing.assert_close(to_epsilon(x0, "sample", x, a, s), eps)
    v = a * eps - s * x0  # docs/schedules.md#ddpm-the-discrete-vp-schedule
    torch.testing.assert_close(epsilon_to_v(eps, x, a, s), v)
    torch.testing.assert_close(to_epsilon(v, "v_prediction", x, a, s), eps)
    score = epsilon_to_score(eps, s)
    torch.testing.assert_close(score, -eps / s)  # ∇log q(x_t|x_0) = -ε/√(1-ᾱ)  (docs/parametrization.md#score-and-tweedie)
    torch.testing.assert_close(score_to_epsilon(score, s), eps)
    # Tweedie: E[x₀|x_t] = (x_t + (1-ᾱ) s)/√ᾱ
    torch.testing.assert_close((x + (1 - alpha_bar) * score) / a, x0)


def test_every_conversion_once_on_one_state():
    """Each conversion of parametrization.py against a state built by hand, for VP (a = √ᾱ, s = √(1−ᾱ))
    and VE (a = 1, s = σ), and the VP ↔ VE state map between them."""
    g = G(5)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(4, 3, dtype=torch.float64, generator=g)
    alpha_bar = torch.tensor(0.2, dtype=torch.float64)
    a, s = vp_scales(alpha_bar)
    torch.testing.assert_close(torch.stack([a, s]), torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt()]))
    x = forward_marginal(x0, eps, a, s)
    torch.testing.assert_close(x, a * x0 + s * eps)
    torch.testing.assert_close(x0_to_epsilon(x0, x, a, s), eps)
    sigma = alpha_bar_to_sigma(alpha_bar)
    torch.testing.assert_close(sigma, ((1 - alpha_bar) / alpha_bar).sqrt())
    torch.testing.assert_close(sigma_to_alpha_bar(sigma), alpha_bar)
    a_ve, s_ve = sigma_to_vp_scales(sigma)  # the VP scales of the same noise level
    torch.testing.assert_close(torch.stack([a_ve, s_ve]), torch.stack([a, s]))
    assert sigma_to_vp_scales(3.0) == pytest.approx((1 / math.sqrt(10), 3 / math.sqrt(10)))
    x_tilde = vp_to_ve(x, a)
    torch.testing.assert_close(x_tilde, forward_marginal(x0, eps, 1.0, sigma))  # x̃ = x₀ + σ ε
    torch.testing.assert_close(ve_to_vp(x_tilde, sigma), x)
    score_ve = epsilon_to_score(eps, sigma)  # ∇log p_σ(x̃ | x₀) = −ε/σ
    torch.testing.assert_close(score_to_x0(score_ve, x_tilde, sigma), x0)  # Tweedie in VE form
    torch.testing.assert_close(to_epsilon(score_ve, "score", x_tilde, 1.0, sigma), eps)
    torch.testing.assert_close(to_epsilon(eps, "epsilon", x, a, s), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        to_epsilon(eps, "noise", x, a, s)
    big = forward_marginal(torch.full_like(x0, 3.0), eps, a, s)  # x̂₀ = 3 everywhere: clipped to 1
    eps_clipped, x0_clipped = clip_denoised(eps, big, a, s)
    torch.testing.assert_close(x0_clipped, torch.ones_like(x0))
    torch.testing.assert_close(epsilon_to_x0(eps_clipped, big, a, s), x0_clipped)  # ε̂ consistent with the clip


def test_sigma_label_map_is_an_exact_inverse_and_matches_integer_labels():
    s = DiscreteVPSchedule()
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t)
    ints = torch.arange(0, 1000, 111)
    torch.testing.assert_close(s.t_to_sigma(ints.double()), ((1 - s.alphas_cumprod[ints]) / s.alphas_cumprod[ints]).sqrt())


def test_linear_betas_for_sigma_range_hits_both_ends():
    beta_start, beta_end = linear_betas_for_sigma_range(0.02, 80.0)
    s = DiscreteVPSchedule(beta_start=beta_start, beta_end=beta_end)
    assert s.sigma_min == pytest.approx(0.02, rel=1e-9)
    assert s.sigma_max == pytest.approx(80.0, rel=1e-6)
    # the default DDPM schedule is the one for σ ∈ [0.01, 157]
    d = DiscreteVPSchedule()
    assert linear_betas_for_sigma_range(d.sigma_min, d.sigma_max)[1] == pytest.approx(0.02, rel=1e-6)


@pytest.mark.parametrize("steps,expected", [(10, 0.83), (50, 0.96)])
def test_ddim_on_standard_gaussian_data_shrinks_by_the_product_of_cosines(steps, expected):
    """docs/exact-scores.md: for x₀ ~ N(0, I), ε̂ = s·x and deterministic DDIM ends with std ∏ cos(θ_{t'} − θ_t)."""
    sched = DDIMScheduler(set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    x = torch.randn(40000, 1, dtype=torch.float64, generator=G(0))
    ab = sched.alphas_cumprod.double()
    theta = lambda t: math.atan2(math.sqrt(1 - float(ab[t])), math.sqrt(float(ab[t]))) if t >= 0 else 0.0  # noqa: E731
    product = 1.0
    ts = [int(t) for t in sched.timesteps]
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        x = sched.step((1 - ab[t]).sqrt() * x, t, x).prev_sample
        product *= math.cos(theta(t_prev) - theta(t))
    assert float(x.std()) == pytest.approx(product, rel=0.02)
    assert product == pytest.approx(expected, abs=0.02)


def test_unadjusted_langevin_stationary_variance():
    """x ← x + α ∇log N(0, v) + √(2α) z settles at variance v / (1 − α/(2v)).

    With the rule this project implements, x + α s + √(2α) z, the fixed point of V = (1 − α/v)² V + 2α
    is v/(1 − α/(2v)) (docs/exact-scores.md); v/(1 − α/(4v)), found in some lecture notes, belongs to
    the step written as x + (α/2)∇log p + √α z.
    """
    v, alpha = 0.5, 0.2
    x = torch.zeros(50000, dtype=torch.float64)
    g = G(7)
    for _ in range(200):
        x = x + alpha * (-x / v) + math.sqrt(2 * alpha) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert float(x.var()) == pytest.approx(v / (1 - alpha / (2 * v)), rel=0.02)
    assert abs(float(x.var()) - v / (1 - alpha / (4 * v))) > 0.05


def test_clip_denoised_returns_a_consistent_pair():
    from schedulers.parametrization import clip_denoised

    g = G(11)
    x = 3 * torch.randn(64, dtype=torch.float64, generator=g)
    eps = torch.randn(64, dtype=torch.float64, generator=g)
    a, s = 0.3, (1 - 0.09) ** 0.5
    eps_c, x0_c = clip_denoised(eps, x, a, s)
    assert float(x0_c.abs().max()) <= 1.0
    torch.testing.assert_close(a * x0_c + s * eps_c, x)  # the pair still explains the state
    inside = epsilon_to_x0(eps, x, a, s).abs() <= 1
    torch.testing.assert_close(eps_c[inside], eps[inside])  # untouched where x̂₀ was already valid
