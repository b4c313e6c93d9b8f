"""The lab views (trajectory explorer, compare at equal cost, quality against NFE, the toy 2-D
world, reproduce in code, presets) and the app's API surface, without launching a server."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pipelines.checkpoint import save_checkpoint
from schedulers.parametrization import EpsilonNetwork, ModelFamily
from schedulers.registry import SAMPLERS, nfe_of, steps_for_nfe
from tests.conftest import tiny_unet
from ui import service
from ui.service import UserError


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lab") / "cond"
    family = ModelFamily(kind="vp", num_class_embeds=11, null_class_label=10)
    save_checkpoint(path, tiny_unet(num_class_embeds=11), family, dict(DDPMScheduler().config))
    return str(path)


@pytest.fixture(scope="module")
def demo():
    import app

    return app.build()


# ---- the API surface (defects 3, 6, 7, 8) ----

def test_api_inputs_are_named_with_server_side_defaults(demo):
    endpoints = demo.get_api_info()["named_endpoints"]
    gen = {p["parameter_name"]: p for p in endpoints["/generate"]["parameters"]}
    assert not [name for name in gen if name.startswith("param_")]
    for name in ("checkpoint", "sampler", "steps", "seed", "batch_size", "digit", "guidance_scale", "eta",
                 "corrector_steps", "steps_per_level", "solver"):
        assert name in gen
    # left out, the steps, the digit and every sampler parameter are the chosen sampler's defaults (None)
    assert all(gen[name]["parameter_default"] is None for name in ("steps", "digit", "eta", "corrector_steps"))
    labels = [p["label"] for p in endpoints["/generate"]["parameters"]]
    assert len(labels) == len(set(labels)), "two inputs share a label"
    cmp = {p["parameter_name"] for p in endpoints["/compare"]["parameters"]}
    assert {"samplers", "budgets", "mode", "digit", "guidance_scale"} <= cmp  # defect 7: compare has a digit
    assert {"/load_checkpoint", "/forward_process", "/toy"} <= set(endpoints)


def test_app_housekeeping(demo, tmp_path):
    """Defect 6: temporary files are deleted (Gradio's delete_cache, and a sweeper for the copies it misses);
    the steps control starts at DDIM's range."""
    import os
    import time

    assert demo.delete_cache and demo.delete_cache[1] <= 3600
    (tmp_path / "a").mkdir()
    old, new, kept = tmp_path / "a" / "old.png", tmp_path / "new.png", tmp_path / "kept.png"
    for path in (old, new, kept):
        path.write_bytes(b"x")
    for path in (old, kept):
        os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.01)
    removed = service.sweep_files(tmp_path, 50, keep={str(kept)})
    assert removed >= 1 and not old.exists() and new.exists() and kept.exists() and not (tmp_path / "a").exists()
    steps = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "steps"][0]
    assert (steps.minimum, steps.maximum) == (1, 1000)


def test_guidance_is_inactive_without_a_digit():
    """Defect 7: with 'unconditional' chosen the guidance slider is inactive."""
    from ui import handlers as h

    assert h.guidance_update("unconditional")["interactive"] is False
    assert h.guidance_update("7")["interactive"] is True and h.guidance_update("0–9")["interactive"] is True


# ---- trajectory explorer ----

def test_trajectory_is_stored_once_and_consistent(cond_ckpt, monkeypatch):
    pipe = service.CACHE.get(cond_ckpt)
    req = service.make_request(cond_ckpt, "ddim", 8, {"clip_sample": False}, 3, 2, "4", 1.0)
    final = service.generate_blocking(req, trajectory_image=1)
    traj = service.TRAJECTORIES.get(final.run_id)
    assert len(traj) == 8 and traj.step == list(range(8)) and len(traj.all_t) == 8
    assert traj.t[0] > traj.t[-1] and traj.sigma[0] > traj.sigma[-1] > 0
    # step 0: x_t is the seeded initial draw of image 1, ε̂ is what the network predicts there (no clipping)
    x0 = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))[1:2]
    assert torch.allclose(traj.x_t[0].float(), x0, atol=1e-2)
    net = EpsilonNetwork(pipe.unet, pipe.family, pipe.schedule)
    with torch.no_grad():
        eps = net(x0, torch.tensor(traj.t[0]), class_labels=torch.tensor([4]), guidance_scale=1.0)
    assert torch.allclose(traj.eps_hat[0].float(), eps, atol=2e-2)
    # the last x̂₀ is the result
    assert torch.allclose(traj.x0_hat[-1].float().clamp(-1, 1), final.tensor[1:2].clamp(-1, 1), atol=1e-2)
    # moving the slider reads the store: no network call
    calls = []
    monkeypatch.setattr(pipe, "__call__", lambda *a, **k: calls.append(1))
    image, caption, plot = service.trajectory_view(final.run_id, 4)
    assert not calls and "step **5 of 8**" in caption and "t = " in caption and "σ_t = " in caption
    assert image.width > 3 * 160 and plot.width > 100
    with pytest.raises(UserError, match="trajectory step"):
        service.trajectory_view(final.run_id, 8)


