"""Sampler benchmark: loop overhead and accuracy at equal cost, for every registered sampler.

    python benchmarks/bench_samplers.py            # both tables
    python benchmarks/bench_samplers.py --quick    # fewer repeats and samples

(1) Overhead: the pipeline's full loop wall time divided by NFE × the wall time of one forward
    pass of a real ``UNet2DModel`` (the ``cpu-small`` training preset, 32×32×1, batch 16,
    random weights). Both are measured in the same run, interleaved (alternating which goes
    first), and medians are reported; 1.00 means the sampler adds nothing to the network's cost
    (goal ≤ 1.02). On a shared CPU one forward pass varies by ±10 %, more than the overhead, so
    the table also times the loop alone (a network that costs nothing) and prints
    1 + (loop alone per NFE) / (one forward pass): the same ratio without the jitter.
(2) Accuracy: the exact-score Gaussian mixture of ``tests/test_exact_scores.py`` (VP network),
    sampled at about 10, 20, 50, 100 and 1000 network evaluations. Each cell is
    ``max |weight error| / worst |width ratio − 1|`` over the three modes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from diffusers import UNet2DModel

from pipelines.analytic import GaussianMixtureNet
from pipelines.sampling import SamplerPipeline
from schedulers.parametrization import ModelFamily
from schedulers.registry import SAMPLERS, steps_for_nfe
from training.presets import unet_config

WEIGHTS = [0.2, 0.5, 0.3]
MEANS = [[-0.6, -0.3], [0.5, 0.4], [0.1, -0.7]]
STDS = [0.10, 0.20, 0.15]
NFES = (10, 20, 50, 100, 1000)


class _Bare(torch.nn.Module):
    """A network that costs nothing: isolates what the loop itself adds per step."""

    def forward(self, x, t, class_labels=None, return_dict=True):
        return SimpleNamespace(sample=x * 0.5)


def overhead_table(repeats: int, nfe_target: int = 30) -> list[tuple]:
    """Per sampler: (name, NFE, median ratio, min, max, loop ms per NFE without a network, forward ms)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("cpu-small", None, resolution=32, channels=1, objective="ddpm",
                                     num_class_embeds=None)).eval().requires_grad_(False)
    pipe = SamplerPipeline(unet, ModelFamily(kind="vp"))
    bare = SamplerPipeline(_Bare(), ModelFamily(kind="vp"), sample_shape=(1, 32, 32))
    x = torch.randn(16, 1, 32, 32)
    t = torch.tensor(500.0)

    def forwards(n: int) -> float:
        """Wall time of n back-to-back forward passes: the loop's ideal cost."""
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(n):
                unet(x, t)
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


def accuracy_table(n: int) -> dict:
    net = GaussianMixtureNet(WEIGHTS, MEANS, STDS, family="vp")
    pipe = SamplerPipeline(net, net.model_family(), sample_shape=(2, 1, 1))
    table = {}
    for name in SAMPLERS:
        params = {k: False for k in ("clip_sample", "thresholding") if k in SAMPLERS[name].defaults()}
        for target in NFES:
            try:
                steps = steps_for_nfe(name, target, params)
                out = pipe(name, steps, params, batch_size=n, seed=0, output_type="pt", dtype=torch.float64)
            except ValueError as err:  # e.g. DDPM cannot take more than 1000 steps
                table[name, target] = ("–", str(err))
                continue
            st = net.statistics(out.images)
            w_err = float((st["weights"] - torch.tensor(WEIGHTS, dtype=torch.float64)).abs().max())
            width = float((st["stds"] / torch.tensor(STDS, dtype=torch.float64) - 1).abs().max())
            table[name, target] = (f"{w_err:.3f} / {width:.2f}", out.nfe)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("overhead", "accuracy"), default=None, help="run one of the two tables")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    if args.only != "accuracy":
        print(f"## Loop overhead (cpu-small UNet2DModel, batch 16, {torch.get_num_threads()} threads, median of {repeats})\n")
        print("| sampler | NFE | loop time / (NFE × forward) | min | max | loop alone, ms per NFE | forward, ms | "
              "1 + loop alone / forward |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, nfe, med, lo, hi, loop_ms, fwd_ms in overhead_table(repeats):
            print(f"| {name} | {nfe} | {med:.3f} | {lo:.3f} | {hi:.3f} | {loop_ms:.2f} | {fwd_ms:.1f} | "
                  f"{1 + loop_ms / fwd_ms:.4f} |", flush=True)
    if args.only == "overhead":
        return
    n = 2000 if args.quick else 6000
    print(f"\n## Accuracy on the exact-score mixture ({n} samples): max weight error / worst width error\n")
    table = accuracy_table(n)
    print("| sampler | " + " | ".join(f"NFE≈{t}" for t in NFES) + " |")
    print("|---|" + "---|" * len(NFES))
    for name in SAMPLERS:
        cells = []
        for t in NFES:
            cell, nfe = table[name, t]
            cells.append(cell if cell == "–" else f"{cell} ({nfe})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
