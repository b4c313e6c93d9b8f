"""Latent against pixel diffusion on the bundled models: the cost of one network evaluation and of
a whole DDIM run per image, with the decoder counted apart.

    python benchmarks/bench_latent.py                 # batch 64, 5 alternating repeats, medians
    python benchmarks/bench_latent.py --batch 16 --steps 20 --repeats 3

The pixel model (checkpoints/mnist-ddpm-cond, a 0.69M-parameter UNet on 32×32×1) and the two latent
models (checkpoints/mnist-latent-dit, a 2.8M-parameter DiT on 8×8×4 latents, patch 1: 64 tokens;
checkpoints/mnist-latent-unet, a 4.6M-parameter UNet on the same latents; both with the same
AutoencoderKL decoder) are timed in the same process, interleaved, so the machine's load hits all
alike; the figures to read are the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pipelines import SamplerPipeline
from pipelines.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"pixel UNet (mnist-ddpm-cond)": ROOT / "checkpoints" / "mnist-ddpm-cond",
          "latent DiT (mnist-latent-dit)": ROOT / "checkpoints" / "mnist-latent-dit",
          "latent UNet (mnist-latent-unet)": ROOT / "checkpoints" / "mnist-latent-unet"}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mflop(fn) -> float:
    """Floating-point operations of one call in millions, by torch's FlopCounterMode (matmuls and
    convolutions, 2 per multiply-add): the device-independent side of the comparison."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, {args.threads} thread(s), batch {args.batch}, DDIM {args.steps} steps, "
          f"{args.repeats} alternating repeats (medians)")
    pipes = {name: SamplerPipeline.from_pretrained(str(path), device=device) for name, path in MODELS.items()}
    forward, run, decode = ({name: [] for name in pipes} for _ in range(3))
    flops = {}
    for name, pipe in pipes.items():
        x = torch.randn((1, *pipe.sample_shape), device=device)
        t, label = torch.full((1,), 500, device=device), torch.full((1,), 3, device=device)
        flops[name] = (_mflop(lambda: pipe.unet(x, t, class_labels=label)),
                       _mflop(lambda: pipe.decoder.decode(x)) if pipe.decoder is not None else None)
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            shape = (args.batch, *pipe.sample_shape)
            x = torch.randn(shape, device=device)
            t = torch.full((args.batch,), 500, device=device)
            labels = torch.arange(args.batch, device=device) % 10
            with torch.no_grad():
                forward[name].append(_time(lambda: pipe.unet(x, t, class_labels=labels)))
                if pipe.decoder is not None:
                    decode[name].append(_time(lambda: pipe.decoder.decode(x)))
            run[name].append(_time(lambda: pipe("ddim", args.steps, batch_size=args.batch, seed=0,
                                                 class_labels=[i % 10 for i in range(args.batch)],
                                                 guidance_scale=3.0, output_type="pt")))
    med = {k: {n: statistics.median(v) for n, v in d.items() if v} for k, d in
           (("forward", forward), ("run", run), ("decode", decode))}
    print(f"{'model':32s} {'params':>8s} {'state':>8s} {'MFLOP/eval':>11s} {'forward/img':>12s} {'decode/img':>11s} "
          f"{'DDIM run/img':>13s}")
    for name, pipe in pipes.items():
        params = sum(q.numel() for q in pipe.unet.parameters())
        state = "×".join(map(str, pipe.sample_shape))
        dec = med["decode"].get(name)
        print(f"{name:32s} {params / 1e6:7.2f}M {state:>8s} {flops[name][0]:11.1f} "
              f"{med['forward'][name] / args.batch * 1e3:10.3f}ms "
              f"{'' if dec is None else f'{dec / args.batch * 1e3:9.3f}ms':>11s} {med['run'][name] / args.batch * 1e3:11.2f}ms")
    pix, *latents = pipes
    for lat in latents:
        print(f"{lat} / pixel: one network evaluation {med['forward'][lat] / med['forward'][pix]:.2f}× the time, "
              f"{flops[lat][0] / flops[pix][0]:.2f}× the FLOPs (decoder {flops[lat][1]:.0f} MFLOP once per image); "
              f"a guided DDIM-{args.steps} run (2 evaluations a step, + one decode) {med['run'][lat] / med['run'][pix]:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
