"""Network presets for ``training/train.py``: ``UNet2DModel`` (``--model_preset`` or ``--model_config`` JSON) and
DiT transformers (``--backbone dit --dit_preset``)."""

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
    # ≈4.6M parameters, for 8×8 latents (two downsamplings, attention at 4×4 and 2×2): the bundled
    # checkpoints/mnist-latent-unet; ~300 images/s on one CPU core.
    "latent-unet": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=32,
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


DIT_PRESETS = {
    # DiT (Peebles & Xie 2023) sizes for small latents (e.g. 8×8×4); patch size 1 keeps one token per latent pixel.
    # ≈2.8M parameters, 16 tokens of 2×2 latent patches at 8×8: for 2 CPU cores.
    "dit-cpu": dict(num_attention_heads=4, attention_head_dim=32, num_layers=8, patch_size=2),
    # the same width and depth with one token per latent pixel (64 tokens at 8×8; ~4× the FLOPs per evaluation): the
    # bundled checkpoints/mnist-latent-dit, whose unconditional samples cover the digits evenly where patch 2's do not.
    "dit-cpu-p1": dict(num_attention_heads=4, attention_head_dim=32, num_layers=8, patch_size=1),
    # ≈5M parameters, one token per latent pixel (64 tokens at 8×8).
    "dit-cpu-base": dict(num_attention_heads=6, attention_head_dim=32, num_layers=8, patch_size=1),
    # DiT-S/2's width and depth (≈33M parameters): for a GPU.
    "dit-s": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
}


def dit_config(preset: str, config_path: str | None, *, sample_size: int, channels: int, num_classes: int,
               patch_size: int | None = None) -> dict:
    """The ``DiTTransformer2DModel`` keyword arguments for a run: class-conditional (``num_classes`` classes
    plus the null label ``num_classes`` of classifier-free guidance), ε-prediction without learned variance."""
    if config_path:
        path = Path(config_path)
        if not path.exists():
            raise FileNotFoundError(f"--model_config: {config_path} does not exist")
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    else:
        if preset not in DIT_PRESETS:
            raise ValueError(f"--dit_preset must be one of {sorted(DIT_PRESETS)}, got {preset!r}")
        config = dict(DIT_PRESETS[preset])
    if patch_size:
        config["patch_size"] = patch_size
    if sample_size % config["patch_size"]:
        raise ValueError(f"the latent size {sample_size} is not a multiple of the DiT patch size {config['patch_size']}")
    config.update(sample_size=sample_size, in_channels=channels, out_channels=channels, num_embeds_ada_norm=num_classes,
                  norm_num_groups=1)
    return config


DIT_INITS = ("adaln_zero", "default")


def init_dit_weights_(model) -> None:
    """Initialise a diffusers ``DiTTransformer2DModel`` in place as the DiT paper does (Peebles & Xie 2023, §3.2
    "adaLN-Zero block" and their reference ``initialize_weights``); diffusers leaves PyTorch's defaults.

    - every ``nn.Linear`` and the patch projection: Xavier-uniform weights, zero biases;
    - class-label tables and the timestep MLPs: N(0, 0.02²) (PyTorch's N(0, 1) label rows would swamp the
      timestep embedding they are added to);
    - the adaLN modulation of every block and of the output layer, and the output projection: zero, so each
      residual block starts as the identity (its gates α are 0) and the network starts by predicting 0.

    Call under a seeded ``torch.manual_seed`` for reproducible weights.
    """
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = model.pos_embed.proj  # a Conv2d with kernel = stride = patch size: a linear map of each patch
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    for block in model.transformer_blocks:
        embedding = block.norm1.emb  # each diffusers block has its own timestep + label embedding
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: shift, scale and gate of both sub-layers start at 0
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):  # output adaLN and projection: the model starts at ε̂ = 0
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
