"""The custom schedulers against the behaviours diffusers' ``SchedulerCommonTest`` checks for its own:
config save/load and ``from_config`` between compatible classes, ``compatibles``, a step on every
timestep and from any starting entry, ``scale_model_input`` before and after ``set_timesteps``,
``add_noise``, seeded determinism, every beta schedule, ``order``, and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils import DummyObject

from schedulers import AnnealedLangevinScheduler, ProbabilityFlowScheduler, VPSDEScheduler
from schedulers.base import VEStateMixin
from schedulers.scheduling_adaptive_sde import AdaptiveSDEScheduler
from schedulers.scheduling_dpmsolver_clipped import ClippedDPMSolverMultistepScheduler
from schedulers.scheduling_edm import EDMStochasticScheduler
from schedulers.scheduling_ipndm import IPNDMScheduler
from schedulers.scheduling_sde_multistep import SDEMultistepScheduler

CUSTOM = [
    (AnnealedLangevinScheduler, {}),
    (AnnealedLangevinScheduler, {"final_denoise": False, "steps_per_level": 2, "step_size": 2e-5}),
    (VPSDEScheduler, {}),
    (VPSDEScheduler, {"corrector_steps": 2, "snr": 0.2}),
    (ProbabilityFlowScheduler, {"solver": "heun"}),
    (ProbabilityFlowScheduler, {"solver": "heun", "final_denoise": False}),
    (ProbabilityFlowScheduler, {"solver": "euler", "clip_sample": True}),
    (VPSDEScheduler, {"time_grid": "karras"}),
    (ProbabilityFlowScheduler, {"solver": "heun", "time_grid": "log_snr"}),
    (ProbabilityFlowScheduler, {"solver": "heun", "time_grid": "karras", "variable": "sigma", "clip_sample": True}),
    (AnnealedLangevinScheduler, {"time_grid": "uniform", "delta": 0.3}),
    (EDMStochasticScheduler, {}),
    (EDMStochasticScheduler, {"s_churn": 0.0, "time_grid": "log_snr", "clip_sample": True}),
    (IPNDMScheduler, {}),
    (IPNDMScheduler, {"max_order": 4, "time_grid": "karras"}),
    (SDEMultistepScheduler, {}),
    (SDEMultistepScheduler, {"eta": 0.0, "time_grid": "log_snr", "clip_sample": True}),
]
IDS = [f"{cls.__name__}-{kw}" for cls, kw in CUSTOM]
ALL = CUSTOM + [(ClippedDPMSolverMultistepScheduler, {"thresholding": True, "sample_max_value": 0.8}),
                (AdaptiveSDEScheduler, {"rtol": 0.1})]
ALL_IDS = IDS + ["ClippedDPMSolver", "AdaptiveSDE"]
STOCHASTIC = (AnnealedLangevinScheduler, VPSDEScheduler, EDMStochasticScheduler, AdaptiveSDEScheduler, SDEMultistepScheduler)
LAB_CLASSES = {AnnealedLangevinScheduler, VPSDEScheduler, ProbabilityFlowScheduler, ClippedDPMSolverMultistepScheduler,
               EDMStochasticScheduler, IPNDMScheduler, AdaptiveSDEScheduler, SDEMultistepScheduler}
BETA_SCHEDULES = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {},
}
SHAPE = (2, 1, 4, 4)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # inside diffusers' KDPM2


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth stand-in ε-network (exact for Gaussian data of some width)."""
    return 0.5 * x


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(scheduler, x: torch.Tensor, timesteps=None, seed: int = 0) -> torch.Tensor:
    """The loop contract from ``x`` over ``timesteps`` (default: all of them)."""
    g = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps if timesteps is None else timesteps:
        x = scheduler.step(fake_eps(scheduler.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    return x


def sample(scheduler, steps: int = 3, seed: int = 0, noise_seed: int = 1) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    return run(scheduler, randn(noise_seed) * scheduler.init_noise_sigma, seed=seed)


def concrete(classes) -> list:
    """The classes that can be built here (diffusers lists placeholders for missing extras)."""
    return [c for c in classes if not isinstance(c, DummyObject)]


# ---- configs ----

@pytest.mark.parametrize("cls,kwargs", ALL, ids=ALL_IDS)
def test_save_pretrained_from_pretrained_round_trip(cls, kwargs, tmp_path):
    s = cls(**kwargs, trained_betas=np.linspace(1e-4, 0.05, 50).tolist())
    s.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    config = dict(s.config)
    config.pop("_use_default_values", None)
    assert config == dict(loaded.config)  # as diffusers' test_from_pretrained
    assert s.betas.tolist() == loaded.betas.tolist()
    if cls is not ClippedDPMSolverMultistepScheduler:
        assert torch.equal(sample(s), sample(loaded))


@pytest.mark.parametrize("cls,kwargs", ALL, ids=ALL_IDS)
def test_compatibles_list_the_ddpm_family_and_our_classes(cls, kwargs):
    names = {c.__name__ for c in cls(**kwargs).compatibles}
    assert {"DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"} <= names
    assert {c.__name__ for c in LAB_CLASSES} <= names  # including itself


@pytest.mark.parametrize("cls,kwargs", ALL, ids=ALL_IDS)
def test_from_config_to_every_compatible_class_and_back(cls, kwargs):
    """Each compatible class builds from our config with our DDPM schedule, and our keys survive the trip."""
    s = cls(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule="scaled_linear", **kwargs)
    others = concrete(s.compatibles)
    assert len(others) >= 10
    for other_cls in others:
        other = other_cls.from_config(s.config)
        assert type(other) is other_cls
        if hasattr(other, "alphas_cumprod"):
            torch.testing.assert_close(other.alphas_cumprod.float(), s.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
        back = cls.from_config(other.config)
        assert public(back.config) == public(s.config), other_cls.__name__
        if cls is not ClippedDPMSolverMultistepScheduler:
            assert torch.equal(sample(back), sample(s))


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_built_from_a_diffusers_ddpm_config_and_handed_back(cls, kwargs):
    ddpm = DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ours = cls.from_config(ddpm.config, **kwargs)
    torch.testing.assert_close(ours.alphas_cumprod, ddpm.alphas_cumprod, rtol=1e-5, atol=1e-7)
    for diffusers_cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        theirs = diffusers_cls.from_config(ours.config)
        assert theirs.config.num_train_timesteps == 300 and theirs.config.beta_schedule == "squaredcos_cap_v2"


# ---- stepping ----

@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULES))
@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_every_timestep_steps_to_a_finite_sample_for_every_beta_schedule(cls, kwargs, beta_schedule):
    s = cls(beta_schedule=beta_schedule, **BETA_SCHEDULES[beta_schedule], **kwargs)
    for steps in (2, 5):
        s.set_timesteps(steps)
        x = randn(1) * s.init_noise_sigma
        out = run(s, x)
        assert out.shape == x.shape
        assert torch.isfinite(out).all(), f"{beta_schedule}, {steps} steps"
        assert s.step_index == len(s.timesteps)
        assert not torch.equal(out, x)


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULES))
def test_pc_corrector_uses_the_discrete_alpha_of_the_label(beta_schedule):
    """score_sde's corrector: step size 2α(r‖z‖/‖s‖)² with α = 1 − β of the DDPM schedule at the label."""
    s = VPSDEScheduler(beta_schedule=beta_schedule, **BETA_SCHEDULES[beta_schedule], corrector_steps=1, snr=0.16)
    s.set_timesteps(4)
    x = randn(2)
    alphas = s.schedule.alphas
    for entry in (0, 2):  # t = 1 (label 999, where the cosine β is 0.999) and t_1 (a fractional label)
        label = float(s.sde.label(s.times[entry]))
        lo = math.floor(label)
        w = label - lo
        alpha = float(alphas[lo]) if w == 0 else (1 - w) * float(alphas[lo]) + w * float(alphas[lo + 1])
        assert 0 < alpha < 1
        s.set_timesteps(4)
        s.set_begin_index(entry)
        out = s.step(fake_eps(x, None), s.timesteps[entry], x, generator=torch.Generator().manual_seed(3)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        score = -fake_eps(x, None) / float(s.sde.std(s.times[entry]))
        step_size = 2 * alpha * (0.16 * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()) ** 2
        torch.testing.assert_close(out, x + step_size * score + (2 * step_size).sqrt() * z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_a_loop_can_start_at_any_entry(cls, kwargs):
    """img2img: noise to timesteps[k], then ``for t in timesteps[k:]``, for every k."""
    s = cls(**kwargs)
    s.set_timesteps(3)
    n, order = len(s.timesteps), s.order
    x0, noise = randn(5).clamp(-1, 1), randn(6)
    results, exact = {}, {}
    for k in range(n):
        s.set_timesteps(3)
        x = s.add_noise(x0, noise, s.timesteps[k : k + 1].expand(SHAPE[0]))
        results[k] = run(s, x, s.timesteps[k:])
        assert torch.isfinite(results[k]).all(), k
        s.set_timesteps(3)
        s.set_begin_index(k)  # what diffusers' img2img pipelines call: starts exactly at entry k
        exact[k] = run(s, x, s.timesteps[k:])
        assert s.step_index == n and torch.isfinite(exact[k]).all(), k
    for t_start in range(s.num_inference_steps):  # where pipelines start: timesteps[t_start * order:]
        assert torch.equal(results[t_start * order], exact[t_start * order]), t_start
    if cls is ProbabilityFlowScheduler and s.config.solver == "heun":
        for k in range(1, n - 1, 2):  # a second-stage entry: same sample as from the next entry
            x = s.add_noise(x0, noise, s.timesteps[k : k + 1].expand(SHAPE[0]))
            s.set_timesteps(3)
            from_next = run(s, x, s.timesteps[k + 1 :])
            assert torch.equal(results[k], from_next), k
            assert torch.equal(exact[k], from_next), k


def test_heun_loop_starting_on_a_second_stage_takes_it_as_a_no_op():
    s = ProbabilityFlowScheduler(solver="heun")
    s.set_timesteps(3)
    s.set_begin_index(1)
    x = randn(0)
    out = s.step(fake_eps(x, None), s.timesteps[1], x)
    assert torch.equal(out.prev_sample, x) and out.pred_original_sample is not None
    nxt = s.step(fake_eps(x, None), s.timesteps[2], x).prev_sample  # the first stage of the next step
    assert not torch.equal(nxt, x) and s.step_index == 3


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_seeded_determinism(cls, kwargs):
    a = sample(cls(**kwargs), seed=3)
    b = sample(cls(**kwargs), seed=3)
    c = sample(cls(**kwargs), seed=4)  # same starting noise, different step noise
    assert torch.equal(a, b)
    deterministic = kwargs.get("s_churn") == 0.0 or kwargs.get("eta") == 0.0  # EDM's Algorithm 1; the ODE
    assert torch.equal(a, c) == (cls not in STOCHASTIC or deterministic)


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_an_unknown_timestep_is_an_error(cls, kwargs):
    s = cls(**kwargs)
    s.set_timesteps(3)
    x = randn(0)
    between = 0.5 * float(s.timesteps[0] + s.timesteps[-1])
    if bool((s.timesteps - between).abs().min() < 1e-3):
        between += 0.37
    for bad in (12345.0, between):
        with pytest.raises(ValueError, match=r"timestep .* not one of .*timesteps holds \d+ labels from"):
            s.step(fake_eps(x, bad), bad, x)
        assert s.step_index is None
    s.set_begin_index(1)
    with pytest.raises(ValueError, match="set_begin_index"):
        s.step(fake_eps(x, None), s.timesteps[-1] + 7, x)


# ---- scale_model_input, add_noise ----

def test_langevin_scale_model_input_follows_the_timestep_before_and_after_set_timesteps():
    s = AnnealedLangevinScheduler()
    x = randn(0)
    for label in (0.0, 250.5, 999.0):  # before set_timesteps: the schedule's σ of the label
        sigma = float(s.schedule.t_to_sigma(label))
        torch.testing.assert_close(s.scale_model_input(x, label), x / math.sqrt(1 + sigma**2))
    s.set_timesteps(4)
    for j in reversed(range(len(s.timesteps))):  # any order: the timestep decides, not the step counter
        sigma = float(s.sigmas[j])
        torch.testing.assert_close(s.scale_model_input(x, s.timesteps[j]), x / math.sqrt(1 + sigma**2))
    assert s.step_index is None  # scaling does not start the loop
    label = 0.5 * float(s.timesteps[0] + s.timesteps[-1])  # not an entry: the schedule's σ
    sigma = float(s.schedule.t_to_sigma(label))
    torch.testing.assert_close(s.scale_model_input(x, label), x / math.sqrt(1 + sigma**2))
    labels = s.timesteps[[0, -1]]  # one timestep per sample
    scaled = s.scale_model_input(x, labels)
    for b in range(2):
        torch.testing.assert_close(scaled[b], x[b] / math.sqrt(1 + float(s.sigmas[[0, -1][b]]) ** 2))


@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_scale_model_input_before_and_after_set_timesteps(cls, kwargs):
    s = cls(**kwargs)
    x = randn(0)
    before = s.scale_model_input(x, 0.0)
    assert before.shape == x.shape and torch.isfinite(before).all()
    s.set_timesteps(3)
    after = s.scale_model_input(x, s.timesteps[0])
    if issubclass(cls, VEStateMixin):  # VE state: the first entry's σ (EDM: t̂_0, possibly churned)
        torch.testing.assert_close(after, x / math.sqrt(1 + float(s.sigmas[0]) ** 2))
    else:
        assert torch.equal(before, x) and torch.equal(after, x)  # the VP state is the network's input


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULES))
@pytest.mark.parametrize("cls,kwargs", CUSTOM, ids=IDS)
def test_add_noise_is_the_forward_marginal_of_the_ddpm_schedule(cls, kwargs, beta_schedule):
    """At integer labels, add_noise matches DDPMScheduler.add_noise (VE: up to the VP scale √ᾱ)."""
    config = dict(beta_schedule=beta_schedule, **BETA_SCHEDULES[beta_schedule])
    s, ddpm = cls(**config, **kwargs), DDPMScheduler(**config)
    x0, noise = randn(0, (4, 1, 3, 3)).double(), randn(1, (4, 1, 3, 3)).double()
    labels = torch.tensor([0, 10, 500, 999])
    noisy = s.add_noise(x0, noise, labels)
    assert noisy.shape == x0.shape
    reference = ddpm.add_noise(x0, noise, labels)
    if issubclass(cls, VEStateMixin):
        noisy = noisy * ddpm.alphas_cumprod[labels].double().sqrt()[:, None, None, None]  # x_t = √ᾱ x̃
    elif beta_schedule == "linear":  # the continuous VP-SDE of Song et al.: ᾱ up to a few per cent
        torch.testing.assert_close(noisy, reference, rtol=0, atol=0.05)
        return
    torch.testing.assert_close(noisy, reference, rtol=1e-5, atol=1e-5)
    s.set_timesteps(10)
    assert s.add_noise(x0, noise, s.timesteps[5][None]).shape == x0.shape  # as diffusers' test_add_noise_device


