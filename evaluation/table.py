"""The sampler × NFE table, like Table 1 of the DDIM paper, on one checkpoint.

    python -m evaluation.table --checkpoint checkpoints/mnist-ddpm-cond --num_samples 500 --out docs/sampler-table

Rows: samplers (DDPM, DDIM η = 0 and η = 1, annealed Langevin, VP-SDE Euler–Maruyama,
predictor–corrector, probability-flow ODE, DPM-Solver++); columns: about 10, 20, 50, 100 and
1000 network evaluations (each sampler's step count is chosen to come as close as it allows);
cells: classifier-FID, with seconds per image. Writes ``<out>.md``, ``<out>.csv``, ``<out>.png``
(FID against NFE, log axis) and ``<out>.json``, which also lets an interrupted run resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from evaluation.evaluate import FeatureNet, reference, sample_images, statistics
from pipelines.checkpoint import weights_digest
from schedulers.registry import SAMPLERS, steps_for_nfe

# (label, sampler, params): every registered sampler, under the variants its registry entry lists
ROWS = [(label, name, params) for name, spec in SAMPLERS.items() for label, params in spec.table_rows()]
NFES = (10, 20, 50, 100, 1000)


def run(checkpoint: str, num_samples: int, out: Path, nfes=NFES, rows=ROWS, seed: int = 0, class_conditional=False,
        guidance_scale: float = 1.0, batch_size: int = 250, accelerator=None) -> dict:
    """Fill (or resume) the table; returns the results dict that is also saved as JSON."""
    from pipelines import SamplerPipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    store = out.with_suffix(".json")
    results = json.loads(store.read_text()) if store.exists() else {}
    pipe = SamplerPipeline.from_pretrained(checkpoint, device=accelerator.device if accelerator else "cpu")
    # the weights' digest, so a cached table is never resumed on a checkpoint retrained in place
    meta = {"checkpoint": checkpoint, "weights_sha256": weights_digest(pipe.unet), "num_samples": num_samples,
            "seed": seed, "class_conditional": class_conditional, "guidance_scale": guidance_scale}
    if results.get("meta", meta) != meta:
        raise SystemExit(f"{store} holds a table made with other weights or settings {results['meta']}; "
                         "delete it or use another --out")
    results["meta"] = meta
    cells = results.setdefault("cells", {})
    main_proc = accelerator is None or accelerator.is_main_process
    features = FeatureNet() if main_proc else None
    if main_proc:
        ref_feats, ref = reference(features, min(num_samples, 1000))
        results["real_vs_real"] = asdict(ref)
    for title, sampler, params in rows:
        for target in nfes:
            key = f"{title}|{target}"
            if key in cells:
                continue
            try:
                steps = steps_for_nfe(sampler, target, params, pipe.sampler_config)
                images, labels, nfe, seconds = sample_images(pipe, sampler, steps, num_samples, batch_size, seed, params,
                                                             class_conditional, guidance_scale, accelerator)
            except ValueError as err:  # a budget this sampler cannot take (DDPM above 1000 steps)
                cells[key] = {"error": str(err)}
                continue
            if main_proc:
                feats, preds = features(images)
                report = statistics(feats, preds, ref_feats, labels, nfe, seconds / num_samples)
                cells[key] = {"steps": steps, **asdict(report)}
                store.write_text(json.dumps(results, indent=2) + "\n")
                print(f"{title:30s} NFE {nfe:5d}: FID {report.fid:8.2f}  ({report.seconds_per_image * 1000:.1f} ms/image)",
                      flush=True)
    if main_proc:
        store.write_text(json.dumps(results, indent=2) + "\n")
        write_outputs(results, out, nfes, rows)
    return results


def write_outputs(results: dict, out: Path, nfes=NFES, rows=ROWS) -> None:
    """Markdown and CSV tables, and the FID-against-NFE plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, ref, meta = results["cells"], results["real_vs_real"], results["meta"]
    header = ["sampler"] + [f"NFE≈{n}" for n in nfes]
    md = [f"Classifier-FID of {meta['num_samples']} samples (seconds per image in brackets; real vs real at the same "
          f"sample count: **{ref['fid']:.2f}**).", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(nfes)]
    table = [header]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for title, _, _ in rows:
        line, csv_row, xs, ys = [], [title], [], []
        for n in nfes:
            c = cells.get(f"{title}|{n}")
            if c is None or "error" in c:
                line.append("–")
                csv_row.append("")
                continue
            line.append(f"{c['fid']:.2f} ({c['seconds_per_image']:.3f}s, NFE {c['nfe']})")
            csv_row.append(f"{c['fid']:.4f}")
            xs.append(c["nfe"])
            ys.append(c["fid"])
        md.append(f"| {title} | " + " | ".join(line) + " |")
        table.append(csv_row)
        if xs:
            ax.plot(xs, ys, marker="o", label=title)
    ax.axhline(ref["fid"], color="gray", linestyle="--", label="real vs real")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("classifier-FID (lower is better)")
    ax.set_title(f"{Path(meta['checkpoint']).name}: {meta['num_samples']} samples per point", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        csv.writer(fh).writerows(table)


def main(argv=None) -> int:
    from accelerate import Accelerator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--out", default="docs/sampler-table")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFE targets")
    p.add_argument("--samplers", default=None, help="comma-separated row titles or sampler names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_conditional", action="store_true")
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=250)
    args = p.parse_args(argv)
    rows = ROWS
    if args.samplers:
        wanted = {s.strip() for s in args.samplers.split(",")}
        rows = [r for r in ROWS if r[0] in wanted or r[1] in wanted]
    start = time.time()
    run(args.checkpoint, args.num_samples, Path(args.out), tuple(int(n) for n in args.nfe.split(",")), rows, args.seed,
        args.class_conditional, args.guidance_scale, args.batch_size, Accelerator())
    print(f"done in {time.time() - start:.0f} s; wrote {args.out}.md/.csv/.png/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
