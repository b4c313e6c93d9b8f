"""Running requests: streamed generation with previews, trajectory capture and cancel, and the
sampler comparison at equal cost.

Both run the pipeline in a worker thread and are generators: when the consumer stops iterating
(Gradio closes the generator when the user presses Cancel or the page goes away) the ``finally``
block sets the cancel event and the pipeline stops before its next step. While a run is going
they yield at least every ``interval`` seconds, so Gradio can close them promptly.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from PIL import Image

from pipelines import SamplingCancelled, SamplingDivergedError, make_grid
from pipelines.device import MPS_UNSUPPORTED, is_mps_unsupported, is_out_of_memory, out_of_memory_message
from pipelines.device import label as device_label
from schedulers.registry import SAMPLERS, get_spec, nfe_of

from .errors import UserError
from .models import CACHE, checkpoint_summary
from .outputs import gallery_images, labelled_grid, preview_image, save_outputs, to_display
from .requests import Request, make_request, parse_numbers, steps_for_budget, work_budget
from .spaces_gpu import gpu
from .trajectory import TRAJECTORIES, Trajectory, TrajectoryRecorder

log = logging.getLogger("sampler_lab")


def choose_threads(cpus: Optional[int] = None) -> int:
    """torch threads for this machine: ``SAMPLER_LAB_THREADS`` if set; else one thread on a machine with
    at most 2 usable cores (a Space's free CPU tier: the web server, the previews and other tenants need
    the other core, and two threads there collapse under load — see ``benchmarks/bench_app.py``), else
    half the cores, at most 8."""
    env = os.environ.get("SAMPLER_LAB_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(8, cpus // 2)


def apply_threads() -> int:
    n = choose_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _rate(images: int, seconds: float) -> str:
    """'12.3 images/s', or '4.2 s/image' when less than one image a second (never '0.0 images/s')."""
    if seconds <= 0:
        return "∞ images/s"
    rate = images / seconds
    if rate >= 1:
        return f"{rate:.1f} images/s"
    return f"{seconds / images:.1f} s/image"


def status_line(req: Request, nfe: int, seconds: float, decoder_calls: Optional[int] = None,
                device: Optional[str] = None) -> str:
    """The finished run's line; ``decoder_calls`` (latent checkpoints) is counted apart from NFE; ``device``
    names where it ran (``pipelines.device.label``: 'cpu', 'cuda (NVIDIA …)', with the network's dtype
    when it is not float32)."""
    spec = get_spec(req.sampler)
    extra = f" · digit {req.digit}, w = {req.guidance_scale:g}" if req.class_label is not None else ""
    decodes = f" · {decoder_calls} decoder call{'s' * (decoder_calls != 1)} (batched)" if decoder_calls is not None else ""
    where = f" · {device}" if device else ""
    return (f"✅ {spec.title} · NFE {nfe}{decodes} · {seconds:.2f} s · {_rate(req.batch_size, seconds)} · "
            f"batch {req.batch_size} · seed {req.seed}{extra}{where}")


def _failure(err: Exception, pipe, req: Request) -> str:
    """The message of a run that failed: out of memory names a batch that fits; anything else as it is."""
    if is_out_of_memory(err):
        guided = req.class_label is not None and req.guidance_scale != 1.0
        return out_of_memory_message(req.batch_size, pipe.device, pipe.bytes_per_image(guided))
    if is_mps_unsupported(err):
        return MPS_UNSUPPORTED
    return f"{type(err).__name__}: {err}"


def progress_line(title: str, done: int, total: int, elapsed: float) -> str:
    """'⏳ DDIM: step 20 of 50 (40%) · 1.2 s · about 1.8 s left'."""
    frac = done / max(1, total)
    left = f" · about {elapsed / frac * (1 - frac):.1f} s left" if 0 < frac < 1 and elapsed > 0.2 else ""
    return f"⏳ {title}: step {done} of {total} ({frac:.0%}) · {elapsed:.1f} s{left}"


@dataclass
class Update:
    """One streamed state of a generation: a preview, and at the end the results.

    ``kind``: ``"preview"``, ``"tick"`` (no new picture, only the status), ``"done"``, ``"cancelled"``
    or ``"error"``.
    """

    preview: Optional[Image.Image]
    images: Optional[list]
    status: str
    grid_file: Optional[str] = None
    gif_file: Optional[str] = None
    progress: float = 0.0
    done: bool = False
    kind: str = "preview"
    run_id: Optional[str] = None
    seconds: float = 0.0
    nfe: int = 0
    tensor: Optional[torch.Tensor] = field(default=None, repr=False)
    trajectory: Optional[Trajectory] = field(default=None, repr=False)  # handed to TRAJECTORIES by generate()


def _initial_state(pipe, req: Request, scheduler) -> torch.Tensor:
    """The pipeline's first draw for this seed (its documented contract: ``randn(shape, generator) · init_noise_sigma``)."""
    g = torch.Generator("cpu").manual_seed(int(req.seed))
    return torch.randn((req.batch_size, *pipe.sample_shape), generator=g) * scheduler.init_noise_sigma


