"""Likelihoods (evaluation/likelihood.py): exact answers from pipelines/analytic.py's Gaussian-mixture
networks, the bound's bookkeeping, the messages for what has no likelihood, the CLI and quick_evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from evaluation.likelihood import (DEQUANT_OFFSET_BITS, LikelihoodError, ODEConvergenceError, dequantize,
                                   discretized_gaussian_log_likelihood, epsilon_and_trace, ode_likelihood, ode_time_range,
                                   variational_bound)
from evaluation.likelihood import main as likelihood_main
from pipelines import SamplerPipeline
from pipelines.analytic import GaussianMixtureNet
from pipelines.checkpoint import save_checkpoint
from schedulers.parametrization import ModelFamily
from schedulers.schedules import DiscreteVPSchedule, linear_betas_for_sigma_range
from tests.conftest import tiny_unet

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
WEIGHTS, MEANS, STDS = [0.3, 0.7], [[-0.5, 0.2], [0.4, -0.3]], [0.2, 0.3]


def mixture_pipe(family: str = "vp", sigma_range=None, T: int = 1000, weights=WEIGHTS, means=MEANS, stds=STDS):
    """An exact ε- (VP) or score- (VE) network of a Gaussian mixture, as a pipeline on d-dimensional data."""
    if family == "ve":
        lo, hi = sigma_range or (0.01, 50.0)
        config = {"num_train_timesteps": T, "beta_start": 0, "beta_end": 0, "beta_schedule": "linear"}
        config["beta_start"], config["beta_end"] = linear_betas_for_sigma_range(lo, hi, T)
    else:  # the linear schedule of the VP-SDE with β(t) from 0.1 to 20, discretised in T steps
        config = {"num_train_timesteps": T, "beta_start": 0.1 / T, "beta_end": 20.0 / T, "beta_schedule": "linear"}
    net = GaussianMixtureNet(weights, means, stds, family=family, schedule=DiscreteVPSchedule.from_config(config))
    return SamplerPipeline(net, net.model_family(), config, sample_shape=(net.dim,)), net


def mixture_log_density(net: GaussianMixtureNet, x: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """log p(x) of the noised mixture x = a x₀ + s ε: Σ_k w_k N(a μ_k, (a² s_k² + s²) I)."""
    x = x.flatten(1).double()
    d = x.shape[1]
    v = a**2 * net.stds**2 + s**2
    sq = ((x[:, None, :] - a * net.means[None]) ** 2).sum(-1)
    return torch.logsumexp(net.weights.log()[None] - 0.5 * d * torch.log(2 * math.pi * v)[None] - sq / (2 * v[None]), 1)


def exact_ode_answer(pipe, net, x):
    """(exact bits/dim of the data as the state at t_eps, the exact marginal at t = 1 as a prior)."""
    sde, t0, t1 = ode_time_range(pipe)
    scales = lambda t: (float(sde.mean_coeff(t)), float(sde.std(t)))  # noqa: E731
    exact = (-mixture_log_density(net, x, *scales(t0)) / (net.dim * math.log(2))).numpy()
    return exact, lambda z: mixture_log_density(net, z, *scales(t1))


# ------------------------------------------------------------------------------------------------
# the probability-flow ODE against closed-form densities
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vp", "ve"])
def test_ode_likelihood_of_a_mixture_is_the_closed_form_density(family):
    """Exact trace, exact prior: only the solver's error remains (rtol = atol = 1e-5)."""
    pipe, net = mixture_pipe(family)
    x = net.sample(20, G(0))
    exact, prior = exact_ode_answer(pipe, net, x)
    r = ode_likelihood(pipe, x, dequantize_data=False, probe="exact", prior_logp=prior)
    assert np.abs(r.per_image - exact).max() < 5e-4
    assert r.ci95_probes == 0.0 and len(r.nfe) == 1 and 20 < r.nfe[0] < 500


