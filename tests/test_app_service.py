"""The app's logic, called directly: validation, per-sampler defaults, budgets, streaming, cancel
(generate and compare), errors, caching, concurrency and memory, on small checkpoints made by the
tests (and the bundled ones). Each numbered defect of issue 13 has a test here or in
``test_app_live.py`` (the browser test covers the layout ones)."""

from __future__ import annotations

import gc
import resource
import threading

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from pipelines.checkpoint import save_checkpoint
from schedulers.parametrization import ModelFamily
from tests.conftest import tiny_unet
from ui import service
from ui.service import UserError


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "cond"
    family = ModelFamily(kind="vp", num_class_embeds=11, null_class_label=10)
    save_checkpoint(path, tiny_unet(num_class_embeds=11), family, dict(DDPMScheduler().config))
    return str(path)


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """An unconditional checkpoint trained on T = 100 timesteps: discrete samplers take at most 100 steps."""
    path = tmp_path_factory.mktemp("app") / "short"
    save_checkpoint(path, tiny_unet(), ModelFamily(kind="vp"), dict(DDPMScheduler(num_train_timesteps=100).config))
    return str(path)


class CountingNet(torch.nn.Module):
    """Wraps a network and counts its calls (to see whether a cancelled run goes on)."""

    def __init__(self, net, delay=0.0):
        super().__init__()
        self.net, self.calls, self.delay = net, 0, delay

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.delay:
            threading.Event().wait(self.delay)
        return self.net(*args, **kwargs)


def test_make_request_validates_everything(cond_ckpt, monkeypatch):
    req = service.make_request(cond_ckpt, "langevin", 10, {"steps_per_level": 2}, 5, 4, "3", 2.0)
    assert req.nfe == 21 and req.class_label == 3 and req.guidance_scale == 2.0
    unconditional = service.make_request(cond_ckpt, "ddim", 10, {}, 5, 4, "unconditional", 7.0)
    assert unconditional.class_label is None and unconditional.guidance_scale == 1.0
    bad = [
        (dict(steps=0), "steps.*between"), (dict(steps=2.5), "whole number"), (dict(steps="ten"), "steps.*number"),
        (dict(batch_size=1000), "batch size"), (dict(seed=-1), "seed"), (dict(sampler="nope"), "sampler: unknown"),
        (dict(digit=12), "digit"), (dict(guidance_scale=float("inf")), "guidance scale.*finite"),
        (dict(sampler="langevin", params={"step_size": 0.5}), "step_size"),
        (dict(sampler="ddpm", steps=5000), "1000"),
    ]
    base = dict(checkpoint=cond_ckpt, sampler="ddim", steps=10, params={}, seed=0, batch_size=2, digit=1, guidance_scale=1.0)
    for change, match in bad:
        with pytest.raises(UserError, match=match):
            service.make_request(**{**base, **change})
    monkeypatch.setenv("SAMPLER_LAB_MAX_WORK", "100")
    with pytest.raises(UserError, match="budget"):
        service.make_request(**{**base, "steps": 60, "batch_size": 2})


def test_left_out_values_are_the_chosen_samplers_defaults(cond_ckpt):
    """Defect 8: an API call without explicit values runs that sampler's registry defaults, not DDIM's
    50 steps and the first sampler's shared values (pc keeps its corrector step)."""
    from schedulers.registry import SAMPLERS, nfe_of

    every_box = {"eta": None, "corrector_steps": None, "snr": None, "sampling_eps": None, "clip_sample": None}
    pc = service.make_request(cond_ckpt, "pc", None, every_box, 0, 1)
    assert pc.steps == SAMPLERS["pc"].default_steps and pc.params["corrector_steps"] == 1
    assert pc.nfe == nfe_of("pc", pc.steps) == 2 * pc.steps  # one corrector step per predictor step
    assert service.make_request(cond_ckpt, "vp_sde", None, every_box).params["corrector_steps"] == 0
    langevin = service.make_request(cond_ckpt, "langevin", None, {"sigma_max": 0, "sigma_min": None})
    assert langevin.steps == SAMPLERS["langevin"].default_steps and langevin.params["sigma_max"] is None
    # digits as ints or strings; the default on a conditional checkpoint is one image per digit, with guidance
    assert service.make_request(cond_ckpt, "ddim", 5, digit=7).class_label == 7
    assert service.make_request(cond_ckpt, "ddim", 5, digit="7").class_label == 7
    default = service.make_request(cond_ckpt, "ddim", 5, batch_size=12)
    assert default.class_label == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and default.guidance_scale == 3.0


