"""Likelihood benchmark: the cost of the ODE likelihood and the bound's accuracy against its cost.

    python benchmarks/bench_likelihood.py                       # both tables, both bundled models
    python benchmarks/bench_likelihood.py --quick               # 2 images per ODE row, 8 for the bound
    python benchmarks/bench_likelihood.py --ode_images 8 --bound_images 32 --json bench.json

(1) Probability-flow ODE (evaluation.likelihood.ode_likelihood, RK45 at rtol = atol = 1e-5, one
    Rademacher probe, uniform dequantisation) on held-out digits, per bundled model: network
    evaluations (NFE) and wall time **per image**, each image solved on its own (its own step
    sizes: the NFE an image needs), then all images in one solve (score_sde's way: one set of
    step sizes for the batch, NFE shared, wall time divided by the images).
(2) Variational bound (evaluation.likelihood.variational_bound) of the VP model on held-out
    digits against the number of terms evaluated: stride 1 (all T = 1000), then strides in
    ``rescale`` mode (an unbiased estimate of the same bound; its difference from stride 1 is
    noise, paired over images) and ``respace`` mode (the bound of a shorter chain: looser).
Wall times are for the device printed first (``--device``, default auto; CPU threads: ``--threads``);
they vary with other load.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from evaluation.likelihood import held_out_images, json_text, ode_likelihood, variational_bound
from pipelines import SamplerPipeline
from pipelines.device import add_device_arguments, describe, device_from_args

DEVICE = {"device": "cpu", "torch_dtype": None}  # set by main() from --device/--dtype

CHECKPOINTS = ("checkpoints/mnist-ddpm-cond", "checkpoints/mnist-ncsn")


def ode_table(checkpoints, num_images: int, rtol: float, seed: int) -> list[dict]:
    rows = []
    for ck in checkpoints:
        pipe = SamplerPipeline.from_pretrained(ck, **DEVICE)
        images, _ = held_out_images(pipe, num_images)
        nfes, seconds, bpd = [], [], []
        for i in range(num_images):  # each image alone: its own step sizes
            r = ode_likelihood(pipe, images[i:i + 1], rtol=rtol, atol=rtol, seed=seed + i, batch_size=1)
            nfes.append(r.nfe[0])
            seconds.append(r.seconds)
            bpd.append(r.bits_per_dim)
            print(f"  {ck} image {i}: NFE {r.nfe[0]}, {r.seconds:.1f} s, {r.bits_per_dim:.3f} bits/dim", flush=True)
        joint = ode_likelihood(pipe, images, rtol=rtol, atol=rtol, seed=seed, batch_size=num_images)
        rows.append({"checkpoint": ck, "images": num_images, "rtol": rtol,
                     "nfe_per_image": nfes, "seconds_per_image": seconds, "bpd_per_image": bpd,
                     "joint_nfe": joint.nfe[0], "joint_seconds_per_image": joint.seconds / num_images,
                     "joint_bpd": joint.bits_per_dim, "joint_ci95": joint.ci95, "prior_bound_bpd": joint.prior_bound_bpd})
    return rows


def bound_table(checkpoint: str, num_images: int, strides, seed: int) -> list[dict]:
    pipe = SamplerPipeline.from_pretrained(checkpoint, **DEVICE)
    images, _ = held_out_images(pipe, num_images)
    full = variational_bound(pipe, images, seed=seed)
    rows = [{"mode": "all T", "stride": 1, "evaluations": full.settings["network_evaluations_per_image"],
             "bpd": full.bits_per_dim, "ci95": full.ci95, "delta": 0.0, "delta_ci95": 0.0, "seconds": full.seconds,
             "decoder": float(full.decoder.mean()), "kl": float(full.kl_total.mean()), "prior": float(full.prior.mean())}]
    print(f"  stride 1: {full.summary()}", flush=True)
    for mode in ("rescale", "respace"):
        for stride in strides:
            r = variational_bound(pipe, images, stride=stride, stride_mode=mode, seed=seed + 1)
            diff = r.per_image - full.per_image
            rows.append({"mode": mode, "stride": stride, "evaluations": r.settings["network_evaluations_per_image"],
                         "bpd": r.bits_per_dim, "ci95": r.ci95, "delta": float(diff.mean()),
                         "delta_ci95": float(1.96 * diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0,
                         "seconds": r.seconds, "decoder": float(r.decoder.mean()), "kl": float(r.kl_total.mean()),
                         "prior": float(r.prior.mean())})
            print(f"  {mode} stride {stride}: {r.bits_per_dim:.4f} bits/dim, Δ {diff.mean():+.4f}, {r.seconds:.1f} s", flush=True)
    large = variational_bound(pipe, images, variance="fixed_large", seed=seed)
    rows.append({"mode": "all T, β_t variances (fixed_large)", "stride": 1,
                 "evaluations": large.settings["network_evaluations_per_image"], "bpd": large.bits_per_dim,
                 "ci95": large.ci95, "delta": float((large.per_image - full.per_image).mean()),
                 "delta_ci95": float(1.96 * (large.per_image - full.per_image).std(ddof=1) / math.sqrt(num_images))
                 if num_images > 1 else 0.0,
                 "seconds": large.seconds, "decoder": float(large.decoder.mean()), "kl": float(large.kl_total.mean()),
                 "prior": float(large.prior.mean())})
    return rows


def print_tables(ode_rows, bound_rows, bound_images: int) -> None:
    if ode_rows:
        print("\nProbability-flow ODE likelihood (RK45, one Rademacher probe, dequantised held-out digits)\n")
        print("| model | rtol = atol | images | NFE per image (median, min–max) | s per image (median) | bits/dim "
              "(each alone) | one solve of all: NFE, s per image, bits/dim ± 95 % |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in ode_rows:
            nfe = np.asarray(r["nfe_per_image"])
            print(f"| {r['checkpoint'].split('/')[-1]} | {r['rtol']:g} | {r['images']} | {np.median(nfe):.0f} "
                  f"({nfe.min()}–{nfe.max()}) | {np.median(r['seconds_per_image']):.1f} | "
                  f"{np.mean(r['bpd_per_image']):.3f} | {r['joint_nfe']}, {r['joint_seconds_per_image']:.1f}, "
                  f"{r['joint_bpd']:.3f} ± {r['joint_ci95']:.3f} |")
    if bound_rows:
        print(f"\nVariational bound of mnist-ddpm-cond, {bound_images} held-out digits (fixed_small unless stated; Δ: "
              "against stride 1 on the same digits, ± 95 %)\n")
        print("| terms | stride | evaluations per image | bits/dim ± 95 % | Δ vs all T | L_0 | Σ L_t | L_T | seconds |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in bound_rows:
            print(f"| {r['mode']} | {r['stride']} | {r['evaluations']} | {r['bpd']:.4f} ± {r['ci95']:.4f} | "
                  f"{r['delta']:+.4f} ± {r['delta_ci95']:.4f} | {r['decoder']:.4f} | {r['kl']:.4f} | {r['prior']:.1e} | "
                  f"{r['seconds']:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images per ODE row, 8 for the bound")
    p.add_argument("--ode_images", type=int, default=4)
    p.add_argument("--bound_images", type=int, default=32)
    p.add_argument("--rtol", type=float, default=1e-5, help="rtol = atol of the ODE solver")
    p.add_argument("--strides", default="2,5,10,20,50,100")
    p.add_argument("--checkpoints", default=",".join(CHECKPOINTS))
    p.add_argument("--skip", choices=("ode", "bound"), default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    add_device_arguments(p)
    args = p.parse_args(argv)
    device, dtype = device_from_args(args)
    DEVICE.update(device=device, torch_dtype=dtype)
    torch.set_num_threads(args.threads)
    print(f"device: {describe(device, dtype)}", flush=True)
    if args.quick:
        args.ode_images, args.bound_images = 2, 8
    start = time.time()
    ode_rows = [] if args.skip == "ode" else ode_table(args.checkpoints.split(","), args.ode_images, args.rtol, args.seed)
    bound_rows = [] if args.skip == "bound" else bound_table(CHECKPOINTS[0], args.bound_images,
                                                              [int(s) for s in args.strides.split(",")], args.seed)
    print_tables(ode_rows, bound_rows, args.bound_images)
    print(f"\n{time.time() - start:.0f} s in all, {args.threads} threads")
    if args.json:
        with open(args.json, "w") as fh:  # strict JSON: a figure that is not finite (one image: no interval) is null
            fh.write(json_text({"ode": ode_rows, "bound": bound_rows, "args": vars(args)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
