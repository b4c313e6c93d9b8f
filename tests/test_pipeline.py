"""The one sampling pipeline: both checkpoint families from disk, every sampler on each,
conditioning and guidance, callbacks, determinism, concurrency and clear errors."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from pipelines import CheckpointError, SamplerPipeline, SamplingCancelled, SamplingDivergedError, inspect_checkpoint
from pipelines.analytic import FiniteSetNet
from pipelines.checkpoint import save_checkpoint
from schedulers import SAMPLERS
from schedulers.parametrization import EpsilonNetwork, ModelFamily
from schedulers.schedules import DiscreteVPSchedule
from tests.conftest import tiny_unet


def fast(name):
    """A cheap step count the sampler accepts (from the registry's own limit)."""
    return max(SAMPLERS[name].min_steps, 2) if SAMPLERS[name].min_steps > 1 else 3


def test_inspect_recognises_both_published_layouts(ddpm_checkpoint, ncsnpp_checkpoint):
    vp = inspect_checkpoint(str(ddpm_checkpoint))
    assert vp.family.kind == "vp" and vp.family.prediction_type == "epsilon"
    assert vp.sample_size == 8 and vp.in_channels == 1 and not vp.family.is_conditional
    ve = inspect_checkpoint(str(ncsnpp_checkpoint))
    assert ve.family.kind == "ve" and ve.family.prediction_type == "score"
    assert ve.family.data_range == (0.0, 1.0)  # diffusers' NCSN++ checkpoints work on [0, 1] pixels
    # the samplers' schedule spans the network's σ range in [-1, 1] pixels: 2 × [0.01, 50]
    sched = DiscreteVPSchedule.from_config(ve.sampler_config)
    assert sched.sigma_min == pytest.approx(0.02, rel=1e-6) and sched.sigma_max == pytest.approx(100.0, rel=1e-4)
    assert "VP" in vp.describe() and "VE" in ve.describe()


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("which", ["ddpm_checkpoint", "ncsnpp_checkpoint"])
def test_every_sampler_runs_on_both_families(name, which, request):
    pipe = SamplerPipeline.from_pretrained(str(request.getfixturevalue(which)))
    out = pipe(name, num_inference_steps=fast(name), batch_size=2, seed=0, output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    assert np.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    scheduler, _, _ = pipe.prepare(name, fast(name), None)
    assert out.nfe == len(scheduler.timesteps)


def test_ve_network_sees_sigma_and_its_own_pixel_range(ncsnpp_checkpoint):
    """The adapter feeds a [0, 1] NCSN++ network x' = (x̃+1)/2 and σ' = σ/2 (its own units)."""
    info = inspect_checkpoint(str(ncsnpp_checkpoint))
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None):
            seen["sample"], seen["timestep"] = sample, timestep
            return type("O", (), {"sample": torch.zeros_like(sample)})()

    sched = DiscreteVPSchedule.from_config(info.sampler_config)
    net = EpsilonNetwork(Spy(), info.family, sched)
    t = torch.tensor(400.0)
    sigma = float(sched.t_to_sigma(t))
    x_t = torch.full((1, 1, 2, 2), 0.3)
    net(x_t, t)
    x_tilde = 0.3 * (1 + sigma**2) ** 0.5
    assert float(seen["timestep"]) == pytest.approx(sigma / 2, rel=1e-5)
    assert float(seen["sample"].flatten()[0]) == pytest.approx((x_tilde + 1) / 2, rel=1e-5)


def test_unit_variance_input_scaling_feeds_the_vp_state():
    """This project's NCSN (pixels in [-1, 1], c_in = 1/√(1+σ²)) sees x̃/√(1+σ²) = x_t and σ."""
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None):
            seen["sample"], seen["timestep"] = sample, timestep
            return type("O", (), {"sample": -sample / timestep.view(-1, 1, 1, 1)})()

    family = ModelFamily(kind="ve", prediction_type="score", data_range=(-1.0, 1.0), sigma_min=0.01, sigma_max=50.0,
                         input_scaling="unit_variance")
    pipe = SamplerPipeline(Spy(), family, sample_shape=(1, 2, 2))
    net = EpsilonNetwork(pipe.unet, family, pipe.schedule)
    x_t = torch.full((1, 1, 2, 2), 0.3)
    t = torch.tensor(700.0)
    eps = net(x_t, t)
    sigma = float(pipe.schedule.t_to_sigma(t))
    torch.testing.assert_close(seen["sample"], x_t)
    assert float(seen["timestep"]) == pytest.approx(sigma, rel=1e-5)
    # score = -x_t/σ  ⇒  ε = -σ·score = x_t
    torch.testing.assert_close(eps, x_t)


