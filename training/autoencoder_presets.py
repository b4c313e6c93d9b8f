"""``AutoencoderKL`` presets for ``training/train_autoencoder.py`` (``--vae_preset``, or ``--vae_config`` JSON).

With ``n`` entries in ``block_out_channels`` the encoder downsamples by 2^(n−1): three blocks map
32×32 images to 8×8 latents (f = 4), each of ``latent_channels`` channels.
"""

from __future__ import annotations

import json
from pathlib import Path

PRESETS = {
    # 32×32×1 → 8×8×4 on 2 CPU cores (≈0.6M parameters).
    "mnist-f4": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        mid_block_add_attention=True,
    ),
    # For tests: a few thousand parameters.
    "tiny": dict(
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    ),
}


def vae_config(preset: str | None, config_path: str | None = None, *, resolution: int, channels: int,
               overrides: dict | None = None) -> dict:
    """The ``AutoencoderKL`` keyword arguments of a run: a preset (or a config JSON), then ``overrides``
    (the non-None command-line model arguments), then the data's resolution and channels.

    Raises:
        ValueError: for an unknown preset, a missing config file, or a shape the network cannot take.
    """
    if config_path:
        path = Path(config_path)
        if not path.exists():
            raise ValueError(f"--vae_config: {config_path} does not exist")
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    else:
        if preset not in PRESETS:
            raise ValueError(f"--vae_preset must be one of {sorted(PRESETS)}, got {preset!r}")
        config = dict(PRESETS[preset])
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    blocks = tuple(int(c) for c in config["block_out_channels"])
    groups = int(config.get("norm_num_groups", 32))
    if any(c % groups for c in blocks):
        raise ValueError(f"norm_num_groups {groups} must divide every entry of block_out_channels {list(blocks)}")
    factor = 2 ** (len(blocks) - 1)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not divisible by the downsampling factor {factor} "
                         f"({len(blocks)} blocks)")
    config.update(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        in_channels=channels, out_channels=channels, sample_size=resolution,
    )
    return config


def latent_shape(config: dict) -> tuple[int, int, int]:
    """``(C, H, W)`` of the latents the encoder produces for one image."""
    side = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
    return config.get("latent_channels", 4), side, side
