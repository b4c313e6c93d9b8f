"""DPM-Solver++ at many steps: diffusers starts a loop whose first label repeats one entry late and
runs past σ = 0 (docs/samplers.md#dpm-solver-2m); the registry's subclass starts it at entry 0, and the
registry refuses more steps than the checkpoint's T with a message."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from pipelines.analytic import GaussianMixtureNet
from pipelines.sampling import SamplerPipeline
from schedulers.registry import SAMPLERS, create_scheduler
from schedulers.schedules import DiscreteVPSchedule

MEANS, STDS = [[-0.6, -0.3], [0.5, 0.4]], [0.1, 0.2]
COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
LINEAR_2000 = {"num_train_timesteps": 2000, "beta_start": 5e-5, "beta_end": 0.01, "beta_schedule": "linear"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pipeline(config):
    schedule = DiscreteVPSchedule.from_config(config)
    net = GaussianMixtureNet([0.4, 0.6], MEANS, STDS, family="vp", schedule=schedule)
    return SamplerPipeline(net, net.model_family(), sampler_config=config, sample_shape=(2, 1, 1)), net


def loop(scheduler, net_eps, steps):
    scheduler.set_timesteps(steps)
    x = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("config,steps", [(COSINE, 100), (COSINE, 1000), (LINEAR_2000, 2000)])
def test_many_steps_stay_finite_and_reproduce_the_data(config, steps):
    pipe, net = pipeline(config)
    scheduler, _ = create_scheduler("dpmsolver++", config, {"thresholding": False})
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps[0] == scheduler.timesteps[1] or config is LINEAR_2000  # the label that repeats
    out = pipe("dpmsolver++", steps, {"thresholding": False}, batch_size=400, seed=0, output_type="pt",
               dtype=torch.float64)
    assert out.nfe == steps and torch.isfinite(out.images).all()
    stats = net.statistics(out.images)
    assert (stats["weights"] - torch.tensor([0.4, 0.6], dtype=torch.float64)).abs().max() < 0.08
    assert ((stats["stds"] / torch.tensor(STDS, dtype=torch.float64)) - 1).abs().max() < 0.25


def test_diffusers_own_class_fails_where_the_subclass_does_not():
    """The bug the subclass mends: diffusers' start index on a repeated first label (cosine schedule)."""
    pipe, _ = pipeline(COSINE)
    from schedulers.parametrization import EpsilonNetwork

    net_eps = EpsilonNetwork(pipe.unet, pipe.family, pipe.schedule)
    config = dict(COSINE, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
    with pytest.raises(IndexError):
        loop(DPMSolverMultistepScheduler(**config), net_eps, 10)
    theirs = DPMSolverMultistepScheduler(**config)
    ours, _ = create_scheduler("dpmsolver++", COSINE, {"thresholding": False})
    theirs.set_timesteps(10)
    theirs.set_begin_index(0)  # started explicitly at entry 0, diffusers' class runs as ours does by itself
    x = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * theirs.init_noise_sigma
    y = x.clone()
    ours.set_timesteps(10)
    for t in theirs.timesteps:
        x = theirs.step(net_eps(x, t), t, x).prev_sample
        y = ours.step(net_eps(y, t), t, y).prev_sample
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("config", [{}, COSINE])
def test_more_steps_than_T_are_refused_with_a_message(config):
    spec = SAMPLERS["dpmsolver++"]
    assert spec.check_steps(1000, config) == 1000
    with pytest.raises(ValueError, match=r"between 1 and 1000 \(the checkpoint's T = 1000 training timesteps\), got 2000"):
        spec.check_steps(2000, config)
    pipe, _ = pipeline({"num_train_timesteps": 1000, **config})
    with pytest.raises(ValueError, match="T = 1000"):
        pipe("dpmsolver++", 2000, batch_size=1, seed=0)


def test_a_start_inside_the_schedule_keeps_diffusers_rule():
    scheduler, _ = create_scheduler("dpmsolver++", COSINE, {"thresholding": False})
    scheduler.set_timesteps(50)
    labels = scheduler.timesteps
    assert scheduler.index_for_timestep(labels[0]) == 0
    k = next(i for i in range(1, len(labels) - 1) if labels[i] == labels[i + 1] and labels[i] != labels[0])
    assert scheduler.index_for_timestep(labels[k]) == k + 1  # diffusers: the second entry of a repeated label