def test_finite_set_data_deterministic_samplers_land_on_training_images():
    """docs/exact-scores.md: with the exact denoiser of a finite set, deterministic samplers end on a y_i."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
    for family in ("vp", "ve"):
        net = FiniteSetNet(images, family=family)
        pipe = SamplerPipeline(net, net.model_family(), sample_shape=(1, 4, 4))
        for name, steps in (("ddim", 50), ("dpmsolver++", 25), ("pf_ode", 100)):
            params = {"clip_sample": False} if name == "ddim" else {}
            out = pipe(name, steps, params, batch_size=16, seed=1, output_type="pt", dtype=torch.float64)
            dist = torch.cdist(out.images.flatten(1), images.flatten(1).double()).min(1).values
            assert float(dist.max()) < 0.05, (family, name)


def test_same_seed_same_images_and_batch_independent_noise(ddpm_checkpoint):
    pipe = SamplerPipeline.from_pretrained(str(ddpm_checkpoint))
    a = pipe("ddpm", 5, batch_size=3, seed=7, output_type="pt").images
    b = pipe("ddpm", 5, batch_size=3, seed=7, output_type="pt").images
    c = pipe("ddpm", 5, batch_size=3, seed=8, output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_concurrent_calls_equal_sequential_calls(ddpm_checkpoint):
    pipe = SamplerPipeline.from_pretrained(str(ddpm_checkpoint))
    expected = {s: pipe("langevin", 3, batch_size=2, seed=s, output_type="pt").images for s in (1, 2, 3, 4)}
    results = {}

    def work(seed):
        results[seed] = pipe("langevin", 3, batch_size=2, seed=seed, output_type="pt").images

    threads = [threading.Thread(target=work, args=(s,)) for s in expected]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in expected:
        assert torch.equal(results[s], expected[s])


def test_callback_receives_each_step_and_previews(ddpm_checkpoint):
    pipe = SamplerPipeline.from_pretrained(str(ddpm_checkpoint))
    calls = []
    out = pipe("dpmsolver++", 6, batch_size=2, seed=0, callback=lambda i, n, x, x0: calls.append((i, n, x.shape, x0.shape)),
               callback_steps=2)
    assert [c[0] for c in calls] == [1, 3, 5] and all(c[1] == 6 for c in calls)
    assert all(c[2] == c[3] == (2, 1, 8, 8) for c in calls)
    assert out.nfe == 6


def test_should_stop_cancels(ddpm_checkpoint):
    pipe = SamplerPipeline.from_pretrained(str(ddpm_checkpoint))
    count = {"n": 0}

    def stop():
        count["n"] += 1
        return count["n"] > 3

    with pytest.raises(SamplingCancelled):
        pipe("ddim", 20, batch_size=1, seed=0, should_stop=stop)


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "cond"
    family = ModelFamily(kind="vp", prediction_type="v_prediction", num_class_embeds=4, null_class_label=3)
    save_checkpoint(path, tiny_unet(num_class_embeds=4), family, dict(DDPMScheduler().config))
    return path


def test_class_conditional_guidance(conditional_checkpoint):
    pipe = SamplerPipeline.from_pretrained(str(conditional_checkpoint))
    info = pipe.info
    assert info.family.is_conditional and info.family.num_classes == 3 and info.family.prediction_type == "v_prediction"
    a = pipe("ddim", 4, batch_size=3, seed=0, class_labels=[0, 1, 2], guidance_scale=3.0, output_type="pt").images
    b = pipe("ddim", 4, batch_size=3, seed=0, class_labels=[0, 1, 2], guidance_scale=1.0, output_type="pt").images
    u = pipe("ddim", 4, batch_size=3, seed=0, output_type="pt").images  # unconditional via the null label
    assert not torch.allclose(a, b) and not torch.allclose(b, u)
    with pytest.raises(ValueError, match="class_labels must be in 0..2"):
        pipe("ddim", 4, batch_size=1, seed=0, class_labels=3)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("ddim", 4, batch_size=1, seed=0, class_labels=1, guidance_scale=float("nan"))


def test_guidance_formula():
    """ε̃ = ε(∅) + w (ε(c) − ε(∅)) (docs/guidance.md), checked on a network whose outputs are known."""

    class ByLabel(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None):
            return type("O", (), {"sample": class_labels.float().view(-1, 1, 1, 1).expand_as(sample).clone()})()

    fam = ModelFamily(kind="vp", num_class_embeds=5, null_class_label=4)
    net = EpsilonNetwork(ByLabel(), fam, DiscreteVPSchedule())
    eps = net(torch.zeros(2, 1, 2, 2), torch.tensor(10.0), class_labels=torch.tensor([1, 2]), guidance_scale=2.5)
    assert eps[0].flatten()[0] == pytest.approx(4 + 2.5 * (1 - 4))
    assert eps[1].flatten()[0] == pytest.approx(4 + 2.5 * (2 - 4))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": -5}, "num_inference_steps"),
    ({"num_inference_steps": 10**6, "scheduler": "pf_ode"}, "at most 20,000 network evaluations"),
    ({"num_inference_steps": 1001}, "T = 1000 training timesteps"),
    ({"scheduler_params": {"eta": 0.5}, "scheduler": "langevin"}, "does not apply"),
    ({"scheduler_params": {"step_size": 0.01}, "scheduler": "langevin"}, "step_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"class_labels": 1}, "unconditional"),
    ({"scheduler": "nope"}, "unknown sampler"),
])
def test_bad_arguments_name_the_parameter(ddpm_checkpoint, kwargs, match):
    pipe = SamplerPipeline.from_pretrained(str(ddpm_checkpoint))
    with pytest.raises(ValueError, match=match):
        pipe(**{"scheduler": "ddim", **kwargs})


def test_divergence_is_reported_with_the_step_size_to_lower():
    class Exploding(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None):
            return type("O", (), {"sample": -1e4 * sample - 1})()  # ascends: |x| grows until it overflows

    pipe = SamplerPipeline(Exploding(), ModelFamily(kind="vp"), sample_shape=(1, 2, 2))
    with pytest.raises(SamplingDivergedError, match="step_size"):
        pipe("langevin", 10, batch_size=1, seed=0)


def test_checkpoint_errors(tmp_path, ddpm_checkpoint):
    with pytest.raises(CheckpointError, match="not an existing folder"):
        inspect_checkpoint(str(tmp_path / "missing"), allow_hub=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers checkpoint"):
        inspect_checkpoint(str(empty))
    pickled = tmp_path / "pickled"
    shutil.copytree(ddpm_checkpoint, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        inspect_checkpoint(str(pickled))
    no_unet = tmp_path / "no_unet"
    shutil.copytree(ddpm_checkpoint, no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(CheckpointError, match=r"no denoiser \(expected unet/config.json"):
        inspect_checkpoint(str(no_unet))
    mixed = tmp_path / "mixed"
    shutil.copytree(ddpm_checkpoint, mixed)
    cfg = json.loads((mixed / "unet" / "config.json").read_text())
    cfg["time_embedding_type"] = "fourier"
    (mixed / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="Fourier"):
        inspect_checkpoint(str(mixed))
    with pytest.raises(CheckpointError, match="outside"):
        inspect_checkpoint(str(ddpm_checkpoint), allowed_roots=[str(tmp_path / "elsewhere")])


def test_flat_layout_loads(tmp_path):
    """Some Hub repos keep the UNet's config.json and weights at the top, beside scheduler_config.json."""
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "flat")
    DDPMScheduler(prediction_type="sample").save_pretrained(tmp_path / "flat")
    pipe = SamplerPipeline.from_pretrained(str(tmp_path / "flat"))
    assert pipe.family.prediction_type == "sample"
    assert pipe("ddim", 2, batch_size=1, seed=0, output_type="np").images.shape == (1, 8, 8, 1)


def test_hub_ids_fail_cleanly_offline(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not be downloaded"):
        inspect_checkpoint("google/ddpm-cifar10-32")


def test_saved_checkpoints_load_in_diffusers_too(conditional_checkpoint, tmp_path):
    """What this project writes is a standard diffusers folder."""
    pipe = DDPMPipeline.from_pretrained(str(conditional_checkpoint))
    assert pipe.unet.config.num_class_embeds == 4
    assert pipe.scheduler.config.prediction_type == "v_prediction"