# ---- order, bad arguments ----

@pytest.mark.parametrize("cls,kwargs,order,extra", [
    (ProbabilityFlowScheduler, {"solver": "heun"}, 2, 1),
    (ProbabilityFlowScheduler, {"solver": "euler"}, 1, 1),
    (ProbabilityFlowScheduler, {"solver": "euler", "final_denoise": False}, 1, 0),
    (VPSDEScheduler, {}, 1, 0),
    (VPSDEScheduler, {"corrector_steps": 2}, 3, 0),
    (AnnealedLangevinScheduler, {"steps_per_level": 4}, 4, 1),
    (AnnealedLangevinScheduler, {"steps_per_level": 1, "final_denoise": False}, 1, 0),
    (EDMStochasticScheduler, {}, 2, -1),
    (IPNDMScheduler, {}, 1, 0),
    (SDEMultistepScheduler, {}, 1, 0),
])
def test_order_is_the_number_of_entries_per_step(cls, kwargs, order, extra):
    """diffusers' pipelines take ``timesteps[t_start * order:]`` and count progress in steps of ``order``."""
    s = cls(**kwargs)
    assert s.order == order
    s.set_timesteps(5)
    assert len(s.timesteps) == 5 * order + extra
    assert cls.from_config(s.config).order == order


def test_switching_solver_through_from_config_switches_order():
    heun = ProbabilityFlowScheduler(solver="heun")
    euler = ProbabilityFlowScheduler.from_config(heun.config, solver="euler")
    assert (heun.order, euler.order) == (2, 1)