@pytest.mark.parametrize("family", ["vp", "ve"])
def test_hutchinson_estimate_covers_the_exact_density(family):
    """Rademacher probes: the mean over images lies within the probes' interval of the exact mean."""
    pipe, net = mixture_pipe(family)
    x = net.sample(30, G(1))
    exact, prior = exact_ode_answer(pipe, net, x)
    r = ode_likelihood(pipe, x, dequantize_data=False, probe="rademacher", num_probes=8, seed=3, prior_logp=prior)
    assert r.per_probe.shape == (30, 8) and r.per_probe.std() > 0.01  # the probes do differ
    assert abs(r.bits_per_dim - exact.mean()) < r.ci95_probes
    assert r.ci95 > r.ci95_probes  # the interval over images includes the images' own spread
    g = ode_likelihood(pipe, x, dequantize_data=False, probe="gaussian", num_probes=8, seed=3, prior_logp=prior)
    assert abs(g.bits_per_dim - exact.mean()) < g.ci95_probes


def test_rademacher_probes_are_exact_for_a_single_gaussian():
    """One component: ∂ε̂/∂x = (s/v) I, and vᵀ c I v = c d for every Rademacher v."""
    pipe, net = mixture_pipe("vp", weights=[1.0], means=[[0.3, -0.2, 0.1]], stds=[0.5])
    x = net.sample(10, G(2))
    exact, prior = exact_ode_answer(pipe, net, x)
    r = ode_likelihood(pipe, x, dequantize_data=False, num_probes=2, prior_logp=prior)
    assert np.abs(r.per_probe - exact[:, None]).max() < 5e-4


def test_the_default_prior_is_the_marginal_at_t1_and_its_error_is_bounded():
    """π = N(0, I) stands for the marginal p_1; E L_T = E KL(q(x(1)|x₀) ‖ π) bounds the error KL(p_1 ‖ π).

    A VE network with σ_max = 50 (the bundled NCSN's range) reaches ᾱ = 1/(1 + 50²) at t = 1: the
    prior is right to 1e-4 bits/dim. With σ_max = 2 the marginal is far from N(0, I): the default
    prior's answer is off by about KL(p_1 ‖ π), within the reported bound, and the exact marginal
    as ``prior_logp`` repairs it.
    """
    pipe, net = mixture_pipe("ve", sigma_range=(0.01, 50.0))
    x = net.sample(200, G(4))
    exact, _ = exact_ode_answer(pipe, net, x)
    r = ode_likelihood(pipe, x, dequantize_data=False, probe="exact", rtol=1e-4, atol=1e-4)
    assert r.prior_bound_bpd < 1e-4 and abs(r.bits_per_dim - exact.mean()) < 1e-3

    pipe, net = mixture_pipe("ve", sigma_range=(0.01, 2.0))
    exact, prior = exact_ode_answer(pipe, net, x)
    off = ode_likelihood(pipe, x, dequantize_data=False, probe="exact", rtol=1e-4, atol=1e-4)
    error = off.per_image - exact  # −log π(x(1)) + log p_1(x(1)) per image: KL(p_1 ‖ π) on average
    se = error.std(ddof=1) / math.sqrt(len(error))
    assert error.mean() > 3 * se and error.mean() < off.prior_bound_bpd + 3 * se
    fixed = ode_likelihood(pipe, x, dequantize_data=False, probe="exact", rtol=1e-4, atol=1e-4, prior_logp=prior)
    assert np.abs(fixed.per_image - exact).max() < 2e-3 and fixed.prior_bound_bpd is None


def test_dequantised_bits_per_dim_carry_the_bin_volume():
    """Dequantised 8-bit data: bits/dim = the density's bits/dim at y = 2(k+u)/256 − 1, plus log₂(256/2) = 7."""
    pipe, net = mixture_pipe("vp")
    k = ((net.sample(6, G(5)).clamp(-1, 1) + 1) * 127.5).round()
    x = k / 127.5 - 1  # on the project's 8-bit grid
    quantised = ode_likelihood(pipe, x, probe="exact", seed=7, rtol=1e-4, atol=1e-4)
    y = dequantize(x, G(7))
    assert ((y + 1) * 128 - k).min() >= 0 and ((y + 1) * 128 - k).max() < 1  # each y in its pixel's cube
    density = ode_likelihood(pipe, y, probe="exact", dequantize_data=False, rtol=1e-4, atol=1e-4)
    assert DEQUANT_OFFSET_BITS == 7.0
    np.testing.assert_allclose(quantised.per_image, density.per_image + 7.0, atol=1e-9)
    with pytest.raises(LikelihoodError, match="not 8-bit"):
        ode_likelihood(pipe, x + 0.001, probe="exact")


