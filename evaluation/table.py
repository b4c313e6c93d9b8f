"""The sampler × NFE table, like Table 1 of the DDIM paper, on one checkpoint.

    python -m evaluation.table --checkpoint checkpoints/mnist-ddpm-cond --num_samples 500 --out docs/sampler-table

Rows: samplers (DDPM, DDIM η = 0 and η = 1, annealed Langevin, VP-SDE Euler–Maruyama,
predictor–corrector, probability-flow ODE, DPM-Solver++); columns: about 10, 20, 50, 100 and
1000 network evaluations (each sampler's step count is chosen to come as close as it allows);
cells: classifier-FID (``--metrics fid,is`` adds the classifier Inception Score, or any of
fid, is, kid, precision, recall), with seconds per image. ``--nll bound|ode|both`` adds the
checkpoint's likelihood of held-out digits (bits/dim; it does not depend on the sampler, so it is one
line under the table). Writes ``<out>.md``, ``<out>.csv``, ``<out>.png`` (the first metric against
NFE, log axis) and ``<out>.json``, which also lets an interrupted run resume: a cached cell is reused
when it holds every requested metric (cells of tables made before IS existed are recomputed only if
IS is asked for), and the meta dict that keys a table is unchanged, so old tables still resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
from evaluation.evaluate import FeatureNet, reference, sample_images, statistics
from evaluation.likelihood import json_text  # strict JSON: non-finite figures are written as null
from pipelines.checkpoint import weights_digest
from schedulers.registry import SAMPLERS, steps_for_nfe

# (label, sampler, params): every registered sampler, under the variants its registry entry lists
ROWS = [(label, name, params) for name, spec in SAMPLERS.items() for label, params in spec.table_rows()]
NFES = (10, 20, 50, 100, 1000)
# metric name -> (report key, column title, axis label, log axis)
METRICS = {
    "fid": ("fid", "FID", "classifier-FID (lower is better)", True),
    "is": ("inception_score", "IS", "classifier Inception Score (higher is better; max 10)", False),
    "kid": ("kid", "KID", "classifier-KID (lower is better)", False),
    "precision": ("precision", "precision", "precision (higher is better)", False),
    "recall": ("recall", "recall", "recall (higher is better)", False),
}


def _check_metrics(metrics) -> tuple:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be some of {', '.join(METRICS)}, got {', '.join(metrics) or 'none'}")
    return metrics


def _has_metrics(cell: dict, metrics) -> bool:
    """A cached cell can be reused: an error, or every requested metric present (and not None)."""
    return "error" in cell or all(cell.get(METRICS[m][0]) is not None for m in metrics)


def _resolved_setting(sampler: str, params: dict) -> dict:
    """The sampler and every parameter value a cell runs with (the registry's defaults filled in), as
    stored with the cell: a resumed table remakes cells whose sampler defaults have changed since."""
    from schedulers.registry import get_spec

    return {"sampler": sampler, "params": json.loads(json_text({**get_spec(sampler).defaults(), **params}))}


def _read_results(store: Path) -> dict:
    """The saved table to resume from, or {} when there is none; a corrupt file is a clear refusal."""
    if not store.exists():
        return {}
    try:
        results = json.loads(store.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"{store} is not a readable results file ({err}); it was kept as it is: "
                         "move it away or use another --out to start a new table") from None
    if not isinstance(results, dict):
        raise SystemExit(f"{store} does not hold a results table (a JSON object); move it away or use another --out")
    return results


def run(checkpoint: str, num_samples: int, out: Path, nfes=NFES, rows=ROWS, seed: int = 0, class_conditional=False,
        guidance_scale: float = 1.0, batch_size: int = 250, accelerator=None, metrics=("fid",), nll: Optional[str] = None,
        nll_options: Optional[dict] = None, device=None, dtype=None) -> dict:
    """Fill (or resume) the table; returns the results dict that is also saved as JSON.

    ``device``/``dtype``: where the network runs and in which precision (default: the accelerator's
    device, or the CPU, in float32; see ``pipelines/device.py``).

    ``metrics`` choose what the cells show (all statistics are stored either way); ``nll`` adds
    ``results["likelihood"]`` (evaluation.likelihood.likelihoods on ``nll_options["num_images"]``
    held-out digits), kept while its settings are unchanged.
    """
    from pipelines import SamplerPipeline

    metrics = _check_metrics(metrics)

    out.parent.mkdir(parents=True, exist_ok=True)
    store = out.with_suffix(".json")
    results = _read_results(store)
    if device is None or (accelerator is not None and accelerator.num_processes > 1):
        device = accelerator.device if accelerator else "cpu"
    pipe = SamplerPipeline.from_pretrained(checkpoint, device=device, torch_dtype=dtype)
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
            setting = _resolved_setting(sampler, params)
            if key in cells and _has_metrics(cells[key], metrics) and cells[key].get("setting") == setting:
                continue  # a cell made with other sampler defaults (an older registry) is made again
            try:
                steps = steps_for_nfe(sampler, target, params, pipe.sampler_config)
                images, labels, nfe, seconds = sample_images(pipe, sampler, steps, num_samples, batch_size, seed, params,
                                                             class_conditional, guidance_scale, accelerator)
            except ValueError as err:  # a budget this sampler cannot take (DDPM above 1000 steps)
                cells[key] = {"error": str(err), "setting": setting}
                continue
            if main_proc:
                feats, preds, probs = features(images, probabilities=True)
                report = statistics(feats, preds, ref_feats, labels, nfe, seconds / num_samples, probs=probs)
                cells[key] = {"steps": steps, "setting": setting, **asdict(report)}
                store.write_text(json_text(results))
                print(f"{title:30s} NFE {nfe:5d}: FID {report.fid:8.2f}  ({report.seconds_per_image * 1000:.1f} ms/image)",
                      flush=True)
    if main_proc and nll:
        options = {"method": nll, "num_images": 100, **(nll_options or {})}
        stored = results.get("likelihood")
        if not stored or stored.get("options") != options:
            from evaluation.evaluate import nll_report

            results["likelihood"] = {"options": options, **nll_report(
                pipe, nll, options["num_images"], options.get("stride", 1), options.get("rtol", 1e-5),
                options.get("probes", 1), seed)}
    if main_proc:
        store.write_text(json_text(results))
        write_outputs(results, out, nfes, rows, metrics)
    return results


def _nll_lines(likelihood: dict) -> list[str]:
    lines = []
    for key, name in (("bound", "variational bound"), ("ode", "probability-flow ODE")):
        if key in likelihood:
            r = likelihood[key]
            how = (f"stride {r['stride']}, {r['network_evaluations_per_image']} evaluations per image" if key == "bound"
                   else f"NFE {r['mean_nfe']:.0f} at rtol {r['rtol']:g}, {r['seconds_per_image']:.1f} s per image")
            lines.append(f"- NLL, {name}: **{r['bits_per_dim']:.3f} ± {r['ci95']:.3f} bits/dim** "
                         f"({r['num_images']} held-out digits; {how})")
    lines += [f"- note: {n}" for n in likelihood.get("notes", [])]
    return lines


def _pareto_lines(ax, cells: dict, rows, nfes, key: str) -> None:
    """One line per sampler: at each NFE budget the best of its table rows (grids and variants), so the
    figure compares samplers at their best setting; the table keeps every row."""
    import matplotlib

    groups: dict = {}
    for title, name, _ in rows:
        groups.setdefault(name, []).append(title)
    colours = matplotlib.colormaps["tab20"].colors
    for k, (name, titles) in enumerate(groups.items()):
        xs, ys = [], []
        for n in nfes:
            found = [c for c in (cells.get(f"{t}|{n}") for t in titles)
                     if c is not None and "error" not in c and c.get(key) is not None]
            if found:
                best = min(found, key=lambda c: c[key])
                xs.append(best["nfe"])
                ys.append(best[key])
        if xs:
            label = SAMPLERS[name].title if name in SAMPLERS else titles[0]
            if len(titles) > 1:
                label += f" (best of {len(titles)} rows)"
            ax.plot(xs, ys, marker="o", label=label, color=colours[k % len(colours)],
                    linestyle="-" if k < len(colours) else "--")


def write_outputs(results: dict, out: Path, nfes=NFES, rows=ROWS, metrics=("fid",)) -> None:
    """Markdown and CSV tables, and the plot of the first metric against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _check_metrics(metrics)
    cells, ref, meta = results["cells"], results["real_vs_real"], results["meta"]
    keys = [METRICS[m][0] for m in metrics]
    fmt = lambda key, v: "–" if v is None else (f"{v:.4f}" if key == "kid" else f"{v:.2f}")  # noqa: E731
    header = ["sampler"] + [f"NFE≈{n}" for n in nfes]
    csv_header = ["sampler"] + [f"{METRICS[m][1]} NFE≈{n}" if len(metrics) > 1 else f"NFE≈{n}" for m in metrics for n in nfes]
    names = " / ".join(("classifier-" if m in ("fid", "kid") else "classifier " if m == "is" else "") + METRICS[m][1]
                       for m in metrics)
    refs = ", ".join(f"{METRICS[m][1]} **{fmt(k, ref.get(k))}**" if len(metrics) > 1 else f"**{fmt(k, ref.get(k))}**"
                     for m, k in zip(metrics, keys))
    md = [f"{names[0].upper() + names[1:]} of {meta['num_samples']} samples (seconds per image in brackets; real vs real "
          f"at the same sample count: {refs}).", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(nfes)]
    table = [csv_header]
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for title, _, _ in rows:
        line, csv_row, xs, ys = [], [title], [], []
        for n in nfes:
            c = cells.get(f"{title}|{n}")
            if c is None or "error" in c:
                line.append("–")
                continue
            values = " · ".join((f"{METRICS[m][1]} " if len(metrics) > 1 else "") + fmt(k, c.get(k))
                                for m, k in zip(metrics, keys))
            line.append(f"{values} ({c['seconds_per_image']:.3f}s, NFE {c['nfe']})")
            if c.get(keys[0]) is not None:
                xs.append(c["nfe"])
                ys.append(c[keys[0]])
        for k in keys:
            for n in nfes:
                c = cells.get(f"{title}|{n}")
                csv_row.append("" if c is None or "error" in c or c.get(k) is None else f"{c[k]:.4f}")
        md.append(f"| {title} | " + " | ".join(line) + " |")
        table.append(csv_row)
    _pareto_lines(ax, cells, rows, nfes, keys[0])
    if "likelihood" in results:
        md += ["", "Likelihood of held-out digits (independent of the sampler; docs/likelihood.md):", ""]
        md += _nll_lines(results["likelihood"])
    if ref.get(keys[0]) is not None:
        ax.axhline(ref[keys[0]], color="gray", linestyle="--", label="real vs real")
    ax.set_xscale("log")
    if METRICS[metrics[0]][3]:
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(METRICS[metrics[0]][2])
    ax.set_title(f"{Path(meta['checkpoint']).name}: {meta['num_samples']} samples per point", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        csv.writer(fh).writerows(table)


def main(argv=None) -> int:
    from accelerate import Accelerator

    from pipelines.device import add_device_arguments, describe, device_from_args

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
    p.add_argument("--metrics", default="fid", help=f"comma-separated cell metrics, the first plotted: {', '.join(METRICS)}")
    p.add_argument("--nll", choices=("bound", "ode", "both"), default=None,
                   help="add the likelihood of held-out digits in bits/dim under the table")
    p.add_argument("--nll_images", type=int, default=100)
    p.add_argument("--nll_stride", type=int, default=1)
    p.add_argument("--nll_rtol", type=float, default=1e-5)
    add_device_arguments(p)
    args = p.parse_args(argv)
    device, dtype = device_from_args(args)
    rows = ROWS
    if args.samplers:
        wanted = {s.strip() for s in args.samplers.split(",")}
        rows = [r for r in ROWS if r[0] in wanted or r[1] in wanted]
    start = time.time()
    metrics = tuple(m.strip() for m in args.metrics.split(","))
    accelerator = Accelerator(cpu=device.type == "cpu")
    if accelerator.is_main_process:
        print(f"device: {describe(accelerator.device if accelerator.num_processes > 1 else device, dtype)} "
              f"× {accelerator.num_processes} process(es)", flush=True)
    run(args.checkpoint, args.num_samples, Path(args.out), tuple(int(n) for n in args.nfe.split(",")), rows, args.seed,
        args.class_conditional, args.guidance_scale, args.batch_size, accelerator, metrics, args.nll,
        {"num_images": args.nll_images, "stride": args.nll_stride, "rtol": args.nll_rtol}, device=device, dtype=dtype)
    accelerator.end_training()  # close the process group before exit, as evaluation.evaluate does
    print(f"done in {time.time() - start:.0f} s; wrote {args.out}.md/.csv/.png/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