@pytest.mark.parametrize("cls,kwargs", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("bad", [0, -1, -50])
def test_set_timesteps_rejects_non_positive_counts(cls, kwargs, bad):
    with pytest.raises(ValueError, match=rf"num_inference_steps.* must be at least \d+, got {bad}"):
        cls(**kwargs).set_timesteps(bad)


# ---- DPM-Solver++ with the quantile skipped ----

@pytest.mark.parametrize("sample_max_value", [0.5, 1.0, 2.0])
def test_clipped_dpmsolver_equals_diffusers(sample_max_value):
    config = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True, "thresholding": True,
              "sample_max_value": sample_max_value}
    ours, theirs = ClippedDPMSolverMultistepScheduler(**config), DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    g = torch.Generator().manual_seed(0)
    x_ours = x_theirs = torch.randn(4, 1, 8, 8, generator=g) * ours.init_noise_sigma
    thresholded = 0
    for t in ours.timesteps:
        model_output = torch.randn(4, 1, 8, 8, generator=g) * 1.5  # loud: x̂₀ leaves [-1, 1]
        a, b = ours.step(model_output, t, x_ours), theirs.step(model_output, t, x_theirs)
        x_ours, x_theirs = a.prev_sample, b.prev_sample
        thresholded += int((ours.model_outputs[-1].abs() >= min(1.0, sample_max_value) * 0.999).any())
        assert torch.equal(x_ours, x_theirs)
    assert thresholded > 0


@pytest.mark.parametrize("sample_max_value", [0.25, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clipped_threshold_equals_diffusers_threshold(sample_max_value, dtype):
    x = (torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    x[2, 0, 0, 0] = float("nan")  # a NaN makes diffusers' whole image NaN
    kw = {"thresholding": True, "sample_max_value": sample_max_value}
    ours = ClippedDPMSolverMultistepScheduler(**kw)._threshold_sample(x.clone())
    theirs = DPMSolverMultistepScheduler(**kw)._threshold_sample(x.clone())
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours.nan_to_num(9.0), theirs.nan_to_num(9.0))
    assert float(ours[:2].abs().max()) <= 1.0
