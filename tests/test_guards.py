"""Direct tests for guarantees that the sampling-distribution tests cannot see, each written so
that one specific, plausible one-line mistake fails it (benchmarks/mutation_check.py applies
those mistakes and checks that these tests notice):

- the VP-SDE sampler returns the noiseless mean x̄ on its last step (score_sde's noise removal);
- the final denoising (Tweedie) step of the PF-ODE and annealed-Langevin samplers;
- training draws fresh noise and timesteps at every optimizer step and micro-batch;
- the Spaces path guard: traversal, prefix look-alikes and symlinks out of the checkpoint root;
- classifier-free guidance computes exactly ε(∅) + w (ε(c) − ε(∅)) with the family's null label.

Only public behaviour is used (``step`` outputs, ``resolve_checkpoint``, ``ModelCache``,
``EpsilonNetwork``, ``train.main``), so refactors that keep the behaviour keep these tests green.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.analytic import GaussianMixtureNet
from schedulers.parametrization import EpsilonNetwork, ModelFamily
from schedulers.registry import create_scheduler
from schedulers.schedules import DiscreteVPSchedule

LINEAR = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def analytic_eps(std: float = 0.3, dim: int = 4) -> EpsilonNetwork:
    schedule = DiscreteVPSchedule.from_config(LINEAR)
    net = GaussianMixtureNet([0.5, 0.5], [[-0.5] * dim, [0.5] * dim], [std, std], schedule=schedule)
    return EpsilonNetwork(net, net.model_family(), schedule)


def fresh(name: str, steps: int, params: dict | None = None):
    scheduler, step_kwargs = create_scheduler(name, LINEAR, params or {})
    scheduler.set_timesteps(steps)
    return scheduler, step_kwargs


# ---------------------------------------------------------------- (a) VP-SDE: no noise on the last step

@pytest.mark.parametrize("name", ["vp_sde", "pc"])
def test_vp_sde_last_step_is_the_noiseless_mean(name):
    """Two copies of the sampler take every entry of ``timesteps`` from the same state and ε̂ but with
    *different* generators. At the last entry they must return the same x̄: the last predictor step
    adds no noise. At every earlier entry (predictor or corrector) they must differ, so this is not a
    sampler that ignores its generator altogether."""
    net = analytic_eps()
    N = 6
    a, kw = fresh(name, N)
    b, _ = fresh(name, N)
    assert len(a.timesteps) >= N
    x = torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    last = len(a.timesteps) - 1
    for i, t in enumerate(a.timesteps):
        eps = net(a.scale_model_input(x, t), t)
        out_a = a.step(eps, t, x, generator=torch.Generator().manual_seed(100 + i), **kw).prev_sample
        out_b = b.step(eps, t, x, generator=torch.Generator().manual_seed(200 + i), **kw).prev_sample
        if i < last:
            assert not torch.allclose(out_a, out_b), f"entry {i} of {last + 1} does not use its generator"
            x = out_a  # both continue from a's state (a step depends on its inputs and index only)
        else:
            assert torch.equal(out_a, out_b), "the last step depends on the generator: it adds noise"
            assert not torch.equal(out_a, x), "the last step did not move the sample"


def test_vp_sde_last_step_output_is_x_plus_reverse_drift():
    """The last step returns exactly x̄ = x + [−½β x − β s_θ] Δt at its time t_{N−1} = t_ε + |Δt|, with
    s_θ = −ε̂/√(1 − m²); β(t) = β_min + t(β_max − β_min) and m(t) = exp(−¼t²(β_max − β_min) − ½tβ_min)
    of the linear VP-SDE are written out here, independently of the scheduler."""
    N, t_eps = 4, 1e-3
    s, _ = fresh("vp_sde", N, {"sampling_eps": t_eps})
    x = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in s.timesteps[:-1]:
        s.step(eps, t, x, generator=torch.Generator().manual_seed(3))
    out = s.step(eps, s.timesteps[-1], x, generator=torch.Generator().manual_seed(4)).prev_sample
    b_min, b_max = 0.1, 20.0
    dt = -(1 - t_eps) / N
    t1 = t_eps - dt
    beta = b_min + t1 * (b_max - b_min)
    m = math.exp(-0.25 * t1**2 * (b_max - b_min) - 0.5 * t1 * b_min)
    score = -eps / math.sqrt(1 - m * m)
    torch.testing.assert_close(out, x + (-0.5 * beta * x - beta * score) * dt, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- the final Tweedie step

def test_pf_ode_final_denoise_returns_tweedie_at_t_eps():
    """With ``final_denoise`` the last evaluation, at t_ε, returns x̂₀ = (x − √(1−m²) ε̂)/m, not an ODE step."""
    t_eps = 1e-2
    s, _ = fresh("pf_ode", 3, {"solver": "euler", "final_denoise": True, "clip_sample": False, "sampling_eps": t_eps})
    x = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 0.3 * torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in s.timesteps[:-1]:
        s.step(eps, t, x)
    out = s.step(eps, s.timesteps[-1], x)
    m = math.exp(-0.25 * t_eps**2 * (20.0 - 0.1) - 0.5 * t_eps * 0.1)
    expected = (x - math.sqrt(1 - m * m) * eps) / m
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.pred_original_sample, expected, rtol=1e-6, atol=1e-9)


def test_langevin_final_denoise_returns_tweedie_at_sigma_min():
    """NCSNv2's last step: x̃ + σ_L² ∇log p = x̃ − σ_L ε̂, deterministic, and equal to the reported x̂₀."""
    sigma_min = 0.05
    s, _ = fresh("langevin", 2, {"steps_per_level": 1, "final_denoise": True, "sigma_min": sigma_min, "sigma_max": 1.0})
    x = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 0.3 * torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in s.timesteps[:-1]:
        s.step(eps, t, x, generator=torch.Generator().manual_seed(3))
    out = s.step(eps, s.timesteps[-1], x, generator=torch.Generator().manual_seed(4))
    expected = x - sigma_min * eps
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.pred_original_sample, expected, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- (c) training: fresh noise every step

