"""What the app does, without the UI: load and cache checkpoints, validate requests, run the
pipeline with streamed previews, render grids, comparisons, animations and schedule plots.

``app.py`` only lays these out in Gradio. Every function here takes and returns plain Python
values, so the tests call them directly.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines import CheckpointError, SamplerPipeline, SamplingCancelled, SamplingDivergedError, make_grid
from pipelines.sampling import to_uint8
from schedulers.registry import SAMPLERS, get_spec, nfe_of, resolve_params

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = ROOT / "checkpoints"
BUNDLED = {
    "MNIST DDPM, class-conditional (bundled)": CHECKPOINT_DIR / "mnist-ddpm-cond",
    "MNIST NCSN score network (bundled)": CHECKPOINT_DIR / "mnist-ncsn",
}
DEFAULT_CHECKPOINT = next(iter(BUNDLED))
DISPLAY_SIZE = 128  # gallery images are enlarged to this many pixels, nearest-neighbour
MAX_BATCH = 64


class UserError(ValueError):
    """A request the app refuses; the message is shown to the user as is."""


def on_space() -> bool:
    """True when running on Hugging Face Spaces (``SPACE_ID`` is set)."""
    return bool(os.environ.get("SPACE_ID"))


def work_budget() -> int:
    """Largest NFE × batch size one request may ask for (``SAMPLER_LAB_MAX_WORK``, default 32,000)."""
    try:
        return max(1, int(os.environ.get("SAMPLER_LAB_MAX_WORK", "32000")))
    except ValueError:
        return 32000


def _threads() -> None:
    n = os.environ.get("SAMPLER_LAB_THREADS")
    if n:
        torch.set_num_threads(int(n))


class ModelCache:
    """A small LRU cache of loaded pipelines, keyed by the resolved checkpoint folder.

    Loading is serialised by a lock, so two requests for the same checkpoint load it once.
    """

    def __init__(self, max_items: int = 3):
        self.max_items = max_items
        self._items: OrderedDict[str, SamplerPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, choice: str) -> str:
        """A bundled checkpoint's label → its folder; anything else is a path or a Hub repo id."""
        choice = (choice or "").strip()
        if not choice:
            raise UserError("Choose a checkpoint: a bundled one, a local folder or a Hub repo id.")
        return str(BUNDLED.get(choice, choice))

    def get(self, choice: str) -> SamplerPipeline:
        source = self.resolve(choice)
        with self._lock:
            if source in self._items:
                self._items.move_to_end(source)
                return self._items[source]
            allowed = [str(CHECKPOINT_DIR)] if on_space() else None
            try:
                pipe = SamplerPipeline.from_pretrained(source, allowed_roots=allowed)
            except CheckpointError as err:
                raise UserError(str(err)) from err
            self._items[source] = pipe
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return pipe

    def __len__(self) -> int:
        return len(self._items)


CACHE = ModelCache()


def describe(choice: str) -> str:
    """Markdown describing a checkpoint (loads it into the cache)."""
    pipe = CACHE.get(choice)
    info = pipe.info
    lines = [f"**{info.describe()}**", f"source: `{info.source}`"]
    args = info.training_args
    if args:
        lines.append(f"trained by `training/train.py`: objective `{args.get('objective')}`, "
                     f"{args.get('max_train_steps')} steps on {args.get('data_source')}")
    return "  \n".join(lines)


def checkpoint_summary(choice: str) -> dict:
    """Facts the UI adapts to: conditional or not, number of classes, family."""
    f = CACHE.get(choice).family
    return {"conditional": f.is_conditional, "num_classes": f.num_classes or 0, "guidance": f.null_class_label is not None,
            "family": f.kind}


# ---------------------------------------------------------------- validation

