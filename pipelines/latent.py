"""Latent checkpoints: the one place that maps between a denoiser's latents and images.

A latent checkpoint (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"; Peebles & Xie 2023, DiT) has a denoiser that works on latents z of shape ``[C, h, w]``
and a decoder (``AutoencoderKL`` or ``VQModel``) that turns them into images. Every sampler runs
on the latents unchanged; only here are they scaled and decoded:

    image = decoder.decode(z / scaling_factor)          z = scaling_factor · encoder(image)

``scaling_factor`` (Stable Diffusion's 0.18215, or the value measured on the training data for
the lab's own autoencoder, ``training/train_autoencoder.py``) brings the latents to about unit
variance, which is what the noise schedule assumes. Per decoder family:

- ``AutoencoderKL``: its config's ``scaling_factor``.
- ``VQModel``: its config's ``scaling_factor`` when the saved config states one; the published
  LDM checkpoints (``CompVis/ldm-celebahq-256``) state none, and the original LDM code used no
  scaling for VQ models, so 1.0 (diffusers' class default 0.18215 would misscale them). Decoding
  quantises to the codebook, as the original model does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DECODER_FOLDERS = {"vae": "AutoencoderKL", "vqvae": "VQModel"}


@dataclass
class DecoderInfo:
    """What a checkpoint's decoder is, read from its folder without loading weights.

    Attributes:
        folder: the component folder (``vae/`` or ``vqvae/``).
        class_name: ``"AutoencoderKL"`` or ``"VQModel"``.
        config: its ``config.json``.
        scaling_factor: latents are ``scaling_factor ×`` the encoder's output.
        scaling_note: where ``scaling_factor`` came from, for the status line.
    """

    folder: Path
    class_name: str
    config: dict
    scaling_factor: float
    scaling_note: str

    @property
    def latent_channels(self) -> int:
        if self.class_name == "VQModel":
            return int(self.config.get("latent_channels", self.config.get("vq_embed_dim") or 3))
        return int(self.config.get("latent_channels", 4))

    @property
    def downsampling(self) -> int:
        """Image side / latent side: 2^(number of down blocks − 1)."""
        return 2 ** (len(self.config.get("down_block_types", ("DownEncoderBlock2D",))) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.config.get("out_channels", 3))


def inspect_decoder(folder: Path, class_name: str) -> DecoderInfo:
    """Read a decoder folder's config and decide its scaling factor (see the module docstring)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    stated = config.get("scaling_factor")
    if class_name == "VQModel" and stated is None:
        return DecoderInfo(Path(folder), class_name, config, 1.0,
                           "VQ decoder, no scaling_factor in its config: 1.0 as in the original LDM")
    factor = float(stated if stated is not None else 0.18215)
    note = f"scaling_factor {factor:g} from its config" if stated is not None else "scaling_factor 0.18215 (diffusers' default)"
    return DecoderInfo(Path(folder), class_name, config, factor, note)


class LatentDecoder:
    """Decode (and encode) latents of a checkpoint's autoencoder (the app counts its decodes per request).

    Args:
        model: an ``AutoencoderKL`` or ``VQModel``.
        scaling_factor: z = scaling_factor · encoder output.
        note: where the scaling factor came from (shown to users).
    """

    def __init__(self, model, scaling_factor: float, note: str = ""):
        self.model = model
        self.scaling_factor = float(scaling_factor)
        self.note = note
        self.is_vq = type(model).__name__ == "VQModel"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, C', H, W]`` in [-1, 1] (float32, on ``z``'s device)."""
        out = []
        for i in range(0, z.shape[0], batch_size):
            chunk = (z[i:i + batch_size] / self.scaling_factor).to(self.device, self.dtype)
            out.append(self.model.decode(chunk).sample.float().clamp(-1, 1).to(z.device))
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = False) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (the posterior mean, or a draw from it with ``sample``)."""
        x = images.to(self.device, self.dtype)
        if self.is_vq:
            h = self.model.encode(x).latents
        else:
            dist = self.model.encode(x).latent_dist
            h = dist.mean
            if sample:
                z = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
                h = h + dist.std * z
        return (h * self.scaling_factor).float().to(images.device)


def load_decoder(info: DecoderInfo, device="cpu", dtype=None) -> LatentDecoder:
    """Load the decoder of a checkpoint (safetensors only) in eval mode."""
    import diffusers

    cls = getattr(diffusers, info.class_name)
    model = cls.from_pretrained(info.folder, use_safetensors=True, torch_dtype=dtype or torch.float32)
    model = model.to(torch.device(device)).eval().requires_grad_(False)
    return LatentDecoder(model, info.scaling_factor, info.scaling_note)