class _CountingDecoder:
    """A latent checkpoint's ``to_images`` that counts this request's calls (the decoder is shared by requests)."""

    def __init__(self, pipe):
        self.to_images, self.calls = pipe.to_images, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.to_images(x)


def _decoder(pipe) -> Optional[_CountingDecoder]:
    return _CountingDecoder(pipe) if getattr(pipe, "decoder", None) is not None else None


def generate(req: Request, previews: int = 24, cancel: Optional[threading.Event] = None,
             interval: float = 0.4, trajectory_image: Optional[int] = 0) -> Iterator[Update]:
    """Run one request, yielding previews and then the final result.

    A preview is made every ``nfe / previews`` steps, or sooner when ``interval`` seconds have
    passed, so a long run stays responsive; a ``"tick"`` update (status only) comes at least every
    ``interval`` seconds. The trajectory of image ``trajectory_image`` is stored (``None``: not
    recorded) and the final update carries its ``run_id``.

    The sampling itself (:func:`run_on_device`) is the part a ZeroGPU Space runs on its GPU
    (``ui.spaces_gpu``); the trajectory is stored here, in the server's own process.
    """
    kwargs = {} if cancel is None else {"cancel": cancel}  # an Event cannot travel to ZeroGPU's worker
    stream = run_on_device(req, previews, interval=interval, trajectory_image=trajectory_image, **kwargs)
    try:
        for upd in stream:
            if upd.trajectory is not None:
                upd.run_id = TRAJECTORIES.add(upd.trajectory) if len(upd.trajectory) else None
                upd.trajectory = None
            yield upd
    finally:
        stream.close()  # a consumer that stops early (Cancel, a closed page) stops the sampling too


