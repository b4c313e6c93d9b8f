"""Images and files the app shows or offers for download: previews, galleries, grids, GIFs.

Every picture of a model tensor goes through :func:`to_display` — the one place to slot in a
decoder for latent checkpoints (``pipelines.SamplerPipeline.to_images``): galleries, previews,
the trajectory explorer, the comparison grid and the forward-process view all call it.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, ImageDraw, ImageFont

from data.images import enlarge, make_grid, to_uint8

DISPLAY_SIZE = 128  # gallery images are enlarged to this many pixels, nearest-neighbour
PREVIEW_WIDTH = 768  # live previews and the final preview alike


def display_state(x: torch.Tensor) -> torch.Tensor:
    """A sampler state for display: σ-space states (std ≫ 1) are rescaled to unit standard deviation."""
    std = float(x.float().std())
    return x / std if std > 1.0 else x


def to_display(x: torch.Tensor, kind: str = "image", decode: Optional[Callable] = None) -> torch.Tensor:
    """A model tensor ``[B, C, H, W]`` → an image tensor in [-1, 1] with 1 or 3 channels.

    Args:
        kind: ``"image"`` (a sample or x̂₀: decoded when ``decode`` is given, else shown as is),
            ``"state"`` (a noisy state x_t: σ-space states rescaled) or ``"noise"`` (ε̂, shown as ε/3).
        decode: the checkpoint's latent decoder (``pipe.to_images``) for ``kind="image"``.
    """
    x = x.detach().float().cpu()
    if kind == "image" and decode is not None:
        return decode(x).float().cpu()
    if kind == "state":
        x = display_state(x)
    elif kind == "noise":
        x = x / 3.0
    if x.shape[1] not in (1, 3):  # latents (or an x̂₀ shown undecoded): every channel, in false colour
        x = latent_false_colour(x / 2.0 if kind != "noise" else x)
    return x


def latent_palette(channels: int) -> torch.Tensor:
    """``[C, 3]``: the RGB colour of each latent channel (red, green, blue, yellow, magenta, cyan, then
    the same again), each row summing to 1 over the colours it lights."""
    base = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [1.0, 0, 1.0], [0, 1.0, 1.0]])
    return base[torch.arange(channels) % len(base)]


def latent_false_colour(z: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` (values of about unit scale) → ``[B, 3, h, w]`` in [-1, 1]: each channel
    adds its value in its own colour (:func:`latent_palette`), each colour averaged over the channels
    that light it, so a 4-channel latent shows as one small image in which every channel is visible."""
    palette = latent_palette(z.shape[1]).to(z.dtype)  # [C, 3]
    rgb = torch.einsum("bchw,ck->bkhw", z, palette) / palette.sum(0).clamp_min(1.0).view(1, 3, 1, 1)
    return rgb.clamp(-1.0, 1.0)


def preview_image(x_t: torch.Tensor, x0_hat: torch.Tensor, nrow: int, decode: Optional[Callable] = None) -> Image.Image:
    """x_t and x̂₀ grids side by side, enlarged to :data:`PREVIEW_WIDTH`; for a latent checkpoint the
    latent x_t in false colour (:func:`latent_false_colour`) beside the decoded x̂₀ (one batched decode)."""
    state, image = to_display(x_t, "state"), to_display(x0_hat, "image", decode)
    if state.shape[-2:] != image.shape[-2:]:  # a latent state (8×8) beside decoded images (32×32): same size on screen
        state = torch.nn.functional.interpolate(state, size=image.shape[-2:], mode="nearest")
    a, b = make_grid(state, nrow=nrow), make_grid(image, nrow=nrow)
    if b.mode != a.mode:
        a, b = a.convert("RGB"), b.convert("RGB")
    canvas = Image.new(a.mode, (a.width + b.width + 6, max(a.height, b.height)), 255 if a.mode == "L" else (255,) * 3)
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 6, 0))
    return enlarge(canvas, PREVIEW_WIDTH)


def panel(x: torch.Tensor, kind: str = "image", size: int = 160, decode: Optional[Callable] = None) -> Image.Image:
    """One image of a tensor ``[1, C, H, W]`` (or several, in a row), enlarged nearest-neighbour."""
    return enlarge(make_grid(to_display(x, kind, decode), nrow=x.shape[0], padding=0), size * x.shape[0])


