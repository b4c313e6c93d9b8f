"""Sampler benchmark: loop overhead and accuracy at equal cost, for every registered sampler.

    python benchmarks/bench_samplers.py            # both tables
    python benchmarks/bench_samplers.py --quick    # fewer repeats and samples
    python benchmarks/bench_samplers.py --only accuracy --families vp --nfes 10,20   # a part of the table

(1) Overhead: the pipeline's full loop wall time divided by NFE × the wall time of one forward
    pass of a real ``UNet2DModel`` (the ``cpu-small`` training preset, 32×32×1, batch 16,
    random weights). Both are measured in the same run, interleaved (alternating which goes
    first), and medians are reported; 1.00 means the sampler adds nothing to the network's cost
    (goal ≤ 1.02). On a shared CPU one forward pass varies by ±10 %, more than the overhead, so
    the table also times the loop alone (a network that costs nothing) and prints
    1 + (loop alone per NFE) / (one forward pass): the same ratio without the jitter.
(2) Accuracy: exact-score Gaussian mixtures sampled at about 10, 20, 50, 100 and 1000 network
    evaluations, every registered sampler under each of its table rows and, for the samplers with a
    ``time_grid`` parameter, on each grid. Each cell is
    ``max |weight error| / worst |width ratio − 1|`` over the modes, with the NFE in brackets.
    ``--mixture 16d`` (the default): four modes in 16 dimensions, weights 0.1/0.2/0.3/0.4 and widths
    0.03/0.06/0.12/0.25 (the narrowest is narrower than the last σ jump of a 50-step uniform grid,
    σ 0.081 → 0.010), means 0.3·N(0, I) draws (seed 16), as a VP ε-network (the default DDPM schedule)
    and as a VE score network (σ ∈ [0.01, 50]). ``--mixture 2d``: the three 2-D modes of
    ``tests/test_exact_scores.py`` (VP). The adaptive solver takes a tolerance, not a step count:
    its rows sweep ε_rel and print the NFE it spent.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from diffusers import UNet2DModel

from pipelines.analytic import GaussianMixtureNet
from pipelines.device import add_device_arguments, describe, device_from_args
from pipelines.sampling import SamplerPipeline
from schedulers.parametrization import ModelFamily
from schedulers.registry import SAMPLERS, steps_for_nfe
from schedulers.schedules import TIME_GRIDS, DiscreteVPSchedule, linear_betas_for_sigma_range
from training.presets import unet_config

NFES = (10, 20, 50, 100, 1000)
ADAPTIVE_RTOLS = (0.5, 0.2, 0.1, 0.05, 0.02)


def mixture(kind: str) -> dict:
    """The exact-score mixtures of the accuracy table (weights, means, stds)."""
    if kind == "2d":  # tests/test_exact_scores.py
        return {"weights": [0.2, 0.5, 0.3], "means": [[-0.6, -0.3], [0.5, 0.4], [0.1, -0.7]], "stds": [0.10, 0.20, 0.15]}
    means = torch.randn(4, 16, generator=torch.Generator().manual_seed(16), dtype=torch.float64) * 0.3
    return {"weights": [0.1, 0.2, 0.3, 0.4], "means": means, "stds": [0.03, 0.06, 0.12, 0.25]}


def mixture_pipeline(kind: str, family: str) -> tuple[SamplerPipeline, GaussianMixtureNet]:
    """The mixture as a VP ε-network (default DDPM schedule) or a VE score network (σ ∈ [0.01, 50])."""
    schedule = None
    if family == "ve":
        schedule = DiscreteVPSchedule(**dict(zip(("beta_start", "beta_end"), linear_betas_for_sigma_range(0.01, 50.0))))
    net = GaussianMixtureNet(**mixture(kind), family=family, schedule=schedule)
    return SamplerPipeline(net, net.model_family(), sample_shape=(net.dim, 1, 1)), net


def rows() -> list[tuple]:
    """(row label, sampler, params): every sampler's table rows, on every grid it offers."""
    out = []
    for name, spec in SAMPLERS.items():
        if name == "adaptive_sde":
            continue  # a tolerance, not a step count: its own rows
        grids = TIME_GRIDS if "time_grid" in spec.defaults() else (None,)
        for label, params in spec.table_rows():
            for grid in grids:
                row = dict(params, **({"time_grid": grid} if grid else {}))
                shown = "".join(f" {k}={v:g}" for k, v in params.items())  # the variant's own parameters
                out.append((f"{name}{shown}" + (f" [{grid}]" if grid else ""), name, row))
    return out