def test_step_generator_is_a_pure_function_of_seed_step_rank_micro():
    from training.train import step_generator

    def draws(*args):
        return torch.rand(16, generator=step_generator(*args))

    base = (0, 5, 0, 0)
    assert torch.equal(draws(*base), draws(*base))  # same arguments → same draws (resumable)
    for other in [(1, 5, 0, 0), (0, 6, 0, 0), (0, 5, 1, 0), (0, 5, 0, 1), (0, 4, 0, 0)]:
        assert not torch.equal(draws(*base), draws(*other)), f"{other} draws what {base} draws"
    many = {tuple(draws(0, k, r, m)[:4].tolist()) for k in range(50) for r in range(2) for m in range(2)}
    assert len(many) == 200  # every (step, rank, micro-batch) its own stream


def test_ddpm_loss_draws_everything_from_its_generator():
    """The loss's t and ε come from the generator only: same seed → same loss, another seed → another."""
    from training.losses import ddpm_loss

    unet = _TinyNet()
    x_0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    alphas_cumprod = DiscreteVPSchedule().alphas_cumprod.float()

    def loss(seed):
        return float(ddpm_loss(unet, x_0, alphas_cumprod, torch.Generator().manual_seed(seed)).detach())

    torch.manual_seed(0)
    a = loss(1)
    torch.manual_seed(1)  # the global RNG must not matter
    assert loss(1) == a
    assert loss(2) != a


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, class_labels=None):
        out = self.w * x + 1e-3 * torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return type("Out", (), {"sample": out})()


TINY_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


def _image_folder(root, n=4, classes=("a", "b")):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.random.default_rng(i + 10 * len(c)).integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / c / f"{i}.png")
    return root


def _generator_in(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Generator):
            return value
    raise AssertionError("the loss was called without a torch.Generator")


def test_training_loop_draws_fresh_noise_every_step_and_micro_batch(tmp_path, monkeypatch):
    """End to end: ``train.main`` on 8 tiny images for 3 optimizer steps × 2 micro-batches. The loss
    function is wrapped where train.py looks it up; the wrapper reads (without consuming) the first
    draws of the generator each call gets. All 6 calls must see different streams — a loop that
    seeds every step alike trains on one t and one ε forever — and a second run repeats them."""
    from training import train

    real = train.ddpm_loss
    seen = []

    def recording(*args, **kwargs):
        gen = _generator_in(args, kwargs)
        probe = torch.Generator()
        probe.set_state(gen.get_state())
        seen.append(tuple(torch.rand(4, generator=probe).tolist()))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "ddpm_loss", recording)
    config = tmp_path / "tiny_unet.json"
    config.write_text(json.dumps(TINY_UNET))
    data = _image_folder(tmp_path / "images")

    def run(out):
        seen.clear()
        assert train.main(["--output_dir", str(out), "--model_config", str(config), "--train_data_dir", str(data),
                           "--resolution", "8", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
                           "--max_train_steps", "3", "--checkpointing_steps", "0", "--save_images_steps", "0",
                           "--lr_warmup_steps", "0", "--no-use_ema", "--report_to", "none", "--no_progress"]) == 0
        return list(seen)

    first = run(tmp_path / "run1")
    assert len(first) == 6, first  # 3 steps × 2 micro-batches
    assert len(set(first)) == 6, "two loss calls got the same random stream"
    assert run(tmp_path / "run2") == first  # … and the streams are a function of (seed, step, micro): resumable


