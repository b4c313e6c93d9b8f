"""Training throughput: ``training/train.py`` against a loop written the way diffusers'
``examples/unconditional_image_generation/train_unconditional.py`` does it.

    python benchmarks/bench_training.py                 # 3 rounds, 30 measured steps each
    python benchmarks/bench_training.py --rounds 5 --steps 60

Both train the same ``UNet2DModel`` (the ``cpu-small`` preset, unconditional, ε-objective) on
the same 4,000 MNIST digits at 32×32, batch 128, AdamW with the same settings, gradient
clipping, EMA and warm-up/cosine LR, in the same process; rounds alternate between the two.
The baseline decodes and transforms every image on every step (PIL resize, to-tensor,
normalise, in a 🤗 datasets ``set_transform`` behind a ``DataLoader``), as the example does;
``train.py`` decodes once. Reported: images/s of each (median over rounds, measured after
warm-up steps), their ratio, and the data pipeline's own cost per batch for each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.device import DeviceError, describe, resolve_device
from training import train
from data.sources import load_mnist_5k
from training.presets import unet_config

BATCH = 128


def example_dataset():
    """The MNIST training split as a 🤗 dataset of PIL images with the example's per-step transforms."""
    import datasets
    from PIL import Image

    images, _ = load_mnist_5k("train")
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images]}).cast_column("image", datasets.Image())

    def augment(image):  # Resize(32, bilinear) → CenterCrop(32) → ToTensor → Normalize([0.5], [0.5])
        image = image.convert("L").resize((32, 32), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None].sub(0.5).div(0.5)

    ds.set_transform(lambda examples: {"input": [augment(im) for im in examples["image"]]})
    return ds


def baseline_steps(num_steps: int, warmup: int, device: str = "auto") -> float:
    """The diffusers example's loop; returns images/s over the steps after ``warmup``."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device == "cpu")
    model = UNet2DModel(**unet_config("cpu-small", None, resolution=32, channels=1, objective="ddpm", num_class_embeds=None))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    loader = torch.utils.data.DataLoader(example_dataset(), batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=5000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    step, start = 0, None
    while step < num_steps:
        for batch in loader:
            if step == warmup:
                start = time.perf_counter()
            clean_images = batch["input"]
            noise = torch.randn(clean_images.shape, device=clean_images.device)
            timesteps = torch.randint(0, 1000, (clean_images.shape[0],), device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
            step += 1
            if step >= num_steps:
                break
    return (num_steps - warmup) * BATCH / (time.perf_counter() - start)


def ours_steps(num_steps: int, warmup: int, device: str = "auto") -> float:
    """``training/train.py`` itself: total time of a (warmup + n)-step run minus a warmup-step run."""
    def run(steps):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            train.main(["--output_dir", out, "--objective", "ddpm", "--no-class_conditional", "--max_train_steps", str(steps),
                        "--checkpointing_steps", "0", "--save_images_steps", "0", "--report_to", "none", "--no_progress",
                        "--train_batch_size", str(BATCH), "--lr_warmup_steps", "500", "--device", device])
            return time.perf_counter() - start

    short, full = run(warmup), run(num_steps)
    return (num_steps - warmup) * BATCH / (full - short)


def data_cost(batches: int = 20) -> tuple[float, float]:
    """Milliseconds per batch spent producing a batch: the example's DataLoader vs an in-memory index."""
    loader = torch.utils.data.DataLoader(example_dataset(), batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    theirs = (time.perf_counter() - start) / batches * 1000
    from data.sources import to_model_range

    images = to_model_range(load_mnist_5k("train")[0], 32)
    start = time.perf_counter()
    for k in range(batches):
        idx = train.batch_indices(len(images), BATCH, 1, 0, 0, k)
        images[idx]
    ours = (time.perf_counter() - start) / batches * 1000
    return theirs, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps: both loops")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except DeviceError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"device: {describe(device)} (both loops, float32)", flush=True)
    base, ours = [], []
    for r in range(args.rounds):
        base.append(baseline_steps(args.warmup + args.steps, args.warmup, args.device))
        ours.append(ours_steps(args.warmup + args.steps, args.warmup, args.device))
        print(f"round {r + 1}: example-style loop {base[-1]:.1f} img/s, train.py {ours[-1]:.1f} img/s", flush=True)
    theirs_ms, ours_ms = data_cost()
    b, o = statistics.median(base), statistics.median(ours)
    print(f"\n| loop | images/s (median of {args.rounds}) | data pipeline, ms per batch of {BATCH} |")
    print("|---|---:|---:|")
    print(f"| diffusers-example style (per-step transforms) | {b:.1f} | {theirs_ms:.1f} |")
    print(f"| training/train.py (decoded once) | {o:.1f} | {ours_ms:.2f} |")
    print(f"\nspeed-up: {o / b:.2f}× on {describe(device)}")


if __name__ == "__main__":
    main()