# ------------------------------------------------------------------------------------------------
# the variational bound against closed-form densities
# ------------------------------------------------------------------------------------------------

def test_variational_bound_is_above_the_exact_nll_and_approaches_it_as_T_grows():
    """Continuous 8-d mixture, exact ε: bound − exact NLL, paired over the same 2,000 points.

    With β_t variances (``fixed_large``, decoder variance β_0) the gap closes as T grows: about
    0.26 / 0.05 / 0.01 bits/dim at T = 25 / 100 / 1000 (± 0.01 here). With β̃_t (``fixed_small``) it does not:
    β̃_t = β_t · t/(t+1) near t = 0 is too small for data with a density (docs/likelihood.md).
    """
    means = torch.randn(2, 8, generator=G(5), dtype=torch.float64) * 0.4
    gaps, ses = [], []
    for T in (25, 100, 1000):
        pipe, net = mixture_pipe("vp", T=T, means=means)
        x = net.sample(2000, G(1))
        exact = (-mixture_log_density(net, x, 1.0, 0.0) / (net.dim * math.log(2))).numpy()
        b = variational_bound(pipe, x, discrete=False, variance="fixed_large", batch_size=16384, seed=3)
        diff = b.per_image - exact
        gaps.append(diff.mean())
        ses.append(diff.std(ddof=1) / math.sqrt(len(diff)))
        assert diff.mean() > -3 * ses[-1]  # a bound: not below the exact NLL
    assert gaps[0] > gaps[1] + 3 * math.hypot(ses[0], ses[1]) and gaps[1] > gaps[2]
    assert gaps[0] > 0.15 and gaps[2] < 0.05
    small = variational_bound(pipe, x[:500], discrete=False, variance="fixed_small", batch_size=16384, seed=3)
    assert (small.per_image - exact[:500]).mean() > 0.5  # a bound, but not a tight one for continuous data


def test_bound_terms_add_up_and_stride_modes():
    pipe, net = mixture_pipe("vp", T=200)
    x = net.sample(2000, G(6))
    opts = dict(discrete=False, variance="fixed_large", batch_size=16384)
    full = variational_bound(pipe, x, seed=0, **opts)
    T = 200
    assert full.kl.shape == (2000, T - 1) and list(full.kl_labels) == list(range(1, T))
    assert len(full.terms) == T + 1 and full.term_labels[0] == 0 and full.term_labels[-1] == T
    np.testing.assert_allclose(full.per_image, full.decoder + full.kl.sum(1) + full.prior, rtol=1e-12)
    assert (full.kl > -1e-12).all() and full.settings["network_evaluations_per_image"] == T

    rescaled = variational_bound(pipe, x, stride=10, seed=1, **opts)
    assert rescaled.kl_weights.sum() == T - 1 and list(rescaled.kl_weights[:8]) == [1, 1, 2, 2, 4, 4, 8, 8]
    assert rescaled.kl.shape[1] == 8 + 17 and set(rescaled.kl_weights[8:-1]) == {10}  # then blocks of 10 steps
    assert "unbiased estimate of the full T-step bound" in rescaled.settings["stride_note"]
    diff = rescaled.per_image - full.per_image  # an unbiased estimate of the same bound: differences are noise
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(len(diff))
    np.testing.assert_allclose(rescaled.per_image, rescaled.decoder + rescaled.kl @ rescaled.kl_weights + rescaled.prior)

    respaced = variational_bound(pipe, x, stride=10, stride_mode="respace", seed=0, **opts)
    assert respaced.kl_labels[-1] == T - 1 and (respaced.kl_weights == 1).all() and respaced.kl.shape[1] == 20
    gap = respaced.per_image - full.per_image  # a 21-step chain: a valid but looser bound
    assert gap.mean() > 5 * gap.std(ddof=1) / math.sqrt(len(gap))
    assert "looser" in respaced.settings["stride_note"]


