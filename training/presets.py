"""UNet2DModel presets for ``training/train.py`` (``--model_preset`` or ``--model_config`` JSON)."""

from __future__ import annotations

import json
from pathlib import Path

PRESETS = {
    # ≈0.7M parameters: trains on 2 CPU cores at ~100–250 images/s at 32×32×1.
    "cpu-small": dict(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # ≈1.1M parameters.
    "cpu-base": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # The architecture of google/ddpm-cifar10-32 (≈36M parameters): for a GPU.
    "cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=None,
        dropout=0.1,
    ),
}


def unet_config(preset: str | None, config_path: str | None, *, resolution: int, channels: int, objective: str,
                num_class_embeds: int | None) -> dict:
    """The ``UNet2DModel`` keyword arguments for a run.

    ``objective="ncsn"`` switches to a Fourier time embedding fed σ (diffusers' NCSN++ convention,
    whose UNet divides its output by σ, so the network outputs the score).
    """
    if config_path:
        path = Path(config_path)
        if not path.exists():
            raise FileNotFoundError(f"--model_config: {config_path} does not exist")
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    else:
        if preset not in PRESETS:
            raise ValueError(f"--model_preset must be one of {sorted(PRESETS)}, got {preset!r}")
        config = dict(PRESETS[preset])
    config.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    if objective == "ncsn":
        config["time_embedding_type"] = "fourier"
    if num_class_embeds is not None:
        config["num_class_embeds"] = num_class_embeds
    return config