def _outdir() -> Path:
    d = Path(tempfile.gettempdir()) / "sampler-lab"
    d.mkdir(parents=True, exist_ok=True)
    files = sorted(d.glob("*"), key=_mtime)
    for old in files[:-40]:  # keep the newest downloads only; the disk must not fill up
        old.unlink(missing_ok=True)
    return d


def _mtime(path: Path) -> float:
    """A file's modification time, or 0 when another request (or the sweeper) deleted it meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def sweep_files(folder, age: float, keep=()) -> int:
    """Delete files under ``folder`` not modified for ``age`` seconds (except ``keep``), and the folders
    left empty; returns how many files went. Gradio's own ``delete_cache`` misses the copies it makes for
    streamed and per-session outputs (measured: previews and download files of every request stayed)."""
    now, removed = time.time(), 0
    keep = {str(k) for k in keep}
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            try:
                if path not in keep and now - os.path.getmtime(path) > age:
                    os.remove(path)
                    removed += 1
            except OSError:
                continue
        if root != str(folder):
            try:
                os.rmdir(root)  # only succeeds when empty
            except OSError:
                pass
    return removed


def start_sweeper(folders, age: float, every: float, keep=lambda: ()) -> threading.Thread:
    """A daemon thread that calls :func:`sweep_files` on ``folders`` every ``every`` seconds."""
    def loop():
        while True:
            time.sleep(every)
            for folder in folders:
                if os.path.isdir(folder):
                    sweep_files(folder, age, keep())

    thread = threading.Thread(target=loop, daemon=True, name="sweeper")
    thread.start()
    return thread


def save_outputs(final: torch.Tensor, frames: list, tag: str) -> tuple[str, str]:
    """Write the grid (PNG, lossless) and the trajectory animation (GIF); return their paths."""
    d = _outdir()
    stamp = f"{tag}-{time.time_ns()}"
    grid_path = d / f"samples-{stamp}.png"
    enlarge(make_grid(to_display(final), nrow=min(8, final.shape[0])), 1024).save(grid_path)
    gif_path = d / f"trajectory-{stamp}.gif"
    frames = frames or [preview_image(final, final, min(8, final.shape[0]))]
    frames = [f.convert("P") if f.mode != "P" else f for f in frames]
    frames[0].save(gif_path, save_all=True, append_images=frames[1:] + [frames[-1]] * 4, duration=120, loop=0)
    return str(grid_path), str(gif_path)


def gallery_images(x: torch.Tensor) -> list:
    return [enlarge(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)) for a in to_uint8(to_display(x))]


def figure_image(fig) -> Image.Image:
    """A matplotlib ``Figure`` (made without pyplot, so nothing keeps it alive) as a PNG image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    image = Image.open(buf)
    image.load()
    return image


@functools.lru_cache(maxsize=1)
def _label_font():
    """DejaVu Sans where the system has it (it has every glyph of our labels), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11), True
    except OSError:
        return ImageFont.load_default(), False  # lacks the en dash: labels fall back to "-"


def labelled_grid(cells: list, ncol: int, cell_height: int = 72) -> Image.Image:
    """Tile (label, image) cells with the label written above each; images enlarged to about ``cell_height``.

    A label may have several lines (``\\n``)."""
    scaled = []
    for label, img in cells:
        k = max(1, round(cell_height / img.height))
        scaled.append((label, img.resize((img.width * k, img.height * k), Image.NEAREST)))
    font, has_dash = _label_font()
    scaled = [(label if has_dash else label.replace("–", "-"), img) for label, img in scaled]
    lines = max(label.count("\n") + 1 for label, _ in scaled)
    w = max(max(img.width, max(int(font.getlength(part)) for part in label.split("\n")) + 2) for label, img in scaled)
    head = 14 * lines + 2
    h = max(img.height for _, img in scaled) + head
    nrows = -(-len(scaled) // ncol)
    canvas = Image.new("RGB", (ncol * (w + 8) + 8, nrows * (h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, img) in enumerate(scaled):
        r, c = divmod(k, ncol)
        x, y = 8 + c * (w + 8), 8 + r * (h + 8)
        for j, part in enumerate(label.split("\n")):
            draw.text((x, y + 14 * j), part, fill="black", font=font)
        canvas.paste(img.convert("RGB"), (x, y + head))
    return canvas