def test_long_runs_store_a_bounded_trajectory(cond_ckpt):
    req = service.make_request(cond_ckpt, "ddpm", 1000, None, 0, 1, None, None)
    traj = service.TRAJECTORIES.get(service.generate_blocking(req).run_id)
    assert len(traj) <= 400 and traj.step[-1] == 999 and len(traj.all_t) == 1000
    assert traj.nbytes() < 2_000_000


# ---- compare at equal cost ----

def test_compare_at_equal_nfe_converts_budgets_and_shares_the_noise(cond_ckpt, monkeypatch):
    pipe = service.CACHE.get(cond_ckpt)
    base = pipe.sampler_config
    cells = service.plan_compare(cond_ckpt, ["ddim", "langevin", "pf_ode"], "10, 20", "nfe", 0, 2, "3", 2.0)
    for c in cells:
        assert c.request.steps == steps_for_nfe(c.request.sampler, c.budget, None, base)
        assert abs(c.request.nfe - c.budget) <= 1 and c.request.class_label == 3
    text = service.conversion_text(cells)
    assert "| Annealed Langevin (SMLD/NCSN) | 10 | 3 noise levels L | 10 |" in text
    first_inputs = {}
    real = pipe.unet

    class Recording(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None):
            first_inputs.setdefault(threading.current_thread().name + str(len(first_inputs)), sample[:1].clone())
            return real(sample, timestep, class_labels=class_labels)

    last = service.compare_blocking(cond_ckpt, ["ddim", "ddpm"], "5", 0, 1, "unconditional", None)
    assert last.done and [r[3] for r in last.rows] == [5, 5] and all(r[4] is not None for r in last.rows)
    # the same seed gives every sampler the same initial noise
    seen = []
    monkeypatch.setattr(pipe, "unet", Recording())
    for name in ("ddim", "ddpm", "dpmsolver++"):
        first_inputs.clear()
        service.compare_blocking(cond_ckpt, [name], "3", 0, 1, "unconditional", None)
        seen.append(next(iter(first_inputs.values())))
    assert all(torch.allclose(seen[0], s) for s in seen[1:])


# ---- quality against NFE ----

def test_quality_chart_from_the_shipped_table(cond_ckpt):
    label = service.DEFAULT_CHECKPOINT
    image, caption = service.quality_figure(label, "ddim", 50, {"eta": 0.0})
    assert image.width > 400 and "DDIM η=0 at NFE 50" in caption and "FID ≈ 5.6" in caption
    _, caption = service.quality_figure(label, "ddim", 50, {"eta": 1.0})
    assert "DDIM η=1" in caption
    none, text = service.quality_figure(cond_ckpt, "ddim", 50)
    assert none is None and "No evaluation table" in text
    live = service.live_quality(label, "ddim", 5, None, num_samples=8)
    assert "Live check" in live and "noisy" in live and "NFE 5" in live


# ---- toy 2-D world ----

def test_toy_world_runs_every_sampler_through_the_registry():
    image, caption, rows = service.run_toy("ddim", 10, None, 500, 0)
    assert image.width > 4 * 150 and "NFE 10" in caption
    assert abs(sum(r[2] for r in rows) - 1) < 1e-6 and [r[1] for r in rows] == [0.2, 0.5, 0.3]
    _, caption, rows = service.run_toy("langevin", 3, None, 500, 0)  # too few levels: visibly wrong
    assert "NFE 10" in caption
    grid, table = service.toy_all(10, 200, 0)
    assert [r[0] for r in table] == [s.title for s in SAMPLERS.values()]
    with pytest.raises(UserError, match="between 2"):
        service.run_toy("langevin", 1)


