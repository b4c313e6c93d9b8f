"""Images and files the app shows or offers for download: previews, galleries, grids, GIFs."""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from data.images import enlarge, make_grid, to_uint8

DISPLAY_SIZE = 128  # gallery images are enlarged to this many pixels, nearest-neighbour


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