def test_prior_term_is_the_closed_form_kl():
    """L_T = KL(N(√ᾱ x₀, (1−ᾱ) I) ‖ N(0, I)) = ½ Σ_d [ᾱ x₀² − ᾱ − log(1 − ᾱ)], on a schedule that stops short of noise."""
    config = {"num_train_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.05, "beta_schedule": "linear"}
    net = GaussianMixtureNet(WEIGHTS, MEANS, STDS, schedule=DiscreteVPSchedule.from_config(config))
    pipe = SamplerPipeline(net, net.model_family(), config, sample_shape=(2,))
    x = net.sample(50, G(9))
    b = variational_bound(pipe, x, discrete=False)
    ab = float(pipe.schedule.alphas_cumprod[-1])
    assert 0.2 < ab < 0.4
    closed = 0.5 * (ab * x**2 - ab - math.log(1 - ab)).sum(1) / (2 * math.log(2))
    np.testing.assert_allclose(b.prior, closed.numpy(), rtol=1e-10)
    np.testing.assert_allclose(b.per_image, b.decoder + b.kl.sum(1) + b.prior, rtol=1e-12)


def test_discrete_bound_of_a_finite_set_is_at_least_its_entropy():
    """Data uniform on 4 eight-bit points: −log₂ P(x) = 2 bits per point; the bound is at least that."""
    from pipelines.analytic import FiniteSetNet

    k = torch.randint(0, 256, (4, 1, 4, 4), generator=G(8)).double()
    data = k / 127.5 - 1
    net = FiniteSetNet(data, family="vp")
    pipe = SamplerPipeline(net, net.model_family(), {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                                     "beta_schedule": "linear"}, sample_shape=(1, 4, 4))
    b = variational_bound(pipe, data, stride=5, seed=0)
    assert "no dequantisation" in b.settings["data"]
    assert (b.per_image >= 2.0 / 16).all() and b.bits_per_dim < 3.0


def test_discretized_gaussian_bins():
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    std = torch.tensor(0.1, dtype=torch.float64)
    p = discretized_gaussian_log_likelihood(x, x, std).exp()
    inner = math.erf(1 / 255 / 0.1 / math.sqrt(2))  # P(|z| < 1/255) for std 0.1
    assert p[1].item() == pytest.approx(inner, rel=1e-9)
    assert p[0].item() == pytest.approx(0.5 + inner / 2, rel=1e-9)  # the edge bin reaches −∞
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # all bins sum to one
    total = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, 0.3), torch.tensor(0.2)).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-9)
    far = discretized_gaussian_log_likelihood(torch.tensor([0.9]), torch.tensor([-0.9]), torch.tensor(0.01))
    assert torch.isfinite(far).all() and far.item() < -1000  # deep in the tail, still finite


# ------------------------------------------------------------------------------------------------
# what has no likelihood, and solver failures: clear messages
# ------------------------------------------------------------------------------------------------

def test_a_ve_checkpoint_asked_for_the_bound_is_told_why_and_pointed_to_the_ode():
    pipe, net = mixture_pipe("ve")
    with pytest.raises(LikelihoodError, match=r"VE \(NCSN\) checkpoint.*no such chain.*probability-flow ODE.*method 'ode'"):
        variational_bound(pipe, net.sample(4, G(0)), discrete=False)


def test_models_without_a_likelihood_are_refused():
    unet = tiny_unet(num_class_embeds=10)
    conditional = SamplerPipeline(unet, ModelFamily(kind="vp", num_class_embeds=10), dict(DDPMScheduler().config))
    images = torch.full((2, 1, 8, 8), -1.0)
    with pytest.raises(LikelihoodError, match="without an unconditional branch.*pass class labels"):
        variational_bound(conditional, images)
    with pytest.raises(LikelihoodError, match="without an unconditional branch"):
        ode_likelihood(conditional, images)
    pipe, net = mixture_pipe("vp")
    with pytest.raises(LikelihoodError, match="unconditional"):
        ode_likelihood(pipe, net.sample(2, G(0)), dequantize_data=False, class_labels=[1, 2])
    guided = SamplerPipeline(unet, ModelFamily(kind="vp", num_class_embeds=11, null_class_label=10),
                             dict(DDPMScheduler().config))
    with pytest.raises(LikelihoodError, match="not the score of any density"):
        variational_bound(guided, images, class_labels=[1, 2], guidance_scale=3.0)