# ---------------------------------------------------------------- (d) Spaces: local folders only below the root

@pytest.fixture
def roots(tmp_path, monkeypatch):
    """tmp/checkpoints/good (allowed), tmp/other, tmp/checkpoints-evil, tmp/checkpoints/link → tmp/other."""
    root = tmp_path / "checkpoints"
    (root / "good").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "checkpoints-evil").mkdir()
    monkeypatch.chdir(tmp_path)
    return root


@pytest.mark.parametrize("source", [
    "checkpoints/../other",
    "{root}/../other",
    "checkpoints/good/../../other",
    "{tmp}/checkpoints-evil",
    "checkpoints-evil",
    "{tmp}/other",
])
@pytest.mark.parametrize("root_as", ["absolute", "relative"])
def test_resolve_checkpoint_refuses_folders_outside_the_allowed_roots(roots, source, root_as):
    from pipelines.checkpoint import CheckpointError, resolve_checkpoint

    source = source.format(root=roots, tmp=roots.parent)
    allowed = [str(roots) if root_as == "absolute" else "checkpoints"]
    assert os.path.isdir(source)  # it exists: only the guard can refuse it
    with pytest.raises(CheckpointError):
        resolve_checkpoint(source, allow_hub=False, allowed_roots=allowed)


def test_resolve_checkpoint_refuses_a_symlink_out_of_the_root(roots):
    from pipelines.checkpoint import CheckpointError, resolve_checkpoint

    link = roots / "link"
    try:
        link.symlink_to(roots.parent / "other", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks are not available here")
    with pytest.raises(CheckpointError):
        resolve_checkpoint(str(link), allow_hub=False, allowed_roots=[str(roots)])


def test_resolve_checkpoint_accepts_folders_inside_the_root(roots):
    from pipelines.checkpoint import resolve_checkpoint

    good = (roots / "good").resolve()
    for source in (str(roots / "good"), "checkpoints/good", "checkpoints/good/../good", "./checkpoints/good"):
        assert resolve_checkpoint(source, allow_hub=False, allowed_roots=[str(roots)]) == good
    assert resolve_checkpoint("checkpoints/good", allow_hub=False, allowed_roots=None) == good  # no guard off Spaces


def _space_error(source: str) -> str:
    from ui import service

    with pytest.raises(service.UserError) as err:
        service.ModelCache().get(source)
    return str(err.value)


def test_space_mode_refuses_traversal_and_outside_folders(monkeypatch, tmp_path):
    from ui import service

    monkeypatch.setenv("SPACE_ID", "someone/lab")
    checkpoint_dir = service.CHECKPOINT_DIR
    repo_folder = "schedulers" if (checkpoint_dir.parent / "schedulers").is_dir() else "tests"
    sources = [f"{checkpoint_dir}/../{repo_folder}", str(tmp_path)]
    inside = [p for p in checkpoint_dir.iterdir() if p.is_dir()] if checkpoint_dir.is_dir() else []
    if inside:
        sources.append(f"{inside[0]}/../../{repo_folder}")
    for source in sources:
        assert os.path.isdir(source)
        _space_error(source)


def test_space_mode_guards_with_the_checkpoint_dir_as_root(monkeypatch, tmp_path):
    """With SPACE_ID set the cache passes its CHECKPOINT_DIR as the only allowed root: pointed at a
    temporary root, a look-alike sibling ``<root>-evil`` and a symlink out of the root are refused."""
    from ui import service

    module = sys.modules[service.ModelCache.__module__]
    if not hasattr(module, "CHECKPOINT_DIR"):
        pytest.skip("ModelCache no longer reads a module-level CHECKPOINT_DIR")
    root = tmp_path / "checkpoints"
    root.mkdir()
    (tmp_path / "checkpoints-evil").mkdir()
    (tmp_path / "outside").mkdir()
    monkeypatch.setattr(module, "CHECKPOINT_DIR", root)
    monkeypatch.setenv("SPACE_ID", "someone/lab")
    sources = [str(tmp_path / "checkpoints-evil"), f"{root}/../outside"]
    try:
        (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
        sources.append(str(root / "link"))
    except (OSError, NotImplementedError):
        pass
    for source in sources:
        _space_error(source)  # refused


def test_space_mode_loads_a_bundled_checkpoint(monkeypatch):
    from ui import service

    monkeypatch.setenv("SPACE_ID", "someone/lab")
    bundled = next(iter(service.BUNDLED.values()))
    if not (bundled / "model_index.json").exists():
        pytest.skip("the bundled checkpoint is not in this checkout")
    pipe = service.ModelCache().get(str(bundled))
    assert pipe.info.path == bundled.resolve()


def test_space_mode_error_does_not_reveal_whether_a_path_exists(monkeypatch, tmp_path):
    """In Spaces mode an outside path must be refused with the same words whether it exists or not, or
    the app answers "does /etc/x exist?" for anyone."""
    monkeypatch.setenv("SPACE_ID", "someone/lab")
    existing, missing = tmp_path / "exists", tmp_path / "does-not-exist"
    existing.mkdir()
    messages = [_space_error(str(p)).replace(str(p), "<path>") for p in (existing, missing)]
    assert messages[0] == messages[1], messages


# ---------------------------------------------------------------- (e) classifier-free guidance, exactly

class _LabelConstantNet(torch.nn.Module):
    """ε(x, t, c) = 0·x + k(c) with k(c) = 0.1 (c + 1) + 0.01 c²: distinct for every label; records labels."""

    def __init__(self):
        super().__init__()
        self.labels_seen = []

    @staticmethod
    def k(labels: torch.Tensor) -> torch.Tensor:
        c = labels.to(torch.float64)
        return 0.1 * (c + 1) + 0.01 * c * c

    def forward(self, sample, timestep, class_labels=None):
        assert class_labels is not None, "a class-conditional network was called without labels"
        self.labels_seen.append(class_labels.detach().cpu().clone())
        out = 0 * sample + self.k(class_labels).to(sample.dtype).reshape(-1, *([1] * (sample.ndim - 1)))
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize("null_label", [10, 3])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.5])
def test_classifier_free_guidance_is_exact(null_label, w):
    unet = _LabelConstantNet()
    family = ModelFamily(kind="vp", prediction_type="epsilon", num_class_embeds=11, null_class_label=null_label)
    net = EpsilonNetwork(unet, family, DiscreteVPSchedule())
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 5, 9, 2])
    t = torch.tensor(500)
    eps = net(x, t, class_labels=labels, guidance_scale=w)
    k_c = _LabelConstantNet.k(labels).reshape(-1, 1, 1, 1).expand_as(x)
    k_null = _LabelConstantNet.k(torch.tensor(null_label)).expand_as(x)
    torch.testing.assert_close(eps, k_null + w * (k_c - k_null), rtol=0, atol=1e-12)
    seen = torch.cat(unet.labels_seen)
    assert set(seen.tolist()) <= set(labels.tolist()) | {null_label}
    if w != 1.0:  # the unconditional branch ran, with the family's null label for every image
        assert int((seen == null_label).sum()) == len(labels)


