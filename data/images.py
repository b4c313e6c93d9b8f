"""Image conversions shared by training, evaluation and the app: uint8 pixels ↔ the models'
[-1, 1] range, PIL images, grids and nearest-neighbour enlargement."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 → float in [-1, 1] (x/127.5 − 1)."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-range images ``[B, C, H, W]`` in [-1, 1] → uint8 ``[B, H, W, C]``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_unit_float(x: torch.Tensor) -> np.ndarray:
    """Model-range images → float32 ``[B, H, W, C]`` in [0, 1], quantised as the PNG would be."""
    return to_uint8(x).astype(np.float32) / 255.0


def to_pil(x: torch.Tensor) -> list:
    """Model-range images → PIL images (mode ``L`` for one channel)."""
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(x)]


def to_model_range(images_uint8: np.ndarray, resolution: int, mode: str = "pad") -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, H, W, C]`` → float ``[N, C, R, R]`` in [-1, 1].

    ``mode="pad"`` centres smaller images on a black canvas (MNIST 28 → 32 without blurring);
    ``"resize"`` resizes the shorter side to R (bilinear, antialiased) and centre-crops.
    """
    x = torch.from_numpy(np.ascontiguousarray(images_uint8))
    if x.ndim == 3:
        x = x[:, None]  # [N, H, W] -> [N, 1, H, W]
    else:
        x = x.permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    x = uint8_to_model(x)
    h, w = x.shape[-2:]
    if mode == "pad" and h <= resolution and w <= resolution:
        top, left = (resolution - h) // 2, (resolution - w) // 2
        x = F.pad(x, (left, resolution - w - left, top, resolution - h - top), value=-1.0)
    elif mode in ("pad", "resize"):
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        x = x[..., top:top + resolution, left:left + resolution]
    else:
        raise ValueError(f"resize mode must be 'pad' or 'resize', got {mode!r}")
    return x.clamp(-1.0, 1.0).contiguous()



def make_grid(images, nrow: int = 4, padding: int = 2, scale: int = 1):
    """Tile PIL images, uint8/float ``[B, H, W, C]`` arrays or model-range tensors into one PIL image.

    ``scale`` > 1 enlarges with nearest-neighbour, so small images stay sharp.
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        arr = to_uint8(images)
    elif isinstance(images, np.ndarray):
        arr = images if images.dtype == np.uint8 else (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    else:
        arr = np.stack([np.asarray(im) for im in images])
    if arr.ndim == 3:
        arr = arr[..., None]
    b, h, w, c = arr.shape
    ncol = min(nrow, b)
    nrows = -(-b // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top:top + h, left:left + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def enlarge(img, size: int = 128):
    """Nearest-neighbour enlargement by a whole factor to about ``size`` pixels, so small digits stay crisp."""
    from PIL import Image

    scale = max(1, size // max(img.width, img.height))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