def test_solver_failure_names_its_tolerance_and_the_evaluations_spent():
    pipe, net = mixture_pipe("vp")
    x = net.sample(4, G(0))
    with pytest.raises(ODEConvergenceError, match=r"rtol=1e-05, atol=1e-05: 10 network evaluations spent"):
        ode_likelihood(pipe, x, dequantize_data=False, max_nfe=10)

    class Exploding(torch.nn.Module):  # a network whose ε grows without bound
        def forward(self, sample, timestep, class_labels=None):
            return sample * 1e30

    bad = SamplerPipeline(Exploding(), ModelFamily(), pipe.sampler_config, sample_shape=(2,))
    with pytest.raises(ODEConvergenceError, match=r"did not converge at rtol=1e-05.* after \d+ network evaluations"):
        ode_likelihood(bad, x, dequantize_data=False)


# ------------------------------------------------------------------------------------------------
# trained-network path: autograd trace, CLI, quick_evaluate
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vp(tmp_path_factory):
    path = tmp_path_factory.mktemp("nll") / "vp"
    save_checkpoint(path, tiny_unet(num_class_embeds=11), ModelFamily(kind="vp", num_class_embeds=11, null_class_label=10),
                    dict(DDPMScheduler().config))
    return str(path)


def test_autograd_trace_agrees_with_finite_differences(tiny_vp):
    """A UNet gets vᵀ(∂ε̂/∂x)v by a vector–Jacobian product; the same network behind a detaching
    wrapper (as pipelines/analytic.py's are) gets central differences: the same numbers."""
    from schedulers.parametrization import EpsilonNetwork

    pipe = SamplerPipeline.from_pretrained(tiny_vp)
    images = torch.randint(0, 256, (2, 1, 8, 8), generator=G(0)) / 127.5 - 1
    a = ode_likelihood(pipe, images, rtol=1e-2, atol=1e-2, seed=1)
    assert a.settings["trace"] == "vector–Jacobian product" and np.isfinite(a.per_image).all()

    class Detached(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, class_labels=None):
            return self.unet(sample.detach(), timestep, class_labels=class_labels)

    unet = tiny_unet().double()  # float64: central differences are exact enough
    family, schedule = ModelFamily(), pipe.schedule
    net = EpsilonNetwork(unet, family, schedule)
    x = torch.randn(3, 1, 8, 8, generator=G(2), dtype=torch.float64)
    v = torch.randint(0, 2, x.shape, generator=G(3)).double() * 2 - 1
    label = torch.full((3,), 300.0, dtype=torch.float64)
    eps, tr, fd = epsilon_and_trace(net, x, label, v)
    eps2, tr2, fd2 = epsilon_and_trace(EpsilonNetwork(Detached(unet), family, schedule), x, label, v)
    assert not fd and fd2 and torch.allclose(eps, eps2)
    torch.testing.assert_close(tr, tr2, rtol=1e-6, atol=1e-6)
    _, exact, _ = epsilon_and_trace(net, x[:1], label[:1], None)  # the full trace, one product per dimension
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    h = 1e-5
    columns = (net(x[:1] + h * basis, label[:1].expand(64)) - net(x[:1] - h * basis, label[:1].expand(64))) / (2 * h)
    assert exact.item() == pytest.approx(float((columns.flatten(1) * basis.flatten(1)).sum()), rel=1e-7)