def test_guidance_combines_the_two_branches_of_any_family():
    """ε̃(w) = ε(∅) + w (ε(c) − ε(∅)) also for a VE score network whose branches are computed by the
    ε conversion, with the branches taken from unguided calls (labels c, then the null label)."""
    class ScoreNet(torch.nn.Module):
        def forward(self, sample, sigma, class_labels=None):
            c = class_labels.to(sample.dtype).reshape(-1, 1, 1, 1)
            return type("Out", (), {"sample": -(sample - 0.1 * c) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)})()

    family = ModelFamily(kind="ve", prediction_type="score", data_range=(-1.0, 1.0), sigma_min=0.01, sigma_max=50.0,
                         num_class_embeds=11, null_class_label=10)
    schedule = DiscreteVPSchedule()
    net = EpsilonNetwork(ScoreNet(), family, schedule)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels, t = torch.tensor([1, 4, 8]), torch.tensor(300.0)
    cond = net(x, t, class_labels=labels, guidance_scale=1.0)
    uncond = net(x, t, class_labels=torch.full_like(labels, 10), guidance_scale=1.0)
    assert not torch.allclose(cond, uncond)
    for w in (0.0, 2.0, 4.0):
        torch.testing.assert_close(net(x, t, class_labels=labels, guidance_scale=w), uncond + w * (cond - uncond),
                                   rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- (f) the evaluation CLIs on corrupt input


def test_table_refuses_a_corrupt_results_file_with_a_message_and_keeps_it(tmp_path):
    """A half-written table JSON (a killed run) must not end in a raw JSONDecodeError, nor be overwritten."""
    from evaluation.table import _read_results

    store = tmp_path / "table.json"
    store.write_text('{"meta": {"checkpoint": "x"}, "cells": {')
    with pytest.raises(SystemExit, match="not a readable results file"):
        _read_results(store)
    assert store.read_text().endswith('"cells": {')  # the user's partial results are still there
    store.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="JSON object"):
        _read_results(store)
    assert _read_results(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("params", ["{eta: 0.5}", "[0.5]"])
def test_evaluate_refuses_bad_params_before_loading_anything(params):
    from evaluation.evaluate import main

    with pytest.raises(SystemExit, match="--params must be a JSON object"):
        main(["--checkpoint", "no/such/folder", "--params", params])
