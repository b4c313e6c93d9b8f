"""Every sampler, driven by the exact score of a Gaussian mixture, reproduces the mixture.

Data: x₀ ~ 0.2 N(μ₁, 0.10²I) + 0.5 N(μ₂, 0.20²I) + 0.3 N(μ₃, 0.15²I) in 2-D (unequal weights
and widths), exposed as a VP ε-network (fed DDPM timestep labels) and as a VE score network
(fed σ, trained range σ ∈ [0.01, 50] — a different schedule from the VP one). Each sampler runs
at its registry default budget through the one pipeline, and the samples' mode weights,
per-mode means and per-mode widths are compared with the truth.

Tolerances, with N = 6000 samples:
- weights ±0.03: the standard error of a weight is √(w(1−w)/N) ≤ 0.0065, so 0.03 is ~5 s.e.;
- means ±0.03: s.e. ≤ 0.2/√(0.2 N) ≈ 0.006; leaves room for a small discretisation bias;
- width ratio (sample std / true std) in [0.88, 1.12]: the s.e. of a std from ≥ 1200 samples in
  2-D is ≤ 1.5 %; diffusers' DDPMScheduler at 1000 steps, the yardstick, is itself off by up
  to 4 % on these widths (the discrete schedule is coarse at σ ≈ 0.01), and deterministic
  few-step samplers are known to be under-dispersed (docs/exact-scores.md).
Mutants with a wrong sign, a wrong Δt or a missing √2 leave at least one of these bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.analytic import GaussianMixtureNet
from pipelines.sampling import SamplerPipeline, SamplingDivergedError
from schedulers import SAMPLERS, AnnealedLangevinScheduler, ProbabilityFlowScheduler, VPSDEScheduler
from schedulers import registry
from schedulers.schedules import DiscreteVPSchedule, linear_betas_for_sigma_range

WEIGHTS = [0.2, 0.5, 0.3]
MEANS = [[-0.6, -0.3], [0.5, 0.4], [0.1, -0.7]]
STDS = [0.10, 0.20, 0.15]
N = 6000
TOL_WEIGHT, TOL_MEAN, TOL_WIDTH = 0.03, 0.03, 0.12


def make_pipeline(family: str) -> tuple[SamplerPipeline, GaussianMixtureNet]:
    schedule = None if family == "vp" else DiscreteVPSchedule(**dict(zip(("beta_start", "beta_end"), linear_betas_for_sigma_range(0.01, 50.0))))
    net = GaussianMixtureNet(WEIGHTS, MEANS, STDS, family=family, schedule=schedule)
    return SamplerPipeline(net, net.model_family(), sample_shape=(2, 1, 1)), net


def sample_stats(family: str, name: str, steps=None, params=None, n=N, seed=0) -> dict:
    pipe, net = make_pipeline(family)
    params = dict(params or {})
    for key in ("clip_sample", "thresholding"):
        if key in SAMPLERS[name].defaults():
            params[key] = False  # mixture data is not confined to [-1, 1]
    out = pipe(name, num_inference_steps=steps, scheduler_params=params, batch_size=n, seed=seed,
               output_type="pt", dtype=torch.float64)
    return net.statistics(out.images)


def violations(stats: dict) -> list[str]:
    """The bounds a sample set leaves (empty when it reproduces the mixture)."""
    bad = []
    for k, (w, mu, s) in enumerate(zip(WEIGHTS, MEANS, STDS)):
        got_w = float(stats["weights"][k])
        if abs(got_w - w) > TOL_WEIGHT:
            bad.append(f"mode {k}: weight {got_w:.3f} vs {w}")
        err = float((stats["means"][k] - torch.tensor(mu, dtype=torch.float64)).norm())
        if not err <= TOL_MEAN:
            bad.append(f"mode {k}: mean off by {err:.3f}")
        ratio = float(stats["stds"][k]) / s
        if not abs(ratio - 1) <= TOL_WIDTH:
            bad.append(f"mode {k}: width ratio {ratio:.3f}")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vp", "ve"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_reproduces_the_mixture_at_its_default_budget(family, name):
    stats = sample_stats(family, name)
    assert violations(stats) == [], f"{name} on the {family.upper()} network"


def test_the_exact_samples_pass_and_a_wrong_mixture_fails():
    """The checker itself: exact draws pass; a mixture with swapped weights does not."""
    _, net = make_pipeline("vp")
    assert violations(net.statistics(net.sample(N, torch.Generator().manual_seed(0)))) == []
    wrong = GaussianMixtureNet([0.5, 0.2, 0.3], MEANS, STDS)
    assert violations(net.statistics(wrong.sample(N, torch.Generator().manual_seed(0)))) != []


# ---- mutants: each carries one classic mistake and must be caught ----

class LangevinMissingSqrt2(AnnealedLangevinScheduler):
    """x ← x + α s + √α z instead of √(2α) z."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        i = self._current_index(timestep)
        out = super().step(model_output, timestep, sample, generator=generator)
        if not (self.config.final_denoise and i == len(self.timesteps) - 1):
            sigma_i, step_size_i = float(self.sigmas[i]), float(self.step_sizes[i])
            score = (out.pred_original_sample - sample) / sigma_i**2
            noise = out.prev_sample - sample - step_size_i * score
            out.prev_sample = sample + step_size_i * score + noise / math.sqrt(2)
        return out


class LangevinWrongSign(AnnealedLangevinScheduler):
    """Ascends −log p: the score's sign flipped."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(-model_output, timestep, sample, generator=generator, return_dict=return_dict)


class EulerMaruyamaHalfDt(VPSDEScheduler):
    """Δt_i halved: integrates only half-way to t_ε."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._dt = [dt / 2 for dt in self._dt]


class EulerMaruyamaWrongSign(VPSDEScheduler):
    """The score enters the reverse drift with the wrong sign."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(-model_output, timestep, sample, generator=generator, return_dict=return_dict)


class ProbabilityFlowFullG2(ProbabilityFlowScheduler):
    """Drift f − g² s (the SDE's) without its noise, instead of f − ½ g² s."""

    def _drift(self, model_output, sample, i):
        drift, x0 = super()._drift(model_output, sample, i)
        beta_t = self._beta[i]
        return 2 * drift + 0.5 * beta_t * sample, x0


MUTANTS = {
    "langevin": [LangevinMissingSqrt2, LangevinWrongSign],
    "vp_sde": [EulerMaruyamaHalfDt, EulerMaruyamaWrongSign],
    "pf_ode": [ProbabilityFlowFullG2],
}


@pytest.mark.slow
@pytest.mark.parametrize("name,mutant", [(n, m) for n, ms in MUTANTS.items() for m in ms],
                         ids=lambda v: getattr(v, "__name__", v))
def test_mutants_fail(name, mutant, monkeypatch):
    spec = SAMPLERS[name]
    monkeypatch.setitem(registry.SAMPLERS, name, registry.SamplerSpec(**{**spec.__dict__, "scheduler_cls": mutant}))
    try:
        stats = sample_stats("vp", name, n=3000)
    except SamplingDivergedError:
        return  # caught by the pipeline: fine
    assert violations(stats) != [], f"{mutant.__name__} passed the exact-score checks"
