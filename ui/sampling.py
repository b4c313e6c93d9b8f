"""Running requests: streamed generation with previews and cancel, and the sampler comparison grid."""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from PIL import Image

from pipelines import SamplingCancelled, SamplingDivergedError, make_grid
from schedulers.registry import SAMPLERS, get_spec

from .errors import UserError
from .models import CACHE
from .outputs import gallery_images, labelled_grid, preview_image, save_outputs
from .requests import Request, make_request, parse_steps, work_budget


def _threads() -> None:
    n = os.environ.get("SAMPLER_LAB_THREADS")
    if n:
        torch.set_num_threads(int(n))


def status_line(req: Request, nfe: int, seconds: float) -> str:
    spec = get_spec(req.sampler)
    rate = req.batch_size / seconds if seconds > 0 else float("inf")
    extra = f" · digit {req.class_label}, w = {req.guidance_scale:g}" if req.class_label is not None else ""
    return (f"✅ {spec.title} · NFE {nfe} · {seconds:.2f} s · {rate:.1f} images/s · batch {req.batch_size} · "
            f"seed {req.seed}{extra}")


@dataclass
class Update:
    """One streamed state of a generation: a preview, and at the end the results."""

    preview: Optional[Image.Image]
    images: Optional[list]
    status: str
    grid_file: Optional[str] = None
    gif_file: Optional[str] = None
    progress: float = 0.0
    done: bool = False


def generate(req: Request, previews: int = 24, cancel: Optional[threading.Event] = None,
             interval: float = 0.4) -> Iterator[Update]:
    """Run one request, yielding previews and then the final result.

    A preview is made every ``nfe / previews`` steps, or sooner when ``interval`` seconds have
    passed, so a long run stays responsive. The pipeline runs in a worker thread; if the
    consumer stops iterating (the user pressed Cancel, or the page closed) ``cancel`` is set
    and the pipeline stops at its next step.
    """
    _threads()
    pipe = CACHE.get(req.checkpoint)
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    every = max(1, req.nfe // max(1, previews))
    nrow = max(1, math.ceil(math.sqrt(req.batch_size)))  # square grids: x_t and x̂₀ side by side
    frames: list = []
    last = [time.perf_counter()]

    def on_step(i, n, x_t, x0_hat):
        now = time.perf_counter()
        if (i + 1) % every and i < n - 1 and now - last[0] < interval:
            return
        last[0] = now
        frame = preview_image(x_t, x0_hat, nrow)
        if len(frames) < 80:
            frames.append(frame.resize((frame.width // 2, frame.height // 2), Image.NEAREST))
        events.put(("preview", frame, (i + 1) / n))

    def work():
        try:
            out = pipe(req.sampler, req.steps, req.params, batch_size=req.batch_size, seed=req.seed,
                       class_labels=req.class_label, guidance_scale=req.guidance_scale, output_type="pt",
                       callback=on_step, callback_steps=1, should_stop=cancel.is_set)
            events.put(("done", out, 1.0))
        except SamplingCancelled:
            events.put(("cancelled", None, 0.0))
        except (SamplingDivergedError, ValueError) as err:
            events.put(("error", str(err), 0.0))
        except Exception as err:  # keep the app alive whatever happens in the model
            events.put(("error", f"{type(err).__name__}: {err}", 0.0))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            kind, payload, frac = events.get()
            if kind == "preview":
                yield Update(payload, None, f"⏳ {get_spec(req.sampler).title}: {frac:.0%} of {req.nfe} steps", progress=frac)
            elif kind == "done":
                grid_file, gif_file = save_outputs(payload.images, frames, req.sampler)
                yield Update(frames[-1] if frames else None, gallery_images(payload.images),
                             status_line(req, payload.nfe, payload.seconds), grid_file, gif_file, 1.0, True)
                return
            elif kind == "cancelled":
                yield Update(None, None, "⏹️ Cancelled.", done=True)
                return
            else:
                yield Update(None, None, f"⚠️ {payload}", done=True)
                return
    finally:
        cancel.set()  # a consumer that stops early stops the worker too
        worker.join(timeout=60)


def generate_blocking(req: Request) -> Update:
    """Run a request to the end and return the final update."""
    last = None
    for last in generate(req, previews=1):
        pass
    return last


def compare(checkpoint, samplers, steps_text, seed, batch_size=4, digit=None, guidance_scale=1.0,
            cancel: Optional[threading.Event] = None) -> tuple[Image.Image, list]:
    """One seed, several samplers × step counts: a labelled grid and a table of NFE and time."""
    samplers = [s for s in (samplers or []) if s]
    if not samplers:
        raise UserError("Pick at least one sampler to compare.")
    if len(samplers) > len(SAMPLERS):
        raise UserError("Too many samplers.")
    steps_list = parse_steps(steps_text)
    requests = []
    for name in samplers:
        for steps in steps_list:
            requests.append(make_request(checkpoint, name, steps, {}, seed, batch_size, digit, guidance_scale))
    total = sum(r.nfe * r.batch_size for r in requests)
    if total > work_budget() * 2:
        raise UserError(f"This comparison needs {total:,} network evaluations × images, more than the budget "
                        f"of {work_budget() * 2:,}; use fewer samplers, steps or images.")
    cells, rows = [], []
    for req in requests:
        if cancel is not None and cancel.is_set():
            raise UserError("Cancelled.")
        out = CACHE.get(checkpoint)(req.sampler, req.steps, req.params, batch_size=req.batch_size, seed=req.seed,
                                    class_labels=req.class_label, guidance_scale=req.guidance_scale, output_type="pt",
                                    should_stop=cancel.is_set if cancel is not None else None)
        label = f"{get_spec(req.sampler).title} · NFE {out.nfe} · {out.seconds:.1f}s"
        cells.append((label, make_grid(out.images, nrow=req.batch_size, padding=1)))
        rows.append([get_spec(req.sampler).title, req.steps, out.nfe, round(out.seconds, 2)])
    return labelled_grid(cells, ncol=len(steps_list)), rows