def test_unconditional_checkpoint_ignores_the_default_digit(short_ckpt):
    """Defect 8: after the NCSN (unconditional) checkpoint, the default digit must not fail a request."""
    req = service.make_request(short_ckpt, "ddim", 5, None, 0, 2, None, 3.0)
    assert req.class_label is None and req.guidance_scale == 1.0
    assert service.make_request(short_ckpt, "ddim", 5, digit="unconditional").class_label is None
    with pytest.raises(UserError, match="unconditional"):
        service.make_request(short_ckpt, "ddim", 5, digit=3)


def test_step_limits_follow_sampler_checkpoint_and_parameters(cond_ckpt, short_ckpt):
    """Defect 2: the Steps control knows every sampler's limit on every checkpoint before the run."""
    from ui import handlers as h

    assert h.steps_update(short_ckpt, "ddim")["maximum"] == 100  # T of this checkpoint
    assert h.steps_update(cond_ckpt, "ddim")["maximum"] == 1000
    assert h.steps_update(cond_ckpt, "dpmsolver++")["maximum"] == 1000
    assert h.steps_update(cond_ckpt, "langevin")["minimum"] == 2
    wide = h.steps_update(cond_ckpt, "langevin")["maximum"]
    boxes = [100 if name == "steps_per_level" else None for name in h.PARAM_NAMES]
    narrow = h.on_param_change(cond_ckpt, "langevin", 10, *boxes)["maximum"]
    assert narrow < wide and narrow * 100 <= 20_000  # K = 100 steps per level: NFE cap reached sooner
    assert h.steps_label("langevin") == "Steps: noise levels L"  # not "Noise levels l"
    with pytest.raises(UserError, match="steps: .*between 1 and 1000"):
        service.make_request(cond_ckpt, "dpmsolver++", 1040, None, 0, 1)


def test_generate_streams_previews_then_results(cond_ckpt):
    req = service.make_request(cond_ckpt, "ddim", 12, {}, 1, 3, "2", 3.0)
    updates = list(service.generate(req, previews=4))
    assert [u.done for u in updates].count(True) == 1 and updates[-1].done
    previews = [u for u in updates if u.kind == "preview"]
    assert len(previews) >= 4 and all(isinstance(u.preview, Image.Image) for u in previews)
    assert all("step" in u.status for u in updates[:-1])
    final = updates[-1]
    assert final.preview.size == previews[0].preview.size  # defect 5: the final preview is as large as the live ones
    assert len(final.images) == 3 and final.images[0].size == (128, 128)  # 8× nearest-neighbour
    assert "NFE 12" in final.status and "images/s" in final.status
    assert Image.open(final.grid_file).format == "PNG"
    gif = Image.open(final.gif_file)
    assert gif.format == "GIF" and gif.n_frames >= 4
    arr = np.asarray(final.images[0])  # the gallery images are exact enlargements: every 8×8 block is one colour
    assert (arr[::8, ::8].repeat(8, 0).repeat(8, 1) == arr).all()


def test_status_lines_say_time_left_and_never_zero_images_per_second(cond_ckpt):
    """Defects 4 and 10: a time estimate while running; a slow batch-1 run reads in s/image, not '0.0 images/s'."""
    assert "about 1.5 s left" in service.progress_line("DDIM", 25, 100, 0.5)
    req = service.make_request(cond_ckpt, "ddim", 5, None, 0, 1, "3", 2.0)
    slow = service.status_line(req, 1000, 140.0)
    assert "0.0 images/s" not in slow and "140.0 s/image" in slow
    assert "8.0 images/s" in service.status_line(service.make_request(cond_ckpt, "ddim", 5, None, 0, 16), 5, 2.0)