@gpu
def run_on_device(req: Request, previews: int = 24, cancel: Optional[threading.Event] = None,
                  interval: float = 0.4, trajectory_image: Optional[int] = 0) -> Iterator[Update]:
    """:func:`generate`'s sampling: the same updates, the final one carrying the recorded trajectory
    instead of a run id (the GPU call of a ZeroGPU Space)."""
    apply_threads()
    pipe = CACHE.get(req.checkpoint)
    title = get_spec(req.sampler).title
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    every = max(1, req.nfe // max(1, previews))
    nrow = max(1, math.ceil(math.sqrt(req.batch_size)))  # square grids: x_t and x̂₀ side by side
    decode = _decoder(pipe)
    frames: list = []
    last_frame: list = [None]
    last = [time.perf_counter()]
    recorder = None
    trajectory = None
    if trajectory_image is not None:
        k = int(trajectory_image)
        if not 0 <= k < req.batch_size:
            raise UserError(f"trajectory image must be between 0 and {req.batch_size - 1} (an image of the batch), got {k}")
        scheduler, _, _ = pipe.prepare(req.sampler, req.steps, req.params)
        trajectory = Trajectory(req.sampler, title, req.nfe, k, dict(pipe.sampler_config), checkpoint=req.checkpoint,
                                latent=decode is not None)
        recorder = TrajectoryRecorder(scheduler, pipe.schedule, _initial_state(pipe, req, scheduler), k, trajectory)

    def on_step(i, n, x_t, x0_hat):
        if recorder is not None:
            recorder(i, n, x_t, x0_hat)
        now = time.perf_counter()
        if (i + 1) % every and i < n - 1 and now - last[0] < interval:
            return
        last[0] = now
        frame = preview_image(x_t, x0_hat, nrow, decode)
        last_frame[0] = frame
        if len(frames) < 80:
            frames.append(frame.resize((frame.width // 2, frame.height // 2), Image.NEAREST))
        events.put(("preview", frame, i + 1))

    def work():
        try:
            out = pipe(req.sampler, req.steps, req.params, batch_size=req.batch_size, seed=req.seed,
                       class_labels=req.class_label, guidance_scale=req.guidance_scale, output_type="pt",
                       callback=on_step, callback_steps=1, should_stop=cancel.is_set)
            events.put(("done", out, req.nfe))
        except SamplingCancelled:
            events.put(("cancelled", None, 0))
        except (SamplingDivergedError, ValueError) as err:  # SamplingOutOfMemoryError: a batch size that fits
            events.put(("error", str(err), 0))
        except Exception as err:  # keep the app alive whatever happens in the model
            events.put(("error", _failure(err, pipe, req), 0))

    start = time.perf_counter()
    worker = threading.Thread(target=work, daemon=True, name=f"sample-{req.sampler}")
    finished = False
    worker.start()
    done_steps = 0
    try:
        while True:
            try:
                kind, payload, steps = events.get(timeout=interval)
            except queue.Empty:
                elapsed = time.perf_counter() - start
                yield Update(None, None, progress_line(title, done_steps, req.nfe, elapsed), progress=done_steps / req.nfe,
                             kind="tick")
                continue
            elapsed = time.perf_counter() - start
            if kind == "preview":
                done_steps = steps
                yield Update(payload, None, progress_line(title, steps, req.nfe, elapsed), progress=steps / req.nfe)
            elif kind == "done":
                finished = True
                images = payload.images.cpu()  # off the accelerator: files, gallery and the caller
                grid_file, gif_file = save_outputs(images, frames, req.sampler)
                decodes = None if decode is None else decode.calls + payload.decoder_calls
                yield Update(last_frame[0], gallery_images(images),
                             status_line(req, payload.nfe, payload.seconds, decodes,
                                         device_label(pipe.device, pipe.network_dtype)),
                             grid_file, gif_file, 1.0, True, "done", None, payload.seconds, payload.nfe,
                             images, trajectory=trajectory)
                return
            elif kind == "cancelled":
                finished = True
                yield Update(None, None, f"⏹️ Cancelled after {done_steps} of {req.nfe} steps.", done=True, kind="cancelled")
                return
            else:
                finished = True
                yield Update(None, None, f"⚠️ {payload}", done=True, kind="error")
                return
    finally:
        stopped = not finished
        cancel.set()  # a consumer that stops early stops the worker too
        worker.join(timeout=60)
        if stopped:
            log.info("generate stopped: %s, %d of %d steps done; worker %s", req.sampler, done_steps, req.nfe,
                     "still running" if worker.is_alive() else "ended")


def generate_blocking(req: Request, **kwargs) -> Update:
    """Run a request to the end and return the final update."""
    last = None
    for last in generate(req, previews=1, **kwargs):
        pass
    return last


# ---- compare ----

@dataclass
class Cell:
    """One cell of a comparison: a sampler at one budget (or step count)."""

    request: Request
    budget: Optional[int]  # the NFE budget it was converted from (None: the step count was given)
    nfe: Optional[int] = None
    seconds: Optional[float] = None


@dataclass
class CompareUpdate:
    image: Optional[Image.Image]
    rows: list
    status: str
    conversion: str = ""
    done: bool = False
    kind: str = "progress"


ROW_HEADERS = ["sampler", "budget (NFE)", "steps", "NFE", "seconds"]


def plan_compare(checkpoint, samplers, counts, mode: str = "nfe", seed=0, batch_size=4, digit=None,
                 guidance_scale=None) -> list:
    """The cells of a comparison: each sampler × each NFE budget (converted to its steps with
    ``schedulers.registry.steps_for_nfe``) or × each step count (``mode="steps"``); every cell at the
    sampler's registry defaults, the same seed, hence the same initial noise."""
    samplers = [s for s in (samplers or []) if s]
    if not samplers:
        raise UserError("samplers: pick at least one sampler to compare.")
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise UserError(f"samplers: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(SAMPLERS)}.")
    if mode not in ("nfe", "steps"):
        raise UserError(f"mode must be 'nfe' (equal cost) or 'steps', got {mode!r}")
    numbers = parse_numbers(counts, "NFE budgets" if mode == "nfe" else "step counts")
    base = checkpoint_summary(checkpoint)["sampler_config"]
    cells = []
    for name in dict.fromkeys(samplers):
        for n in numbers:
            steps = steps_for_budget(name, n, base) if mode == "nfe" else n
            req = make_request(checkpoint, name, steps, None, seed, batch_size, digit, guidance_scale)
            cells.append(Cell(req, n if mode == "nfe" else None))
    total = sum(c.request.nfe * c.request.batch_size for c in cells)
    if total > work_budget() * 2:
        raise UserError(f"This comparison needs {total:,} network evaluations × images, more than the budget "
                        f"of {work_budget() * 2:,}; use fewer samplers, budgets or images.")
    return cells


def conversion_text(cells: list) -> str:
    """Markdown: how each budget became each sampler's steps (and the NFE that gives)."""
    lines = ["| sampler | budget | → steps | = NFE |", "|---|---:|---:|---:|"]
    for c in cells:
        spec = get_spec(c.request.sampler)
        budget = "—" if c.budget is None else str(c.budget)
        lines.append(f"| {spec.title} | {budget} | {c.request.steps} {spec.steps_label} | {c.request.nfe} |")
    return "\n".join(lines)


def _row(c: Cell) -> list:
    return [get_spec(c.request.sampler).title, c.budget if c.budget is not None else "", c.request.steps,
            c.nfe if c.nfe is not None else c.request.nfe, round(c.seconds, 2) if c.seconds is not None else None]


def _cells_image(cells: list, images: dict, ncol: int) -> Image.Image:
    tiles = []
    for j, c in enumerate(cells):
        title = get_spec(c.request.sampler).title
        if j in images:
            label = f"{title}\n{c.request.steps} {get_spec(c.request.sampler).steps_label} · NFE {c.nfe} · {c.seconds:.2f} s"
            tiles.append((label, images[j]))
        else:
            label = f"{title}\n{c.request.steps} {get_spec(c.request.sampler).steps_label} · NFE {c.request.nfe} · …"
            size = images[next(iter(images))].size if images else (34 * c.request.batch_size, 34)
            tiles.append((label, Image.new("L", size, 200)))
    return labelled_grid(tiles, ncol=ncol)


@gpu
def compare(checkpoint, samplers, counts, seed=0, batch_size=4, digit=None, guidance_scale=None, mode: str = "nfe",
            cancel: Optional[threading.Event] = None, interval: float = 0.5) -> Iterator[CompareUpdate]:
    """Several samplers side by side at equal cost (``mode="nfe"``: each budget converted to each
    sampler's steps) or at equal step counts; one seed, so every cell starts from the same noise.

    Yields the grid as cells finish (and a status tick at least every ``interval`` seconds); the
    last update has ``done=True``. Closing the generator cancels the run at the next step.
    """
    apply_threads()
    cells = plan_compare(checkpoint, samplers, counts, mode, seed, batch_size, digit, guidance_scale)
    ncol = len({(c.budget if c.budget is not None else c.request.steps) for c in cells})
    ncol = max(1, min(ncol, len(cells)))
    conversion = conversion_text(cells)
    pipe = CACHE.get(checkpoint)  # its output_type="pt" images are decoded already for a latent checkpoint
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()

    def work():
        try:
            for j, c in enumerate(cells):
                r = c.request
                out = pipe(r.sampler, r.steps, r.params, batch_size=r.batch_size, seed=r.seed, class_labels=r.class_label,
                           guidance_scale=r.guidance_scale, output_type="pt", should_stop=cancel.is_set)
                events.put(("cell", j, out))
            events.put(("done", None, None))
        except SamplingCancelled:
            events.put(("cancelled", None, None))
        except (SamplingDivergedError, ValueError) as err:
            events.put(("error", None, str(err)))
        except Exception as err:  # keep the app alive
            events.put(("error", None, _failure(err, pipe, cells[0].request)))

    images: dict = {}
    start = time.perf_counter()
    worker = threading.Thread(target=work, daemon=True, name="compare")
    finished = False
    worker.start()
    try:
        yield CompareUpdate(None, [_row(c) for c in cells], f"⏳ {len(cells)} runs planned", conversion)
        while True:
            try:
                kind, j, payload = events.get(timeout=interval)
            except queue.Empty:
                yield CompareUpdate(None, [_row(c) for c in cells],
                                    f"⏳ {len(images)} of {len(cells)} runs · {time.perf_counter() - start:.1f} s", conversion,
                                    kind="tick")
                continue
            if kind == "cell":
                cells[j].nfe, cells[j].seconds = payload.nfe, payload.seconds
                images[j] = make_grid(to_display(payload.images, "image"), nrow=cells[j].request.batch_size, padding=1)
                done = len(images) == len(cells)
                status = (f"{'✅' if done else '⏳'} {len(images)} of {len(cells)} runs · seed {cells[0].request.seed}"
                          + (f" · digit {cells[0].request.digit}" if cells[0].request.class_label is not None else ""))
                yield CompareUpdate(_cells_image(cells, images, ncol), [_row(c) for c in cells], status, conversion)
            elif kind == "done":
                finished = True
                yield CompareUpdate(_cells_image(cells, images, ncol), [_row(c) for c in cells],
                                    f"✅ {len(cells)} runs · seed {cells[0].request.seed} · "
                                    f"{time.perf_counter() - start:.1f} s", conversion, done=True, kind="done")
                return
            elif kind == "cancelled":
                finished = True
                yield CompareUpdate(None, [_row(c) for c in cells], "⏹️ Cancelled.", conversion, done=True, kind="cancelled")
                return
            else:
                finished = True
                yield CompareUpdate(None, [_row(c) for c in cells], f"⚠️ {payload}", conversion, done=True, kind="error")
                return
    finally:
        stopped = not finished
        cancel.set()
        worker.join(timeout=60)
        if stopped:
            log.info("compare stopped: %d of %d runs done; worker %s", len(images), len(cells),
                     "still running" if worker.is_alive() else "ended")


def compare_blocking(*args, **kwargs) -> CompareUpdate:
    last = None
    for last in compare(*args, **kwargs):
        pass
    return last


def nfe_for(checkpoint, sampler, steps, params) -> int:
    """NFE of a sampler setting on a checkpoint (for the UI's NFE line)."""
    req = make_request(checkpoint, sampler, steps, params, 0, 1, None, None) if steps is not None else None
    if req is not None:
        return req.nfe
    return nfe_of(sampler, get_spec(sampler).default_steps, params, checkpoint_summary(checkpoint)["sampler_config"])