class _Bare(torch.nn.Module):
    """A network that costs nothing: isolates what the loop itself adds per step."""

    def forward(self, x, t, class_labels=None, return_dict=True):
        return SimpleNamespace(sample=x * 0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def overhead_table(repeats: int, nfe_target: int = 30, device=torch.device("cpu"),
                   dtype=torch.float32) -> list[tuple]:
    """Per sampler: (name, NFE, median ratio, min, max, loop ms per NFE without a network, forward ms).

    The network runs on ``device`` in ``dtype`` (the sampler state stays float32); forward passes are
    timed up to a device synchronisation, as the pipeline's loop is (its finiteness check reads the state).
    """
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("cpu-small", None, resolution=32, channels=1, objective="ddpm",
                                     num_class_embeds=None)).eval().requires_grad_(False).to(device=device, dtype=dtype)
    pipe = SamplerPipeline(unet, ModelFamily(kind="vp"))
    bare = SamplerPipeline(_Bare(), ModelFamily(kind="vp"), sample_shape=(1, 32, 32))
    x = torch.randn(16, 1, 32, 32).to(device=device, dtype=dtype)
    t = torch.tensor(500.0, device=device)

    def forwards(n: int) -> float:
        """Wall time of n back-to-back forward passes: the loop's ideal cost."""
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                unet(x, t)
            _sync(device)
            return time.perf_counter() - start

    forwards(5)  # warm-up
    rows = []
    for name in SAMPLERS:
        steps = steps_for_nfe(name, nfe_target)
        nfe = pipe(name, steps, batch_size=1, seed=0, output_type="pt").nfe  # also warms the sampler up
        ratios, per_forward = [], []
        for r in range(repeats):  # interleaved, alternating which goes first
            if r % 2:
                ideal = forwards(nfe)
            out = pipe(name, steps, batch_size=16, seed=r, output_type="pt")
            if r % 2 == 0:
                ideal = forwards(nfe)
            ratios.append(out.seconds / ideal)
            per_forward.append(ideal / nfe)
        loop_only = statistics.median(
            bare(name, steps, batch_size=16, seed=r, output_type="pt").seconds / nfe for r in range(repeats))
        rows.append((name, nfe, statistics.median(ratios), min(ratios), max(ratios), loop_only * 1e3,
                     statistics.median(per_forward) * 1e3))
    return rows


def errors(net: GaussianMixtureNet, samples: torch.Tensor) -> tuple[float, float]:
    """(max |weight error|, worst |width ratio − 1|) over the mixture's modes."""
    st = net.statistics(samples)
    w_err = float((st["weights"] - net.weights).abs().max())
    width = float((st["stds"] / net.stds - 1).abs().nan_to_num(float("inf")).max())
    return w_err, width