# ---- reproduce in code, presets ----

def test_settings_string_round_trips_and_snippet_reproduces_the_images(cond_ckpt):
    req = service.make_request(cond_ckpt, "pc", 6, {"snr": 0.1}, 4, 3, "0–9", 2.0)
    text = service.settings_string(req)
    s = service.parse_settings(text)
    again = service.make_request(s["checkpoint"], s["sampler"], s["steps"], s["params"], s["seed"], s["batch_size"],
                                 s["digit"], s["guidance_scale"])
    assert (again.sampler, again.steps, again.params, again.seed, again.class_label, again.guidance_scale) == \
           (req.sampler, req.steps, req.params, req.seed, req.class_label, req.guidance_scale)
    final = service.generate_blocking(req, trajectory_image=None)
    code = service.code_snippet(req).replace(repr(service.checkpoint_path(cond_ckpt)), repr(cond_ckpt))
    scope = {}
    exec(code, scope)  # noqa: S102 - our own generated snippet
    assert torch.allclose(scope["images"], (final.tensor.clamp(-1, 1) + 1) / 2, atol=1e-6)
    with pytest.raises(UserError, match="settings"):
        service.parse_settings("not json")
    with pytest.raises(UserError, match="unknown keys"):
        service.parse_settings('{"sampler": "ddim", "oops": 1}')


def test_presets_with_and_without_registry_presets(monkeypatch):
    class Presets:
        """The registry's spec with other presets (none: the app's fast fallback)."""

        def __init__(self, spec, presets):
            self._spec, self.presets = spec, presets

        def __getattr__(self, name):
            return getattr(self._spec, name)

    ddim = SAMPLERS["ddim"]
    monkeypatch.setitem(SAMPLERS, "ddim", Presets(ddim, ()))
    labels = service.preset_labels("ddim")
    assert labels[0].startswith("registry default") and len(labels) == 2 and "fast" in labels[1]
    steps, params = service.preset("ddim", labels[1])
    assert nfe_of("ddim", steps, params) == 20
    monkeypatch.setitem(SAMPLERS, "ddim", Presets(ddim, (("paper: 1000 steps, η = 1", 1000, {"eta": 1.0}),)))
    labels = service.preset_labels("ddim")
    assert labels[1] == "paper: 1000 steps, η = 1" and len(labels) == 2
    assert service.preset("ddim", labels[1]) == (1000, {**SAMPLERS["ddim"].defaults(), "eta": 1.0})
    assert np.isclose(service.preset("ddim", labels[1])[1]["eta"], 1.0)


def test_a_sampler_that_chooses_its_steps_runs_without_a_trajectory(cond_ckpt):
    """An adaptive solver's timesteps are a budget, not a list: the run works, no trajectory is claimed."""
    adaptive = [name for name, spec in SAMPLERS.items() if "budget" in spec.steps_label]
    if not adaptive:
        pytest.skip("no adaptive sampler registered")
    req = service.make_request(cond_ckpt, adaptive[0], 50, None, 0, 1, None, None)
    final = service.generate_blocking(req)
    assert final.kind == "done" and final.run_id is None


def test_output_files_pruning_survives_files_deleted_meanwhile(monkeypatch, tmp_path):
    """Two requests save at once: one prunes the folder while the other lists it (seen in CI as a
    FileNotFoundError in the sorting key). A file that vanishes between listing and stat is skipped."""
    from pathlib import Path

    from ui import outputs

    monkeypatch.setattr(outputs.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = tmp_path / "sampler-lab"
    folder.mkdir()
    for k in range(45):
        (folder / f"f{k}.png").write_bytes(b"x")
    real_glob = Path.glob

    def glob_then_delete(self, pattern):
        found = list(real_glob(self, pattern))
        found[0].unlink()  # deleted by another request after the listing
        return found

    monkeypatch.setattr(Path, "glob", glob_then_delete)
    assert outputs._outdir() == folder
    monkeypatch.setattr(Path, "glob", real_glob)
    assert len(list(folder.glob("*"))) == 40