def test_same_seed_same_images_sequential_and_concurrent(cond_ckpt):
    req = service.make_request(cond_ckpt, "ddpm", 8, {}, 11, 2, "1", 2.0)
    first = [np.asarray(im) for im in service.generate_blocking(req).images]
    results = []
    threads = [threading.Thread(target=lambda: results.append(service.generate_blocking(req))) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for upd in results:
        assert all((np.asarray(a) == b).all() for a, b in zip(upd.images, first))


def test_cancel_stops_the_worker(cond_ckpt, monkeypatch):
    pipe = service.CACHE.get(cond_ckpt)
    counting = CountingNet(pipe.unet, delay=0.01)
    monkeypatch.setattr(pipe, "unet", counting)
    req = service.make_request(cond_ckpt, "ddpm", 1000, {}, 0, 1, None, 1.0)
    cancel = threading.Event()
    stream = service.generate(req, previews=200, cancel=cancel, interval=0.05)
    assert not next(stream).done
    stream.close()  # what Gradio does when the user presses Cancel
    assert cancel.is_set()
    calls = counting.calls
    threading.Event().wait(0.2)
    assert counting.calls == calls < 1000  # the worker has stopped


def test_compare_cancel_stops_the_worker(cond_ckpt, monkeypatch):
    """Defect 1: a cancelled comparison stops at the next step instead of running on the shared model."""
    pipe = service.CACHE.get(cond_ckpt)
    counting = CountingNet(pipe.unet, delay=0.01)
    monkeypatch.setattr(pipe, "unet", counting)
    cancel = threading.Event()
    stream = service.compare(cond_ckpt, ["ddpm", "ddim"], "500, 900", 0, 1, None, None, mode="steps", cancel=cancel,
                             interval=0.05)
    next(stream)
    next(stream)
    stream.close()
    assert cancel.is_set()
    calls = counting.calls
    threading.Event().wait(0.2)
    assert counting.calls == calls < 2800


def test_errors_keep_the_app_alive(tmp_path, cond_ckpt, monkeypatch):
    with pytest.raises(UserError, match="not an existing folder|could not be downloaded"):
        service.describe(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers checkpoint"):
        service.describe(str(tmp_path / "empty"))

    class Exploding(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None):
            return type("O", (), {"sample": -1e4 * sample - 1})()

    pipe = service.CACHE.get(cond_ckpt)
    monkeypatch.setattr(pipe, "unet", Exploding())
    req = service.make_request(cond_ckpt, "langevin", 10, {}, 0, 1, None, 1.0)
    last = list(service.generate(req))[-1]
    assert last.done and last.images is None and "non-finite" in last.status and "step_size" in last.status


def test_refusals_raise_errors_clients_receive(cond_ckpt):
    """Defect 9: the UI gets its friendly status first, then a gr.Error that a client receives."""
    import gradio as gr

    from ui import handlers as h

    stream = h.generate(cond_ckpt, "langevin", 1, 0, 1, None, 3.0, 0)
    first = next(stream)
    assert first[2].startswith("⚠️") and "between 2" in first[2]
    with pytest.raises(gr.Error, match="between 2"):
        next(stream)
    with pytest.raises(gr.Error, match="samplers"):
        list(h.compare(cond_ckpt, [], "10", "nfe", 0, 1, None, None))


def test_space_mode_does_not_reveal_whether_a_path_exists(tmp_path, cond_ckpt, monkeypatch):
    """Defect 6: on a Space an existing folder outside checkpoints/ and a missing one get the same words."""
    monkeypatch.setenv("SPACE_ID", "someone/lab")
    cache = service.ModelCache()
    messages = []
    for source in (cond_ckpt, str(tmp_path / "missing"), "/etc", "../../no/such"):
        with pytest.raises(UserError) as err:
            cache.get(source)
        messages.append(str(err.value).replace(repr(source), "<source>"))
    assert len(set(messages)) == 1 and "exist" not in messages[0]
    assert cache.get(next(iter(service.BUNDLED))) is not None  # the app's own checkpoints still load


def test_cache_loads_once_and_evicts(cond_ckpt, tmp_path):
    cache = service.ModelCache(max_items=1)
    assert cache.get(cond_ckpt) is cache.get(cond_ckpt)
    other = tmp_path / "other"
    save_checkpoint(other, tiny_unet(), ModelFamily(kind="vp"), dict(DDPMScheduler().config))
    cache.get(str(other))
    assert len(cache) == 1


def test_forward_process_and_schedule_plot_close_their_figures(cond_ckpt):
    """Defect 10: the schedule plot is not left in pyplot's registry (it leaked ~2.8 MB a request)."""
    import matplotlib.pyplot as plt

    vp, ve, note = service.forward_process(cond_ckpt, 3, 999, 50.0)
    assert vp.size == ve.size == (256, 256) and "ᾱ_t" in note
    clean, _, _ = service.forward_process(cond_ckpt, 3, 0, 0.01)
    assert np.asarray(clean).mean() < np.asarray(vp).mean()  # t = 0: a clean (mostly black) digit
    before = len(plt.get_fignums())
    for _ in range(3):
        fig = service.schedule_figure(cond_ckpt, "ddim", 10)
    assert len(fig.axes) == 3 and len(plt.get_fignums()) == before
    assert len(fig.axes[2].lines) >= 3  # σ_t, the sampler's 10 timesteps and their rug


def test_threads_are_chosen_for_the_hardware(monkeypatch):
    """Defect 10: one torch thread on a 2-core machine (two collapse under load), more on bigger ones."""
    monkeypatch.delenv("SAMPLER_LAB_THREADS", raising=False)
    assert service.choose_threads(2) == 1 and service.choose_threads(1) == 1
    assert service.choose_threads(8) == 4 and service.choose_threads(64) == 8
    monkeypatch.setenv("SAMPLER_LAB_THREADS", "3")
    assert service.choose_threads(2) == 3


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def test_memory_does_not_grow_over_twenty_requests(cond_ckpt):
    """Generation and the schedule plot, after a warm-up (allocator arenas, matplotlib's font caches)."""
    req = service.make_request(cond_ckpt, "ddim", 6, {}, 0, 4, "1", 2.0)
    for _ in range(10):
        service.generate_blocking(req)
        service.figure_image(service.schedule_figure(cond_ckpt, "ddim", 10))
    gc.collect()
    before = _rss_mb()
    for _ in range(20):
        service.generate_blocking(req)
        service.figure_image(service.schedule_figure(cond_ckpt, "ddim", 10))
    gc.collect()
    growth_mb = _rss_mb() - before
    assert growth_mb < 50, f"RSS grew by {growth_mb:.0f} MB over 20 requests"
    assert len(service.TRAJECTORIES) <= service.TRAJECTORIES.max_items


def test_bundled_defaults_draw_digits():
    """Defect 4: a newcomer's first images (the defaults) are the requested digits, not blobs."""
    from evaluation.classifier import load_classifier

    label = service.DEFAULT_CHECKPOINT
    req = service.make_request(label, "ddim", None, None, 0, 10)  # the app's defaults, ten images
    assert req.class_label == list(range(10)) and req.guidance_scale == 3.0
    final = service.generate_blocking(req, trajectory_image=None)
    with torch.no_grad():
        predicted = load_classifier()(final.tensor.clamp(-1, 1)).argmax(1).tolist()
    assert sum(p == y for p, y in zip(predicted, req.class_label)) >= 9, predicted
    ncsn = [label for label in service.BUNDLED if "NCSN" in label][0]
    assert service.generate_blocking(service.make_request(ncsn, "ddim", 5, None, 0, 2, None, 3.0)).images


def test_labelled_grid_fits_long_labels_on_small_images():
    from PIL import ImageDraw

    from ui.outputs import _label_font, labelled_grid

    label = "VP-SDE Euler–Maruyama · NFE 1000 · 12.3s"
    grid = labelled_grid([(label, Image.new("L", (32, 32), 255)), ("DDIM", Image.new("L", (32, 32), 255))], ncol=2)
    font, has_dash = _label_font()
    text_width = ImageDraw.Draw(grid).textlength(label if has_dash else label.replace("–", "-"), font=font)
    assert grid.width >= 2 * text_width  # both cells as wide as the longest label, so no label is cut
    assert grid.height >= 64 + 16  # images enlarged (nearest neighbour) to about 72 px, label above
