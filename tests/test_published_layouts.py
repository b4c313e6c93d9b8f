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


# ---- NCSN++ (score_sde, VE): google/ncsnpp-{celebahq,ffhq,church,bedroom}-256 and google/ncsnpp-ffhq-1024 ----
# As published on the Hub (main): a flat folder, config.json (UNet2DModel) + scheduler_config.json
# (ScoreSdeVeScheduler) + model_index.json naming the network "model", weights as a pickle
# (diffusion_pytorch_model.bin, which this lab refuses: here the random weights are saved as safetensors).
# The four 256×256 repos share one network config (ch_mult 1,1,2,2,2,2,2 × 128, 2 res blocks, attention at
# 16×16: Song et al. 2021, configs/ve/*_256_ncsnpp_continuous.py); the 1024×1024 one is nf 16,
# ch_mult 1,2,4,8,16,32,32,32, 1 res block.
NCSNPP_256 = {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
              "block_out_channels": [128, 128, 256, 256, 256, 256, 256], "center_input_sample": True,
              "down_block_types": ["SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D",
                                   "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"],
              "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 3, "layers_per_block": 2,
              "mid_block_scale_factor": 1.41421356237, "norm_eps": 1e-06, "norm_num_groups": None, "out_channels": 3,
              "sample_size": 256, "time_embedding_type": "fourier",
              "up_block_types": ["SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D",
                                 "SkipUpBlock2D", "SkipUpBlock2D"]}
NCSNPP_1024 = {**NCSNPP_256, "block_out_channels": [16, 32, 64, 128, 256, 512, 512, 512], "layers_per_block": 1,
               "sample_size": 1024,
               "down_block_types": ["SkipDownBlock2D"] * 6 + ["AttnSkipDownBlock2D", "SkipDownBlock2D"],
               "up_block_types": ["SkipUpBlock2D", "AttnSkipUpBlock2D"] + ["SkipUpBlock2D"] * 6}


def _ve(sigma_max, snr) -> dict:
    return {"_class_name": "ScoreSdeVeScheduler", "_diffusers_version": "0.1.1", "correct_steps": 1,
            "num_train_timesteps": 2000, "sampling_eps": 1e-05, "sigma_max": sigma_max, "sigma_min": 0.01, "snr": snr}


# Only block_out_channels shrink. The skip blocks' attention normalises with 32 groups (fixed in diffusers),
# so the levels from the attention block down keep 32 channels; the others shrink to 8–16.
NCSNPP_LAYOUTS = {
    "google/ncsnpp-celebahq-256": (NCSNPP_256, _ve(380, 0.075), [8, 8, 16, 32, 32, 32, 32]),
    "google/ncsnpp-ffhq-256": (NCSNPP_256, _ve(380, 0.075), [8, 8, 16, 32, 32, 32, 32]),
    "google/ncsnpp-church-256": (NCSNPP_256, _ve(380, 0.075), [8, 8, 16, 32, 32, 32, 32]),
    "google/ncsnpp-bedroom-256": (NCSNPP_256, _ve(380, 0.075), [8, 8, 16, 32, 32, 32, 32]),
    "google/ncsnpp-ffhq-1024": (NCSNPP_1024, _ve(1348, 0.15), [4, 4, 8, 8, 16, 32, 32, 32]),
}


def _write_ncsnpp(path: Path, config: dict, scheduler: dict, width: list) -> None:
    torch.manual_seed(0)
    with torch.device("meta"):  # the published widths build in this diffusers (structure only, no memory)
        UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet = UNet2DModel(**{**{k: v for k, v in config.items() if not k.startswith("_")}, "block_out_channels": width})
    unet.eval().save_pretrained(path)  # flat, as published: config.json + weights at the top
    (path / "scheduler_config.json").write_text(json.dumps(scheduler))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "ScoreSdeVePipeline",
                                                       "scheduler": ["diffusers", "ScoreSdeVeScheduler"],
                                                       "model": ["diffusers", "UNet2DModel"]}))


