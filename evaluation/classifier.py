"""A small MNIST classifier: the feature network of classifier-FID, KID, precision/recall, and
the judge of class-conditional samples (docs/evaluation.md: Inception weights cannot be downloaded here).

    python -m evaluation.classifier            # train on the 4,000-image split, report held-out accuracy

Input: images ``[N, 1, 32, 32]`` in [-1, 1] (the models' own range). Features: the 128-d
penultimate layer (after global average pooling), as Inception's pool3 is for FID.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.images import uint8_to_model
from data.sources import mnist_digits

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = ROOT / "checkpoints" / "mnist-classifier"


class DigitClassifier(nn.Module):
    """Four 3×3 conv blocks (32, 32, 64, 128 channels) → global average pool → 128-d features → 10 logits."""

    num_features = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(1, 32, 1), block(32, 32, 2), block(32, 64, 1), block(64, 128, 2), block(128, 128, 2))
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 128]`` of images in [-1, 1]."""
        return self.body(x).mean(dim=(2, 3))  # [N, 128, 4, 4] -> [N, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ClassifierFeatures(nn.Module):
    """The classifier as a torchmetrics ``feature=`` network: images in [-1, 1] → 128-d features."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # torchmetrics' probe: [N, C, H, W] uint8
            x = uint8_to_model(x)
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.classifier.features(x.float())


def load_classifier(path: str | Path = DEFAULT_PATH, device="cpu") -> DigitClassifier:
    """Load the shipped (or a retrained) classifier from ``model.safetensors``."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no classifier at {weights}; train one with `python -m evaluation.classifier`")
    model = DigitClassifier()
    model.load_state_dict(load_file(weights))
    return model.to(device).eval().requires_grad_(False)


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background −1 fills in)."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = pad[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return out


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    preds = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((preds == y).float().mean())


def train(epochs: int = 20, seed: int = 0, out: Path = DEFAULT_PATH) -> dict:
    """Train on the 4,000-image training split; report accuracy on the 1,000 held-out digits."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = mnist_digits("train")
    x_test, y_test = mnist_digits("test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = len(x_train) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for k in range(steps_per_epoch):
            idx = perm[k * 64:(k + 1) * 64]
            loss = F.cross_entropy(model(_shift(x_train[idx], g)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out accuracy {accuracy(model, x_test, y_test):.4f}",
              flush=True)
    result = {"held_out_accuracy": accuracy(model, x_test, y_test), "train_accuracy": accuracy(model, x_train, y_train),
              "epochs": epochs, "seed": seed, "train_images": len(x_train), "held_out_images": len(x_test),
              "seconds": round(time.time() - start, 1), "parameters": sum(p.numel() for p in model.parameters())}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the MNIST feature classifier.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    args = parser.parse_args(argv)
    print(json.dumps(train(args.epochs, args.seed, Path(args.out)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