def _number(value, name: str, lo: float, hi: float, integer: bool = False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{name} must be finite")
    if integer and x != int(x):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not lo <= x <= hi:
        raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return int(x) if integer else x


@dataclass
class Request:
    """A validated sampling request."""

    checkpoint: str
    sampler: str
    steps: int
    params: dict
    seed: int
    batch_size: int
    class_label: Optional[int]
    guidance_scale: float
    nfe: int


def make_request(checkpoint, sampler, steps, params, seed, batch_size, digit=None, guidance_scale=1.0) -> Request:
    """Validate everything on the server side (the UI's own limits can be bypassed through the API)."""
    if sampler not in SAMPLERS:
        raise UserError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    spec = get_spec(sampler)
    steps = _number(steps, spec.steps_label, 2 if sampler == "langevin" else 1, 10_000, integer=True)
    seed = _number(seed, "seed", 0, 2**63 - 1, integer=True)
    batch_size = _number(batch_size, "batch size", 1, MAX_BATCH, integer=True)
    clean = {k: v for k, v in (params or {}).items() if k in spec.defaults()}
    try:
        values = resolve_params(sampler, clean)
        nfe = nfe_of(sampler, steps, clean, CACHE.get(checkpoint).sampler_config)
    except ValueError as err:
        raise UserError(str(err)) from err
    if nfe * batch_size > work_budget():
        raise UserError(f"{nfe} network evaluations × batch {batch_size} = {nfe * batch_size:,} exceeds this server's budget "
                        f"of {work_budget():,}; lower the steps or the batch size.")
    summary = checkpoint_summary(checkpoint)
    label = None
    if summary["conditional"] and digit not in (None, "", "random", "none", "unconditional"):
        label = _number(digit, "digit", 0, summary["num_classes"] - 1, integer=True)
    guidance_scale = _number(guidance_scale if guidance_scale is not None else 1.0, "guidance scale", 0, 20)
    if label is None:
        guidance_scale = 1.0
    if summary["conditional"] and label is None and not summary["guidance"]:
        raise UserError("This checkpoint needs a class label.")
    return Request(checkpoint, sampler, steps, values, seed, batch_size, label, guidance_scale, nfe)


# ---------------------------------------------------------------- images

def enlarge(img: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """Nearest-neighbour enlargement, so 32×32 digits stay crisp."""
    scale = max(1, size // max(img.width, img.height))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def display_state(x: torch.Tensor) -> torch.Tensor:
    """A sampler state for display: σ-space states (std ≫ 1) are rescaled to unit standard deviation."""
    std = float(x.float().std())
    return x / std if std > 1.0 else x


def preview_image(x_t: torch.Tensor, x0_hat: torch.Tensor, nrow: int) -> Image.Image:
    """x_t and x̂₀ grids side by side, enlarged."""
    a = make_grid(display_state(x_t), nrow=nrow)
    b = make_grid(x0_hat, nrow=nrow)
    canvas = Image.new(a.mode, (a.width + b.width + 6, max(a.height, b.height)), 255)
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 6, 0))
    return enlarge(canvas, 768)


def _outdir() -> Path:
    d = Path(tempfile.gettempdir()) / "sampler-lab"
    d.mkdir(parents=True, exist_ok=True)
    files = sorted(d.glob("*"), key=lambda p: p.stat().st_mtime)
    for old in files[:-40]:  # keep the newest downloads only; the disk must not fill up
        old.unlink(missing_ok=True)
    return d


def save_outputs(final: torch.Tensor, frames: list, tag: str) -> tuple[str, str]:
    """Write the grid (PNG, lossless) and the trajectory animation (GIF); return their paths."""
    d = _outdir()
    stamp = f"{tag}-{time.time_ns()}"
    grid_path = d / f"samples-{stamp}.png"
    enlarge(make_grid(final, nrow=min(8, final.shape[0])), 1024).save(grid_path)
    gif_path = d / f"trajectory-{stamp}.gif"
    frames = frames or [preview_image(final, final, min(8, final.shape[0]))]
    frames = [f.convert("P") if f.mode != "P" else f for f in frames]
    frames[0].save(gif_path, save_all=True, append_images=frames[1:] + [frames[-1]] * 4, duration=120, loop=0)
    return str(grid_path), str(gif_path)


def gallery_images(x: torch.Tensor) -> list:
    return [enlarge(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)) for a in to_uint8(x)]


def status_line(req: Request, nfe: int, seconds: float) -> str:
    spec = get_spec(req.sampler)
    rate = req.batch_size / seconds if seconds > 0 else float("inf")
    extra = f" · digit {req.class_label}, w = {req.guidance_scale:g}" if req.class_label is not None else ""
    return (f"✅ {spec.title} · NFE {nfe} · {seconds:.2f} s · {rate:.1f} images/s · batch {req.batch_size} · "
            f"seed {req.seed}{extra}")


# ---------------------------------------------------------------- sampling

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


# ---------------------------------------------------------------- compare

def parse_steps(text) -> list[int]:
    """'10, 25, 50' → [10, 25, 50]."""
    if isinstance(text, (int, float)):
        return [int(text)]
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        raise UserError("Give at least one step count, e.g. 10, 25, 50.")
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise UserError(f"Step counts must be whole numbers, got {p!r}.") from None
    if len(out) > 6:
        raise UserError("At most 6 step counts at a time.")
    return out


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