@pytest.fixture(scope="module", params=list(NCSNPP_LAYOUTS))
def published_ncsnpp(request, tmp_path_factory) -> tuple[str, Path]:
    config, scheduler, width = NCSNPP_LAYOUTS[request.param]
    path = tmp_path_factory.mktemp("published") / request.param.split("/")[1]
    _write_ncsnpp(path, config, scheduler, width)
    return request.param, path


@pytest.mark.slow
def test_every_sampler_samples_a_published_ncsnpp_layout(published_ncsnpp):
    name, path = published_ncsnpp
    config, scheduler, _ = NCSNPP_LAYOUTS[name]
    info = inspect_checkpoint(str(path))
    f = info.family
    assert f.kind == "ve" and f.data_range == (0.0, 1.0) and not info.is_latent
    assert (f.sigma_min, f.sigma_max) == (scheduler["sigma_min"], scheduler["sigma_max"])
    assert info.sample_size == config["sample_size"] and info.in_channels == 3
    # every published scheduler option is honoured or reported: here snr (0.075/0.15, not the pc default 0.16)
    assert [n.split(" =")[0] for n in info.notes] == ["snr"], info.notes
    assert "set snr=" in info.notes[0] and "`pc`" in info.notes[0]
    pipe = SamplerPipeline.from_pretrained(str(path))
    size = info.sample_size
    for sampler, spec in SAMPLERS.items():
        steps = spec.min_steps
        out = pipe(sampler, steps, batch_size=1, seed=0, output_type="pt")
        assert out.images.shape == (1, 3, size, size), (name, sampler)
        assert torch.isfinite(out.images).all(), (name, sampler)
        assert out.nfe == nfe_of(sampler, steps, None, pipe.sampler_config), (name, sampler)
    # the published snr, set on the predictor–corrector sampler as the note says
    out = pipe("pc", 1, {"snr": scheduler["snr"], "corrector_steps": scheduler["correct_steps"]}, batch_size=1, seed=0,
               output_type="pt")
    assert out.nfe == 2 and torch.isfinite(out.images).all()


def test_published_scheduler_options_are_honoured_or_reported():
    """Every option of a published scheduler config is either what this lab does or named in a note."""
    from pipelines.checkpoint import family_from_configs, scheduler_notes

    unet = {"time_embedding_type": "positional"}
    ddpm = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}
    family, _ = family_from_configs(ddpm, unet)
    assert scheduler_notes(ddpm, family) == []  # google/ddpm-*: all of it applies
    ddim = {**ddpm, "_class_name": "DDIMScheduler", "clip_sample": False, "timestep_spacing": "trailing",
            "steps_offset": 1, "set_alpha_to_one": False, "variance_type": "learned_range", "thresholding": False,
            "rescale_betas_zero_snr": True, "skip_prk_steps": True}
    notes = scheduler_notes(ddim, family_from_configs(ddim, unet)[0])
    assert sorted(n.split(" =")[0] for n in notes) == sorted(
        ["clip_sample", "timestep_spacing", "steps_offset", "set_alpha_to_one", "variance_type",
         "rescale_betas_zero_snr", "skip_prk_steps"])
    assert any("clip_sample=False" in n for n in notes)
    ve = _ve(50.0, 0.16)
    fourier = {"time_embedding_type": "fourier"}
    assert scheduler_notes(ve, family_from_configs(ve, fourier)[0]) == []  # this lab's own NCSN configs
    odd = {**ve, "correct_steps": 2, "sampling_eps": 0.1, "something_new": 3}
    notes = scheduler_notes(odd, family_from_configs(odd, fourier)[0])
    assert sorted(n.split(" =")[0] for n in notes) == ["correct_steps", "sampling_eps", "something_new"]
    assert any("corrector_steps=2" in n for n in notes)
