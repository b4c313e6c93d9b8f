"""Published pixel-space layouts, recreated from their configs with random weights, sample with every sampler.

Only ``block_out_channels`` is shrunk (with ``norm_num_groups`` following the width); resolution,
blocks, depth and the scheduler configs are as published. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from pipelines import SamplerPipeline, inspect_checkpoint
from schedulers.registry import SAMPLERS, nfe_of

# google/ddpm-cifar10-32 (and google/ddpm-ema-cifar10-32)
DDPM_CIFAR10 = {"act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
                "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
                "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
                "time_embedding_type": "positional",
                "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
# google/ddpm-{celebahq,church,bedroom,cat}-256 (and the ddpm-ema-* variants): one architecture
DDPM_256 = {"act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 128, 256, 256, 512, 512],
            "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
            "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                  "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}
LAYOUTS = {
    "google/ddpm-cifar10-32": (DDPM_CIFAR10, [8, 16, 16, 16]),
    "google/ddpm-celebahq-256": (DDPM_256, [4, 4, 8, 8, 8, 8]),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def published(request, tmp_path_factory) -> tuple[str, Path]:
    config, width = LAYOUTS[request.param]
    path = tmp_path_factory.mktemp("published") / request.param.split("/")[1]
    torch.manual_seed(0)
    UNet2DModel(**{**config, "block_out_channels": width, "norm_num_groups": 4}).eval().save_pretrained(path / "unet")
    (path / "scheduler").mkdir(parents=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                                                       "unet": ["diffusers", "UNet2DModel"]}))
    return request.param, path


@pytest.mark.slow
def test_every_sampler_samples_a_published_ddpm_layout(published):
    name, path = published
    info = inspect_checkpoint(str(path))
    assert info.family.kind == "vp" and not info.is_latent and info.sample_size == (32 if "cifar" in name else 256)
    pipe = SamplerPipeline.from_pretrained(str(path))
    for sampler, spec in SAMPLERS.items():
        steps = spec.min_steps
        out = pipe(sampler, steps, batch_size=1, seed=0, output_type="pt")
        assert out.images.shape == (1, 3, info.sample_size, info.sample_size), (name, sampler)
        assert torch.isfinite(out.images).all(), (name, sampler)
        assert out.nfe == nfe_of(sampler, steps, None, pipe.sampler_config), (name, sampler)
