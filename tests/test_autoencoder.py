"""training/train_autoencoder.py: a tiny run writes a loadable diffusers AutoencoderKL folder with its
scaling factor and metrics; a resumed run ends bit-identical to an uninterrupted one; a non-finite loss
and bad data stop with a clear message; the PSNR helper matches a hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training import train_autoencoder as tae
from training.checkpointing import TrainingError

# Tiny network on a small image folder: every run here takes about a second on one core.
TINY = ["--vae_preset", "tiny", "--resolution", "16", "--train_batch_size", "8", "--lr_warmup_steps", "0",
        "--learning_rate", "2e-3", "--no_progress", "--num_threads", "1"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 grayscale 16×16 images in two class sub-folders (bright squares and bars)."""
    root = tmp_path_factory.mktemp("vae_data")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(12):
            img = np.zeros((16, 16), dtype=np.uint8)
            r, c = rng.integers(2, 10, size=2)
            if label == "a":
                img[r:r + 5, c:c + 5] = 255
            else:
                img[:, c:c + 3] = 200
            Image.fromarray(img, mode="L").save(root / label / f"{i}.png")
    return root


def run(out, folder, *extra) -> int:
    return tae.main(["--output_dir", str(out), "--train_data_dir", str(folder), *TINY, *extra])


def test_a_tiny_run_writes_a_loadable_autoencoder_with_scaling_factor_and_metrics(tmp_path, image_folder):
    from diffusers import AutoencoderKL

    out = tmp_path / "run"
    assert run(out, image_folder, "--max_train_steps", "4", "--checkpointing_steps", "2") == 0
    model = out / "model"
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "README.md", "training_args.json",
                 "metrics.json", "reconstructions.png"):
        assert (model / name).exists(), name
    metrics = json.loads((model / "metrics.json").read_text())
    vae = AutoencoderKL.from_pretrained(model / "vae")
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert vae.config.scaling_factor != 0.18215 and metrics["scaling_factor"] > 0
    assert metrics["scaling_factor"] == pytest.approx(1 / metrics["latents"]["latent_sample_std"])
    assert metrics["step"] == 4 and math.isfinite(metrics["eval_psnr"])
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 1, 16, 16)).latent_dist.mean
        assert z.shape == (2, 4, 4, 4)  # three blocks: f = 4
        assert vae.decode(z).sample.shape == (2, 1, 16, 16)
    args = json.loads((model / "training_args.json").read_text())
    assert args["max_train_steps"] == 4 and args["latent_shape"] == [4, 4, 4]
    card = (model / "README.md").read_text()
    assert "accelerate launch training/train_autoencoder.py" in card and "scaling factor" in card and "PSNR" in card
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, image_folder):
    from safetensors.torch import load_file

    steps = ["--max_train_steps", "6", "--checkpointing_steps", "3"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run(ref, image_folder, *steps) == 0
    assert run(cut, image_folder, *steps) == 0
    # Pretend the second run died after step 3: drop everything later, then resume.
    import shutil

    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")
    shutil.rmtree(cut / "model")
    assert run(cut, image_folder, *steps, "--resume_from_checkpoint", "latest") == 0
    a = load_file(ref / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(cut / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x)["loss"] for x in (ref / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (cut / "train_log.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 6


def test_non_finite_loss_stops_naming_the_step_and_the_last_checkpoint(tmp_path, image_folder, monkeypatch):
    calls = {"n": 0}
    real = tae.vae_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 5 else loss), parts

    monkeypatch.setattr(tae, "vae_loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5 .*learning rate.*checkpoint-3"):
        run(tmp_path / "nan", image_folder, "--max_train_steps", "8", "--checkpointing_steps", "3")


def test_bad_data_folder_stops_with_a_clear_message(tmp_path, capsys, monkeypatch):
    with pytest.raises(TrainingError, match=r"bad training data: --train_data_dir .*does not exist"):
        run(tmp_path / "out", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    monkeypatch.setattr("sys.argv", ["train_autoencoder", "--output_dir", str(tmp_path / "o"), "--train_data_dir", str(empty)])
    with pytest.raises(SystemExit) as exit_info:
        tae.cli()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: bad training data: --train_data_dir")


def test_a_shape_the_network_cannot_take_is_refused(tmp_path, image_folder):
    with pytest.raises(TrainingError, match="norm_num_groups 3 must divide"):
        run(tmp_path / "out", image_folder, "--norm_num_groups", "3")
    with pytest.raises(TrainingError, match="not divisible by the downsampling factor 8"):
        run(tmp_path / "out", image_folder, "--block_out_channels", "8", "8", "8", "8", "--resolution", "12")


def test_psnr_matches_a_hand_computation():
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    delta = 0.1  # in [-1, 1] units: 0.05 on the [0, 1] range
    y = x.clone()
    y[..., :4, :] += delta  # half the pixels off by δ (those near +1 get clamped: keep them inside)
    y = y.clamp(-1, 1)
    err01 = ((y - x) / 2).pow(2).mean().item()
    assert tae.psnr(x, y) == pytest.approx(10 * math.log10(1 / err01), rel=1e-6)
    assert tae.psnr(x, x) == math.inf
    z = torch.zeros(1, 1, 4, 4)
    assert tae.psnr(z, z + 0.2) == pytest.approx(10 * math.log10(1 / 0.1 ** 2), rel=1e-6)  # 20 dB


def test_evaluate_autoencoder_rewards_training(tmp_path, image_folder):
    """The same tiny network, untrained and after some steps: PSNR rises; the dict has its keys."""
    from diffusers import AutoencoderKL

    from data.sources import load_image_folder

    images = load_image_folder(str(image_folder), 16, mode="resize").images
    out = tmp_path / "trained"
    assert run(out, image_folder, "--max_train_steps", "40", "--checkpointing_steps", "0", "--no-use_ema",
               "--kl_weight", "1e-6") == 0
    trained = AutoencoderKL.from_pretrained(out / "model" / "vae").eval()
    torch.manual_seed(0)
    untrained = AutoencoderKL(**json.loads((out / "model" / "training_args.json").read_text())["vae_config"]).eval()
    before = tae.evaluate_autoencoder(untrained, images)
    after = tae.evaluate_autoencoder(trained, images)
    assert {"psnr", "psnr_per_image_mean", "mse", "l1", "latent_mean", "latent_std", "num_images"} <= set(after)
    assert "accuracy_reconstructions" not in after  # no labels, no classifier
    assert after["psnr"] > before["psnr"] + 3, (before["psnr"], after["psnr"])


def test_evaluate_autoencoder_reports_classifier_accuracy_on_digits():
    """On MNIST digits with labels the bundled classifier judges originals and reconstructions."""
    from evaluation.classifier import DEFAULT_PATH

    if not (DEFAULT_PATH / "model.safetensors").exists():
        pytest.skip("no bundled classifier")
    from diffusers import AutoencoderKL

    from data.sources import mnist_digits
    from training.autoencoder_presets import vae_config

    x, y = mnist_digits("test", n=50)
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config("tiny", resolution=32, channels=1)).eval()
    metrics = tae.evaluate_autoencoder(vae, x, y)
    assert metrics["accuracy_originals"] > 0.9
    assert 0 <= metrics["accuracy_reconstructions"] < metrics["accuracy_originals"]
