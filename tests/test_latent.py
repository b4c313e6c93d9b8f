"""Latent checkpoints: every sampler drives a latent denoiser (UNet or DiT) and the decoder makes the images.

The published layouts are recreated from their configs with random weights, shrunk only in width
and depth (``block_out_channels``, layers; group-norm sizes follow the width): nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel, VQModel

from pipelines import CheckpointError, SamplerPipeline, inspect_checkpoint
from schedulers.registry import SAMPLERS, create_scheduler, nfe_of, resolve_params
from training import train


def _write(path: Path, name: str, data: dict) -> None:
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data, indent=2))


# CompVis/ldm-celebahq-256: a 64×64×3 UNet2DModel on the latents of a VQModel (×4), DDIM in the old config format
LDM_UNET = {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": 32,
            "block_out_channels": [224, 448, 672, 896], "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 3, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 3, "sample_size": 64,
            "time_embedding_type": "positional",
            "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
LDM_VQVAE = {"_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [128, 256, 512],
             "down_block_types": ["DownEncoderBlock2D"] * 3, "in_channels": 3, "latent_channels": 3, "layers_per_block": 2,
             "norm_num_groups": 32, "num_vq_embeddings": 8192, "out_channels": 3, "sample_size": 256,
             "up_block_types": ["UpDecoderBlock2D"] * 3}
LDM_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.0195, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                 "clip_sample": False, "timesteps": 1000}
# facebook/DiT-XL-2-256: a Transformer2DModel (DiT, learned σ: 8 output channels) on sd-vae-ft-ema latents (×8)
DIT_TRANSFORMER = {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
                   "attention_head_dim": 72, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
                   "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
                   "num_layers": 28, "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False,
                   "use_linear_projection": False}
DIT_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
           "norm_num_groups": 32, "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4}
DIT_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                 "clip_sample": False, "num_train_timesteps": 1000}


def _build(cls, config: dict, **shrink):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in {**config, **shrink}.items() if not k.startswith("_")}
    if cls is DiTTransformer2DModel:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_linear_projection",)}
    return cls(**kwargs).eval()


@pytest.fixture(scope="module")
def ldm_celebahq(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ldm") / "ldm-celebahq-256"
    _build(UNet2DModel, LDM_UNET, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4,
           attention_head_dim=4).save_pretrained(path / "unet")
    _build(VQModel, LDM_VQVAE, block_out_channels=[4, 4, 4], layers_per_block=1, norm_num_groups=2,
           num_vq_embeddings=64).save_pretrained(path / "vqvae")
    cfg = json.loads((path / "vqvae" / "config.json").read_text())
    cfg.pop("scaling_factor", None)  # the published config has none
    _write(path, "vqvae/config.json", cfg)
    _write(path, "scheduler/scheduler_config.json", LDM_SCHEDULER)
    _write(path, "model_index.json", {"_class_name": "LDMPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                                      "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"]})
    return path


@pytest.fixture(scope="module")
def dit_256(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dit") / "DiT-XL-2-256"
    _build(DiTTransformer2DModel, DIT_TRANSFORMER, num_layers=1, num_attention_heads=2,
           attention_head_dim=8).save_pretrained(path / "transformer")
    cfg = json.loads((path / "transformer" / "config.json").read_text())
    _write(path, "transformer/config.json", {**cfg, "_class_name": "Transformer2DModel"})  # as published
    _build(AutoencoderKL, DIT_VAE, block_out_channels=[4, 4, 4, 4], layers_per_block=1,
           norm_num_groups=2).save_pretrained(path / "vae")
    _write(path, "scheduler/scheduler_config.json", DIT_SCHEDULER)
    _write(path, "model_index.json", {"_class_name": "DiTPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                                      "transformer": ["diffusers", "Transformer2DModel"],
                                      "vae": ["diffusers", "AutoencoderKL"]})
    return path


def test_published_layouts_are_read_as_latent_checkpoints(ldm_celebahq, dit_256):
    ldm = inspect_checkpoint(str(ldm_celebahq))
    assert ldm.is_latent and ldm.decoder.class_name == "VQModel" and ldm.decoder.scaling_factor == 1.0
    assert ldm.sampler_config["num_train_timesteps"] == 1000 and ldm.sampler_config["beta_schedule"] == "scaled_linear"
    assert (ldm.in_channels, ldm.sample_size) == (3, 64) and ldm.image_shape == (3, 256, 256)
    assert "1.0 as in the original LDM" in ldm.describe()
    dit = inspect_checkpoint(str(dit_256))
    assert dit.is_latent and dit.denoiser_class == "DiTTransformer2DModel" and dit.decoder.class_name == "AutoencoderKL"
    assert dit.family.num_classes == 1000 and dit.family.null_class_label == 1000
    assert dit.decoder.scaling_factor == pytest.approx(0.18215) and dit.image_shape == (3, 256, 256)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_samples_the_published_latent_layouts(name, ldm_celebahq, dit_256):
    spec = SAMPLERS[name]
    steps = spec.min_steps
    for path, kwargs in ((ldm_celebahq, {}), (dit_256, dict(class_labels=[207], guidance_scale=4.0))):
        pipe = SamplerPipeline.from_pretrained(str(path))
        out = pipe(name, steps, batch_size=1, seed=0, output_type="pt", **kwargs)
        assert out.images.shape == (1, 3, 256, 256) and torch.isfinite(out.images).all()
        assert out.nfe == nfe_of(name, steps, None, pipe.sampler_config) and out.decoder_calls == 1


def test_dit_drops_the_learned_variance_and_guides_with_the_null_class(dit_256):
    pipe = SamplerPipeline.from_pretrained(str(dit_256))
    latents = pipe("ddim", 2, batch_size=2, seed=0, class_labels=[1, 2], guidance_scale=3.0, output_type="latent").images
    assert latents.shape == (2, 4, 32, 32)  # the denoiser's 4 channels, not its 8 outputs
    uncond = pipe("ddim", 2, batch_size=2, seed=0, output_type="latent").images  # the null class 1000
    assert not torch.allclose(latents, uncond)
    with pytest.raises(ValueError, match="class_labels must be in 0..999"):
        pipe("ddim", 2, batch_size=1, seed=0, class_labels=1000)


def test_clipping_x0_is_off_for_latents_and_refused(dit_256, ldm_celebahq):
    pipe = SamplerPipeline.from_pretrained(str(dit_256))
    for name, spec in SAMPLERS.items():
        clip = [p.name for p in spec.params if p.image_range]
        values = resolve_params(name, {}, pipe.sampler_config)
        assert all(values[c] is False for c in clip), name
        for c in clip:
            with pytest.raises(ValueError, match="latent"):
                create_scheduler(name, pipe.sampler_config, {c: True})
    scheduler, _ = create_scheduler("ddim", pipe.sampler_config)
    assert scheduler.config.clip_sample is False


def test_a_latent_folder_without_its_decoder_is_refused(dit_256, tmp_path):
    broken = tmp_path / "no-decoder"
    for part in ("transformer", "scheduler", "model_index.json"):
        src = dit_256 / part
        dst = broken / part
        if src.is_dir():
            dst.mkdir(parents=True)
            for f in src.iterdir():
                (dst / f.name).write_bytes(f.read_bytes())
        else:
            dst.write_bytes(src.read_bytes())
    with pytest.raises(CheckpointError, match=r"names a decoder 'vae'.*vae/config.json is missing"):
        inspect_checkpoint(str(broken))


def test_a_decoder_whose_latents_do_not_fit_the_denoiser_is_refused(ldm_celebahq, tmp_path):
    other = tmp_path / "mismatch"
    for f in ldm_celebahq.rglob("*"):
        if f.is_file():
            (other / f.relative_to(ldm_celebahq)).parent.mkdir(parents=True, exist_ok=True)
            (other / f.relative_to(ldm_celebahq)).write_bytes(f.read_bytes())
    cfg = json.loads((other / "vqvae" / "config.json").read_text())
    _write(other, "vqvae/config.json", {**cfg, "latent_channels": 4})
    with pytest.raises(CheckpointError, match=r"vqvae/config.json .* 4-channel latents.*unet/config.json takes 3 channels"):
        inspect_checkpoint(str(other))


def test_a_vq_codebook_that_does_not_match_its_config_is_a_clear_error(ldm_celebahq, tmp_path):
    other = tmp_path / "codebook"
    for f in ldm_celebahq.rglob("*"):
        if f.is_file():
            (other / f.relative_to(ldm_celebahq)).parent.mkdir(parents=True, exist_ok=True)
            (other / f.relative_to(ldm_celebahq)).write_bytes(f.read_bytes())
    cfg = json.loads((other / "vqvae" / "config.json").read_text())
    _write(other, "vqvae/config.json", {**cfg, "num_vq_embeddings": 128})
    with pytest.raises(CheckpointError, match="could not load the decoder vqvae/"):
        SamplerPipeline.from_pretrained(str(other))


def test_decoder_round_trip_and_scaling(dit_256):
    pipe = SamplerPipeline.from_pretrained(str(dit_256))
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    z = pipe.decoder.encode(images)
    assert z.shape == (2, 4, 32, 32)
    raw = pipe.decoder.model.encode(images).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.18215)  # z = scaling_factor · encoder output
    decoded = pipe.decoder.decode(z)
    torch.testing.assert_close(decoded, pipe.decoder.model.decode(raw).sample.clamp(-1, 1))


@pytest.mark.slow
def test_training_a_latent_dit_gives_a_checkpoint_the_pipeline_samples(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(4, 4, 4), layers_per_block=1,
                        norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32)
    vae.save_pretrained(tmp_path / "ae" / "vae")
    out = tmp_path / "run"
    assert train.main(["--output_dir", str(out), "--vae", str(tmp_path / "ae"), "--backbone", "dit", "--max_train_steps", "2",
                       "--train_batch_size", "4", "--checkpointing_steps", "0", "--save_images_steps", "0", "--no_progress",
                       "--report_to", "none", "--lr_warmup_steps", "1", "--dit_init", "adaln_zero"]) == 0
    info = inspect_checkpoint(str(out / "model"))
    assert info.is_latent and info.denoiser_class == "DiTTransformer2DModel" and info.family.null_class_label == 10
    args = json.loads((out / "model" / "training_args.json").read_text())
    assert info.decoder.scaling_factor == pytest.approx(args["latent_scaling_factor"])  # measured, saved once
    pipe = SamplerPipeline.from_pretrained(str(out / "model"))
    images = pipe("ddim", 2, batch_size=2, seed=0, class_labels=[3, 4], guidance_scale=3.0, output_type="np").images
    assert images.shape == (2, 32, 32, 1) and math.isfinite(float(images.sum()))
    card = (out / "model" / "README.md").read_text()
    assert "latent DiT" in card and "latents 4×8×8 of 32×32 images" in card and "AutoencoderKL" in card, card
    # --dit_init adaln_zero: two small steps leave every block's modulation near 0 (PyTorch's init: std ≈ 0.05)
    assert args["dit_init"] == "adaln_zero"
    dit = DiTTransformer2DModel.from_pretrained(out / "model", subfolder="transformer")
    assert all(float(block.norm1.linear.weight.detach().abs().max()) < 0.01 for block in dit.transformer_blocks)
    assert train.main(["--output_dir", str(tmp_path / "run-default"), "--vae", str(tmp_path / "ae"), "--backbone", "dit",
                       "--max_train_steps", "1", "--train_batch_size", "4", "--checkpointing_steps", "0",
                       "--save_images_steps", "0", "--no_progress", "--report_to", "none"]) == 0
    dit = DiTTransformer2DModel.from_pretrained(tmp_path / "run-default" / "model", subfolder="transformer")
    assert float(dit.transformer_blocks[0].norm1.linear.weight.detach().std()) > 0.03  # diffusers' init by default


def _small_dit(**overrides) -> DiTTransformer2DModel:
    config = dict(num_attention_heads=2, attention_head_dim=8, num_layers=3, patch_size=2, sample_size=8,
                  in_channels=4, out_channels=4, num_embeds_ada_norm=10, norm_num_groups=1)
    return DiTTransformer2DModel(**{**config, **overrides})


def test_dit_paper_initialisation_starts_every_block_as_the_identity():
    """adaLN-Zero (Peebles & Xie 2023, §3.2): the gates are 0, so each block returns its input, and the zeroed
    output layer predicts ε̂ = 0; label rows are N(0, 0.02²) instead of PyTorch's N(0, 1)."""
    from training.presets import init_dit_weights_

    dit = _small_dit()
    torch.manual_seed(0)
    init_dit_weights_(dit)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 7, 10])
    seen = []
    hooks = [block.register_forward_hook(lambda m, inputs, output: seen.append((inputs[0], output)))
             for block in dit.transformer_blocks]
    with torch.no_grad():
        assert float(dit(x, timestep=t, class_labels=y).sample.abs().max()) == 0.0
    for hook in hooks:
        hook.remove()
    assert len(seen) == 3
    for block_input, block_output in seen:
        torch.testing.assert_close(block_output, block_input, rtol=0, atol=0)
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert 0.01 < float(table.detach().std()) < 0.03
    assert float(dit.pos_embed.proj.bias.detach().abs().max()) == 0.0
    # seeded: the same weights twice; and training moves it off zero (the output layer gets gradients first)
    again = _small_dit()
    torch.manual_seed(0)
    init_dit_weights_(again)
    for (name, p), q in zip(dit.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    optimizer = torch.optim.SGD(dit.parameters(), lr=0.1)
    for _ in range(2):
        loss = (dit(x, timestep=t, class_labels=y).sample - torch.randn(3, 4, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(dit.proj_out_2.weight.detach().abs().max()) > 0 and float(dit.transformer_blocks[-1].norm1.linear.weight.detach().abs().max()) > 0


@pytest.mark.parametrize("name", ["ldm_celebahq", "dit_256"])
def test_the_forward_process_view_encodes_at_the_decoders_size(name, ldm_celebahq, dit_256):
    """The app's forward-process tab on a published RGB latent layout: the 32×32 grey digit is resized and
    repeated to the autoencoder's 3 × 256 × 256 before encoding, noised in latent space and decoded."""
    from ui import views

    folder = str({"ldm_celebahq": ldm_celebahq, "dit_256": dit_256}[name])
    vp, ve, note = views.forward_process(folder, 0, 500, 1.0)
    assert vp.size == ve.size and vp.width > vp.height and "latent space" in note
