"""The app's logic, called directly: validation, budgets, streaming, cancel, errors, caching,
concurrency and memory, on small checkpoints made by the tests (and the bundled ones)."""

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


def test_make_request_validates_everything(cond_ckpt, monkeypatch):
    req = service.make_request(cond_ckpt, "langevin", 10, {"steps_per_level": 2}, 5, 4, "3", 2.0)
    assert req.nfe == 21 and req.class_label == 3 and req.guidance_scale == 2.0
    unconditional = service.make_request(cond_ckpt, "ddim", 10, {}, 5, 4, "unconditional", 7.0)
    assert unconditional.class_label is None and unconditional.guidance_scale == 1.0
    bad = [
        (dict(steps=0), "between"), (dict(steps=2.5), "whole number"), (dict(steps="ten"), "number"),
        (dict(batch_size=1000), "batch size"), (dict(seed=-1), "seed"), (dict(sampler="nope"), "Unknown sampler"),
        (dict(digit=12), "digit"), (dict(guidance_scale=float("inf")), "finite"),
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


def test_generate_streams_previews_then_results(cond_ckpt):
    req = service.make_request(cond_ckpt, "ddim", 12, {}, 1, 3, "2", 3.0)
    updates = list(service.generate(req, previews=4))
    assert [u.done for u in updates].count(True) == 1 and updates[-1].done
    assert len(updates) >= 4
    assert all(isinstance(u.preview, Image.Image) for u in updates[:-1])
    final = updates[-1]
    assert len(final.images) == 3 and final.images[0].size == (128, 128)  # 8× nearest-neighbour
    assert "NFE 12" in final.status and "images/s" in final.status
    grid = Image.open(final.grid_file)
    assert grid.format == "PNG"
    gif = Image.open(final.gif_file)
    assert gif.format == "GIF" and gif.n_frames >= 4
    # the gallery images are exact enlargements: every 8×8 block is one colour
    arr = np.asarray(final.images[0])
    assert (arr[::8, ::8].repeat(8, 0).repeat(8, 1) == arr).all()


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


def test_cancel_stops_the_worker(cond_ckpt):
    req = service.make_request(cond_ckpt, "ddpm", 1000, {}, 0, 1, None, 1.0)
    cancel = threading.Event()
    stream = service.generate(req, previews=200, cancel=cancel)
    first = next(stream)
    assert not first.done
    stream.close()  # what Gradio does when the user presses Cancel
    assert cancel.is_set()


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


def test_space_refuses_local_paths_outside_the_app(cond_ckpt, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/lab")
    cache = service.ModelCache()
    with pytest.raises(UserError, match="outside"):
        cache.get(cond_ckpt)


def test_cache_loads_once_and_evicts(cond_ckpt, tmp_path):
    cache = service.ModelCache(max_items=1)
    assert cache.get(cond_ckpt) is cache.get(cond_ckpt)
    other = tmp_path / "other"
    save_checkpoint(other, tiny_unet(), ModelFamily(kind="vp"), dict(DDPMScheduler().config))
    cache.get(str(other))
    assert len(cache) == 1


def test_compare_grid_and_table(cond_ckpt):
    image, rows = service.compare(cond_ckpt, ["ddim", "langevin"], "3, 5", seed=0, batch_size=2, digit="4", guidance_scale=2)
    assert [r[:3] for r in rows] == [["DDIM", 3, 3], ["DDIM", 5, 5], ["Annealed Langevin (SMLD/NCSN)", 3, 10],
                                     ["Annealed Langevin (SMLD/NCSN)", 5, 16]]
    assert image.width > image.height > 0
    with pytest.raises(UserError, match="at least one sampler"):
        service.compare(cond_ckpt, [], "3", 0)
    with pytest.raises(UserError, match="whole numbers"):
        service.compare(cond_ckpt, ["ddim"], "3, x", 0)


def test_forward_process_and_schedule_plot(cond_ckpt):
    vp, ve, note = service.forward_process(cond_ckpt, 3, 999, 50.0)
    assert vp.size == ve.size == (256, 256) and "ᾱ_t" in note
    clean, _, _ = service.forward_process(cond_ckpt, 3, 0, 0.01)
    # at t = 0 the digit is almost clean; at t = 999 it is noise: the clean image is mostly black (-1)
    assert np.asarray(clean).mean() < np.asarray(vp).mean()
    fig = service.schedule_figure(cond_ckpt)
    assert len(fig.axes) == 3


def test_memory_does_not_grow_over_twenty_requests(cond_ckpt):
    req = service.make_request(cond_ckpt, "ddim", 10, {}, 0, 8, "1", 2.0)
    for _ in range(3):
        service.generate_blocking(req)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):
        service.generate_blocking(req)
    gc.collect()
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB over 20 requests"


def test_bundled_checkpoints_load_and_sample():
    for label in service.BUNDLED:
        summary = service.checkpoint_summary(label)
        assert summary["family"] in ("vp", "ve")
        req = service.make_request(label, "ddim", 5, {}, 0, 2, "7" if summary["conditional"] else None, 3.0)
        final = service.generate_blocking(req)
        assert final.images and len(final.images) == 2


def test_labelled_grid_fits_long_labels_on_small_images():
    from PIL import Image, ImageDraw

    from ui.outputs import _label_font, labelled_grid

    label = "VP-SDE Euler–Maruyama · NFE 1000 · 12.3s"
    grid = labelled_grid([(label, Image.new("L", (32, 32), 255)), ("DDIM", Image.new("L", (32, 32), 255))], ncol=2)
    font, has_dash = _label_font()
    text_width = ImageDraw.Draw(grid).textlength(label if has_dash else label.replace("–", "-"), font=font)
    assert grid.width >= 2 * text_width  # both cells as wide as the longest label, so no label is cut
    assert grid.height >= 64 + 16  # images enlarged (nearest neighbour) to about 72 px, label above
