"""The diffusers scheduler contract, for each custom scheduler (in the spirit of diffusers'
``SchedulerCommonTest``) and the loop contract for every registered sampler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from schedulers import SAMPLERS, AnnealedLangevinScheduler, ProbabilityFlowScheduler, VPSDEScheduler, create_scheduler
from schedulers.scheduling_adaptive_sde import AdaptiveSDEScheduler
from schedulers.scheduling_edm import EDMStochasticScheduler
from schedulers.scheduling_ipndm import IPNDMScheduler
from schedulers.scheduling_sde_multistep import SDEMultistepScheduler

CUSTOM = [
    (AnnealedLangevinScheduler, {}),
    (AnnealedLangevinScheduler, {"final_denoise": False, "steps_per_level": 2}),
    (VPSDEScheduler, {}),
    (VPSDEScheduler, {"corrector_steps": 2}),
    (ProbabilityFlowScheduler, {"solver": "heun"}),
    (ProbabilityFlowScheduler, {"solver": "euler"}),
    (EDMStochasticScheduler, {}),
    (IPNDMScheduler, {}),
    (SDEMultistepScheduler, {}),
]
IDS = [f"{cls.__name__}-{kw}" for cls, kw in CUSTOM]


def run_loop(scheduler, model, steps, seed=0, shape=(2, 1, 8, 8)):
    """The loop contract, verbatim: nothing here knows which scheduler it drives."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x, generator=g).prev_sample
    return x