def accuracy_table(n: int, kind: str = "16d", family: str = "vp", nfes=NFES) -> dict:
    """{(row label, NFE target): (cell, NFE)} and the adaptive solver's rows {ε_rel: (cell, NFE)}."""
    pipe, net = mixture_pipeline(kind, family)
    table = {}
    for label, name, params in rows():
        params = dict(params, **{k: False for k in ("clip_sample", "thresholding") if k in SAMPLERS[name].defaults()})
        for target in nfes:
            try:
                steps = steps_for_nfe(name, target, params)
                out = pipe(name, steps, params, batch_size=n, seed=0, output_type="pt", dtype=torch.float64)
            except ValueError as err:  # e.g. DDPM cannot take more than 1000 steps
                table[label, target] = ("–", str(err))
                continue
            except RuntimeError as err:  # a sampler that diverges at this budget
                table[label, target] = ("diverged", str(err).split(";")[0])
                continue
            w_err, width = errors(net, out.images)
            table[label, target] = (f"{w_err:.3f} / {width:.2f}", out.nfe)
    adaptive = {}
    for rtol in ADAPTIVE_RTOLS:
        out = pipe("adaptive_sde", 20_000, {"rtol": rtol, "clip_sample": False}, batch_size=n, seed=0,
                   output_type="pt", dtype=torch.float64)
        w_err, width = errors(net, out.images)
        adaptive[rtol] = (f"{w_err:.3f} / {width:.2f}", out.nfe)
    exact = errors(net, net.sample(n, torch.Generator().manual_seed(0)))
    return {"cells": table, "adaptive": adaptive, "exact": f"{exact[0]:.3f} / {exact[1]:.2f}"}


def print_accuracy(result: dict, nfes=NFES) -> None:
    print("| sampler [grid] | " + " | ".join(f"NFE≈{t}" for t in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for label, _, _ in rows():
        cells = []
        for t in nfes:
            cell, nfe = result["cells"][label, t]
            cells.append(cell if cell in ("–", "diverged") else f"{cell} ({nfe})")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nExact draws (the sampling-noise floor): {result['exact']}. Adaptive reverse SDE, ε_abs = 0.0078:\n")
    print("| ε_rel | " + " | ".join(str(r) for r in ADAPTIVE_RTOLS) + " |")
    print("|---|" + "---|" * len(ADAPTIVE_RTOLS))
    print("| adaptive_sde | " + " | ".join(f"{c} ({nfe})" for c, nfe in result["adaptive"].values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("overhead", "accuracy"), default=None, help="run one of the two tables")
    parser.add_argument("--mixture", choices=("16d", "2d"), default="16d", help="the exact-score mixture")
    parser.add_argument("--families", default="vp,ve", help="vp, ve or both (comma-separated)")
    parser.add_argument("--nfes", default=",".join(map(str, NFES)), help="NFE targets (comma-separated)")
    parser.add_argument("--samples", type=int, default=None, help="samples per cell (default 2000; 1000 with --quick)")
    add_device_arguments(parser)
    args = parser.parse_args()
    device, dtype = device_from_args(args)
    print(f"device: {describe(device, dtype)} (overhead table; the accuracy table's exact-score network runs in "
          "float64 on the CPU)\n", flush=True)
    repeats = 3 if args.quick else 9
    if args.only != "accuracy":
        print(f"## Loop overhead (cpu-small UNet2DModel, batch 16, {describe(device, dtype)}, median of {repeats})\n")
        print("| sampler | NFE | loop time / (NFE × forward) | min | max | loop alone, ms per NFE | forward, ms | "
              "1 + loop alone / forward |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, nfe, med, lo, hi, loop_ms, fwd_ms in overhead_table(repeats, device=device, dtype=dtype):
            print(f"| {name} | {nfe} | {med:.3f} | {lo:.3f} | {hi:.3f} | {loop_ms:.2f} | {fwd_ms:.1f} | "
                  f"{1 + loop_ms / fwd_ms:.4f} |", flush=True)
    if args.only == "overhead":
        return
    n = args.samples or (1000 if args.quick else 2000)
    nfes = tuple(int(v) for v in args.nfes.split(","))
    for family in args.families.split(","):
        print(f"\n## Accuracy on the exact-score {args.mixture} mixture, {family.upper()} network ({n} samples): "
              f"max weight error / worst width error (NFE)\n", flush=True)
        start = time.perf_counter()
        print_accuracy(accuracy_table(n, args.mixture, family, nfes), nfes)
        print(f"\n({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