@functools.lru_cache(maxsize=1)
def _label_font():
    """DejaVu Sans where the system has it (it has every glyph of our labels), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11), True
    except OSError:
        return ImageFont.load_default(), False  # lacks the en dash: labels fall back to "-"


def labelled_grid(cells: list, ncol: int, cell_height: int = 72) -> Image.Image:
    """Tile (label, image) cells with the label written above each; images enlarged to about ``cell_height``."""
    scaled = []
    for label, img in cells:
        k = max(1, round(cell_height / img.height))
        scaled.append((label, img.resize((img.width * k, img.height * k), Image.NEAREST)))
    font, has_dash = _label_font()
    scaled = [(label if has_dash else label.replace("–", "-"), img) for label, img in scaled]
    w = max(max(img.width, int(font.getlength(label)) + 2) for label, img in scaled)
    h = max(img.height for _, img in scaled) + 16
    nrows = -(-len(scaled) // ncol)
    canvas = Image.new("RGB", (ncol * (w + 8) + 8, nrows * (h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, img) in enumerate(scaled):
        r, c = divmod(k, ncol)
        x, y = 8 + c * (w + 8), 8 + r * (h + 8)
        draw.text((x, y), label, fill="black", font=font)
        canvas.paste(img.convert("RGB"), (x, y + 16))
    return canvas


# ---------------------------------------------------------------- forward process and schedules

_DIGITS: Optional[torch.Tensor] = None


def held_out_digits() -> torch.Tensor:
    """The 1,000 held-out MNIST digits at 32×32 in [-1, 1] (loaded once)."""
    global _DIGITS
    if _DIGITS is None:
        from training.data import load_mnist_5k, to_model_range

        images, _ = load_mnist_5k("test")
        _DIGITS = to_model_range(images, 32)
    return _DIGITS


def forward_process(checkpoint, index, t, sigma, seed=0) -> tuple[Image.Image, Image.Image, str]:
    """A held-out digit noised by the VP forward process at label t and by the SMLD one at σ."""
    from schedulers import AnnealedLangevinScheduler
    from diffusers import DDPMScheduler

    pipe = CACHE.get(checkpoint)
    digits = held_out_digits()
    index = _number(index, "digit index", 0, len(digits) - 1, integer=True)
    T = pipe.schedule.num_train_timesteps
    t = _number(t, "t", 0, T - 1, integer=True)
    sigma = _number(sigma, "σ", 1e-3, 1e3)
    x_0 = digits[index:index + 1]
    if pipe.info is not None and pipe.info.sample_size != 32:
        x_0 = torch.nn.functional.interpolate(x_0, size=pipe.info.sample_size, mode="nearest")
    if x_0.shape[1] != pipe.sample_shape[0]:
        x_0 = x_0.expand(-1, pipe.sample_shape[0], -1, -1)
    z = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(int(seed)))
    ddpm = DDPMScheduler(**{k: v for k, v in pipe.sampler_config.items() if v is not None})
    x_t = ddpm.add_noise(x_0, z, torch.tensor([t]))  # q(x_t | x_0)
    x_sigma = AnnealedLangevinScheduler(**pipe.sampler_config).add_noise(
        x_0, z, pipe.schedule.sigma_to_t(torch.tensor([sigma])))  # x̃ = x_0 + σ z
    ab = float(pipe.schedule.alphas_cumprod[t])
    note = (f"VP: ᾱ_t = {ab:.4g}, √ᾱ_t = {math.sqrt(ab):.3f}, σ_t = √((1-ᾱ)/ᾱ) = {math.sqrt((1 - ab) / ab):.3g}.  "
            f"SMLD: σ = {sigma:g} (shown rescaled by 1/√(1+σ²) so the pixels stay in range).")
    vp_img = enlarge(make_grid(x_t, nrow=1, padding=0), 256)
    ve_img = enlarge(make_grid(x_sigma / math.sqrt(1 + sigma**2), nrow=1, padding=0), 256)
    return vp_img, ve_img, note


def schedule_figure(checkpoint):
    """β_t, ᾱ_t and σ_t (log scale) of the loaded checkpoint's schedule, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = CACHE.get(checkpoint)
    s = pipe.schedule
    t = np.arange(s.num_train_timesteps)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))
    axes[0].plot(t, s.betas.numpy())
    axes[0].set_title("β_t")
    axes[1].plot(t, s.alphas_cumprod.numpy())
    axes[1].set_title("ᾱ_t")
    axes[2].semilogy(t, s.sigmas.numpy())
    axes[2].set_title("σ_t = √((1-ᾱ_t)/ᾱ_t)")
    for ax in axes:
        ax.set_xlabel("timestep label t")
        ax.grid(alpha=0.3)
    fam = pipe.family
    if fam.kind == "ve":
        fig.suptitle(f"VE network (σ ∈ [{fam.sigma_min:g}, {fam.sigma_max:g}] in its pixels) seen through this VP schedule",
                     fontsize=9)
    fig.tight_layout()
    return fig