def test_likelihood_command_writes_json(tiny_vp, ncsnpp_checkpoint, tmp_path, capsys):
    out = tmp_path / "nll.json"
    assert likelihood_main(["--checkpoint", tiny_vp, "--num_images", "2", "--method", "both", "--stride", "100",
                            "--rtol", "1e-2", "--atol", "1e-2", "--json", str(out)]) == 0
    results = _strict_json(out.read_text())["results"]
    bound = results["bound"]
    assert results["ode"]["ci95_probes"] is None  # one probe per image: no probe interval, written as null (never NaN)
    assert bound["stride"] == 100 and len(bound["terms_bpd"]) == bound["network_evaluations_per_image"] + 1 < 40
    assert results["ode"]["num_images"] == 2 and results["ode"]["mean_nfe"] > 0
    text = capsys.readouterr().out
    assert "bound" in text and "ODE" in text and "bits/dim" in text

    assert likelihood_main(["--checkpoint", str(ncsnpp_checkpoint), "--num_images", "1", "--method", "bound"]) == 2
    assert "VE (NCSN) checkpoint" in capsys.readouterr().err
    out = tmp_path / "ve.json"
    assert likelihood_main(["--checkpoint", str(ncsnpp_checkpoint), "--num_images", "1", "--method", "both", "--rtol",
                            "1e-1", "--atol", "1e-1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert "bound" not in results and "ode" in results and "VE (NCSN)" in results["notes"][0]


def test_quick_evaluate_returns_numbers_terms_and_a_figure(tiny_vp, ncsnpp_checkpoint):
    from matplotlib.figure import Figure

    from evaluation import quick_evaluate

    stages = []
    q = quick_evaluate(SamplerPipeline.from_pretrained(tiny_vp), num_samples=10, steps=3, nll_images=3, bound_stride=100,
                       ode_images=2, ode_tol=1e-2, progress=lambda f, m: stages.append(f))
    assert stages[0] == 0.0 and stages[-1] == 1.0
    assert q.fid > 0 and q.inception_score is not None and 1.0 <= q.inception_score <= 10.0
    assert q.bound["num_images"] == 3 and q.ode["num_images"] == 2 and q.ode["ci95"] >= 0
    assert q.terms.shape == q.term_labels.shape == (q.bound["network_evaluations_per_image"] + 1,)
    assert isinstance(q.figure, Figure)
    text = q.markdown()
    assert "Quick evaluation, 10 samples" in text and "variational bound (bits/dim)" in text and "classifier IS" in text
    assert "classifier-KID" in text and "probability-flow ODE (bits/dim)" in text

    v = quick_evaluate(SamplerPipeline.from_pretrained(str(ncsnpp_checkpoint)), num_samples=10, steps=3, nll_images=2,
                       ode_images=1, ode_tol=1e-1, likelihood=("bound", "ode"))
    assert v.bound is None and v.figure is None and v.ode is not None
    assert any("VE (NCSN)" in n for n in v.notes)


def _strict_json(text: str):
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


def test_json_outputs_are_strict_json_with_null_for_non_finite_numbers():
    from pathlib import Path

    from evaluation.likelihood import json_safe, json_text

    value = {"a": float("nan"), "b": (np.float64("inf"), 1.0), "c": np.array([1.0, np.nan]), "d": torch.tensor(2.0), 3: "x"}
    assert json_safe(value) == {"a": None, "b": [None, 1.0], "c": [1.0, None], "d": 2.0, "3": "x"}
    assert _strict_json(json_text(value))["a"] is None
    docs = Path(__file__).resolve().parents[1] / "docs"
    files = sorted(docs.glob("nll-*.json"))
    assert len(files) == 3
    for path in files:  # the committed results: strict JSON, one result per file
        results = _strict_json(path.read_text())["results"]
        assert {"bound", "ode"} & set(results)


def test_evaluations_stop_when_asked():
    from pipelines import SamplingCancelled

    pipe, net = mixture_pipe("vp")
    x = net.sample(4, G(0))
    with pytest.raises(SamplingCancelled, match="variational bound cancelled"):
        variational_bound(pipe, x, discrete=False, should_stop=lambda: True)
    calls = []
    with pytest.raises(SamplingCancelled, match="ODE likelihood cancelled"):
        ode_likelihood(pipe, x, dequantize_data=False, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4  # polled once per evaluation, stopped at the first True