class FakeEps(torch.nn.Module):
    """A smooth stand-in network: ε̂ = x·0.5 (the exact ε for data x₀ ~ N(0, c²) at some c)."""

    def forward(self, sample, timestep, class_labels=None):
        return type("Out", (), {"sample": 0.5 * sample})()


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_config_round_trip_gives_identical_steps(cls, kwargs, tmp_path):
    a = cls(**kwargs)
    a.save_pretrained(tmp_path)
    b = cls.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(a.config) == public(b.config)
    for s in (a, b):
        s.set_timesteps(4)
    assert torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(run_loop(a, FakeEps(), 4), run_loop(b, FakeEps(), 4))


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_from_ddpm_config_matches_the_ddpm_schedule(cls, kwargs):
    ddpm = DDPMScheduler(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule="scaled_linear")
    s = cls.from_config(ddpm.config, **kwargs)
    assert s.config.num_train_timesteps == 500
    assert s.config.beta_schedule == "scaled_linear"
    torch.testing.assert_close(s.alphas_cumprod, ddpm.alphas_cumprod, rtol=1e-5, atol=1e-7)
    s.set_timesteps(5)
    assert float(s.timesteps.max()) <= 499 + 1e-3 and float(s.timesteps.min()) >= 0


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_step_shapes_and_dict_vs_tuple(cls, kwargs):
    s = cls(**kwargs)
    s.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = s.timesteps[0]
    eps = 0.3 * x
    out = s.step(eps, t, x, generator=torch.Generator().manual_seed(5))
    s._step_index = None
    tup = s.step(eps, t, x, generator=torch.Generator().manual_seed(5), return_dict=False)
    assert out.prev_sample.shape == x.shape and out.pred_original_sample.shape == x.shape
    assert torch.equal(out.prev_sample, tup[0]) and torch.equal(out.pred_original_sample, tup[1])


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_seeded_determinism(cls, kwargs):
    a = run_loop(cls(**kwargs), FakeEps(), 4, seed=3)
    b = run_loop(cls(**kwargs), FakeEps(), 4, seed=3)
    c = run_loop(cls(**kwargs), FakeEps(), 4, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # a different seed starts from different noise


def test_stochastic_steps_use_only_the_generator():
    for cls in (AnnealedLangevinScheduler, VPSDEScheduler):
        s = cls()
        s.set_timesteps(3)
        x = torch.zeros(1, 1, 4, 4)
        t = s.timesteps[0]
        torch.manual_seed(0)
        a = s.step(torch.zeros_like(x), t, x, generator=torch.Generator().manual_seed(9)).prev_sample
        s._step_index = None
        torch.manual_seed(1)  # the global RNG must not matter
        b = s.step(torch.zeros_like(x), t, x, generator=torch.Generator().manual_seed(9)).prev_sample
        assert torch.equal(a, b) and a.abs().sum() > 0


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_step_past_the_end_is_an_error(cls, kwargs):
    s = cls(**kwargs)
    run_loop(s, FakeEps(), 3)
    with pytest.raises(IndexError):
        s.step(torch.zeros(2, 1, 8, 8), s.timesteps[-1], torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("cls", [AnnealedLangevinScheduler, VPSDEScheduler, ProbabilityFlowScheduler,
                                 EDMStochasticScheduler, IPNDMScheduler, AdaptiveSDEScheduler, SDEMultistepScheduler])
@pytest.mark.parametrize("bad", [0, -3, 2.5, 10**7])
def test_bad_step_counts_are_rejected(cls, bad):
    with pytest.raises((ValueError, TypeError)):
        cls().set_timesteps(bad)


def test_langevin_budget_and_levels():
    s = AnnealedLangevinScheduler(steps_per_level=4)
    for L in (2, 3, 7, 100):
        s.set_timesteps(L)
        assert len(s.timesteps) == L * 4 + 1  # K steps per level + the final denoising step
        sigmas = s.sigmas.unique()
        assert len(sigmas) == L
        # the levels always span sigma_max → sigma_min: never stop early at a large σ
        assert math.isclose(float(s.sigmas[0]), s.init_noise_sigma, rel_tol=1e-9)
        assert math.isclose(float(s.sigmas[-1]), s.schedule.sigma_min, rel_tol=1e-6)
        assert torch.all(s.sigmas[1:] <= s.sigmas[:-1])
        # each timestep label stands for its level's σ in the DDPM schedule
        torch.testing.assert_close(s.schedule.t_to_sigma(s.timesteps.double()), s.sigmas, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="at least 2"):
        s.set_timesteps(1)


def test_langevin_rejects_a_diverging_step_size():
    s = AnnealedLangevinScheduler(step_size=1e-3)  # ε/σ_L² = 10
    with pytest.raises(ValueError, match="diverges"):
        s.set_timesteps(10)


def test_sde_and_ode_budgets():
    s = VPSDEScheduler(corrector_steps=2)
    s.set_timesteps(10)
    assert len(s.timesteps) == 30
    assert torch.allclose(s.dts, torch.full((10,), -(1 - 1e-3) / 10, dtype=torch.float64))  # the uniform grid's Δt
    h = ProbabilityFlowScheduler(solver="heun")
    h.set_timesteps(10)
    assert len(h.timesteps) == 21  # 2 per Heun step + the final denoising evaluation at t_ε
    assert math.isclose(float(h.times[0]), 1.0) and math.isclose(float(h.times[-1]), 1e-3)
    e = ProbabilityFlowScheduler(solver="euler", final_denoise=False)
    e.set_timesteps(10)
    assert len(e.timesteps) == 10


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_loop_contract_on_a_real_unet(name, tiny_vp_unet):
    """Every registered sampler runs the verbatim loop on an ε-prediction UNet2DModel."""
    scheduler, step_kwargs = create_scheduler(name, dict(DDPMScheduler().config))
    assert not step_kwargs or name == "ddim"
    steps = SAMPLERS[name].min_steps + 1
    x = run_loop(scheduler, torch.no_grad()(tiny_vp_unet), steps)
    assert x.shape == (2, 1, 8, 8)
    assert torch.isfinite(x).all()


def test_registry_entries_are_complete():
    for name, spec in SAMPLERS.items():
        assert spec.description and spec.default_steps > 0 and spec.title
        s, _ = create_scheduler(name)
        s.set_timesteps(spec.default_steps)
        assert len(s.timesteps) >= 1
    assert {"ddpm", "ddim", "dpmsolver++", "langevin", "vp_sde", "pf_ode"} <= set(SAMPLERS)


def test_registry_rejects_parameters_that_do_not_apply():
    with pytest.raises(ValueError, match="does not apply"):
        create_scheduler("langevin", params={"eta": 0.5})
    with pytest.raises(ValueError, match="between"):
        create_scheduler("ddim", params={"eta": 3.0})
    with pytest.raises(ValueError, match="unknown sampler"):
        create_scheduler("euler-a")


@pytest.mark.parametrize("sample_max_value", [1.0, 1.5])
def test_clipped_dpmsolver_matches_diffusers(sample_max_value):
    """The registry's DPM-Solver++ skips the quantile only where it cannot change the result."""
    from diffusers import DPMSolverMultistepScheduler

    from schedulers.scheduling_dpmsolver_clipped import ClippedDPMSolverMultistepScheduler

    config = dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True, thresholding=True,
                  sample_max_value=sample_max_value)
    ours, theirs = ClippedDPMSolverMultistepScheduler(**config), DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(12)
    theirs.set_timesteps(12)
    torch.manual_seed(0)
    x_ours = x_theirs = torch.randn(4, 1, 8, 8) * ours.init_noise_sigma
    clipped = 0
    for t in ours.timesteps:
        model_output = torch.randn(4, 1, 8, 8) * 1.5  # loud enough that x̂₀ leaves [-1, 1]
        a, b = ours.step(model_output, t, x_ours), theirs.step(model_output, t, x_theirs)
        x_ours, x_theirs = a.prev_sample, b.prev_sample
        clipped += int((ours.model_outputs[-1].abs() >= 1).any())
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-6, atol=1e-6)
    assert clipped > 0  # the clipping path really ran
