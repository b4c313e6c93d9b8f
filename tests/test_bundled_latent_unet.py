"""The bundled latent UNet (checkpoints/mnist-latent-unet): the DiT's latents and autoencoder with a
UNet2DModel. It loads as the latent family, the samplers drive it, guidance gives the requested digit,
its unconditional samples cover every digit (the quality goal the latent DiT misses), plain diffusers
code gets the same digits, and the app offers it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import SamplerPipeline
from pipelines.checkpoint import inspect_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
LATENT_UNET = ROOT / "checkpoints" / "mnist-latent-unet"
DIGITS = [i % 10 for i in range(40)]


@pytest.fixture(scope="module")
def pipe():
    return SamplerPipeline.from_pretrained(str(LATENT_UNET))


def test_it_is_a_class_conditional_latent_unet_on_the_dits_latents():
    info = inspect_checkpoint(str(LATENT_UNET))
    assert info.is_latent and info.denoiser_class == "UNet2DModel"
    assert info.family.num_classes == 10 and info.family.null_class_label == 10
    assert info.decoder.class_name == "AutoencoderKL"
    dit = inspect_checkpoint(str(ROOT / "checkpoints" / "mnist-latent-dit"))
    assert info.decoder.scaling_factor == pytest.approx(dit.decoder.scaling_factor)  # same autoencoder, same latents
    args = json.loads((LATENT_UNET / "training_args.json").read_text())
    from training.presets import unet_config

    preset = unet_config(args["model_preset"], None, resolution=8, channels=4, objective="ddpm", num_class_embeds=11)
    saved = json.loads((LATENT_UNET / "unet" / "config.json").read_text())
    for key, value in preset.items():  # the card's command (--model_preset latent-unet) rebuilds this network
        assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    card = (LATENT_UNET / "README.md").read_text()
    for needed in ("latent UNet", "resume", "requested digit", "UNet2DModel", "AutoencoderKL", "met"):
        assert needed in card, needed


@pytest.mark.parametrize("sampler,steps", [("langevin", 10), ("pc", 5), ("pf_ode", 5), ("sde_multistep", 5)])
def test_score_sde_samplers_drive_it(pipe, sampler, steps):
    out = pipe(sampler, steps, batch_size=2, seed=0, class_labels=[3, 8], guidance_scale=3.0, output_type="pt")
    assert out.images.shape == (2, 1, 32, 32) and torch.isfinite(out.images).all()
    assert out.decoder_calls == 1 and out.nfe >= steps


def test_plain_diffusers_loop_and_the_lab_give_the_requested_digits(pipe, classify):
    """diffusers' own classes and the textbook classifier-free-guidance loop, as in the model card."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(LATENT_UNET, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(LATENT_UNET, subfolder="vae").eval()
    scheduler = DDIMScheduler.from_pretrained(LATENT_UNET, subfolder="scheduler")
    scheduler.set_timesteps(50)
    n, w = len(DIGITS), 3.0
    labels = torch.tensor(DIGITS + [10] * n)
    z = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_c, eps_u = unet(torch.cat([z, z]), t, class_labels=labels).sample.chunk(2)
            z = scheduler.step(eps_u + w * (eps_c - eps_u), t, z).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    plain = float((classify(images) == torch.tensor(DIGITS)).float().mean())
    ours = pipe("ddim", 50, batch_size=n, seed=0, class_labels=DIGITS, guidance_scale=w, output_type="pt",
                scheduler_params={"eta": 0.0})
    lab = float((classify(ours.images) == torch.tensor(DIGITS)).float().mean())
    assert plain >= 0.95 and lab >= 0.95, (plain, lab)


def test_unconditional_samples_cover_every_digit(pipe, classify):
    out = pipe("ddim", 50, batch_size=500, seed=1, guidance_scale=1.0, output_type="pt", scheduler_params={"eta": 1.0})
    counts = np.bincount(classify(out.images).numpy(), minlength=10) / 500
    assert counts.min() >= 0.04 and counts.max() <= 0.17, counts  # 500 samples: s.e. 1.6 points at 15 %, 1 at 5 %


def test_the_app_offers_it():
    from ui import service
    from ui.models import BUNDLED

    label = next(k for k, v in BUNDLED.items() if Path(v).name == "mnist-latent-unet")
    assert "latent" in label.lower() and "unet" in label.lower()
    summary = service.describe(label).lower()
    assert "latent" in summary
