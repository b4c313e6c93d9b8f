"""Fit a small ``AutoencoderKL`` (the first stage of a latent diffusion model) on the training images.

    python -m training.train_autoencoder --output_dir runs/mnist-vae
    accelerate launch training/train_autoencoder.py --output_dir runs/mnist-vae --max_train_steps 3000

The default (``--vae_preset mnist-f4``) maps 32×32×1 digits to 8×8×4 latents. The loss is a
pixel reconstruction term (L1, MSE or their sum, on [-1, 1] pixels, decoded from a posterior
sample) plus ``--kl_weight`` times the KL divergence to N(0, I) per latent element; there is no
perceptual or adversarial term (no pretrained weights offline). The set-up follows
``training/train.py`` and shares its machinery: the data loader (``data/sources.py``, same
arguments), the per-step generators (so a resumed run repeats the uninterrupted one bit for
bit), atomic checkpoints (``training/checkpointing.py``), EMA, AdamW with warm-up + cosine LR,
gradient clipping, and a stop with a message on a non-finite loss.

Output, refreshed at every checkpoint and at the end (EMA weights):

- ``<output_dir>/model/vae``: ``AutoencoderKL.save_pretrained`` (safetensors), whose config
  carries the measured latent ``scaling_factor`` = 1 / std of posterior samples over the training
  images (as Stable Diffusion's 0.18215 was measured), so ``z = vae.encode(x).latent_dist.sample()
  * vae.config.scaling_factor`` has unit variance;
- ``metrics.json`` (:func:`evaluate_autoencoder` on the held-out digits: PSNR, the bundled MNIST
  classifier's accuracy on reconstructions and originals, latent statistics), ``README.md``
  (model card), ``training_args.json`` and ``reconstructions.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.sources import DataError, load_training_data, mnist_digits
from training.autoencoder_presets import PRESETS, latent_shape, vae_config
from training.checkpointing import TrainingError, find_checkpoint, read_training_state, save_training_state
from training.train import batch_indices, step_generator

RECONSTRUCTION_LOSSES = ("l1", "mse", "l1+mse")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--vae_preset", default="mnist-f4", choices=sorted(PRESETS))
    g.add_argument("--vae_config", default=None, help="AutoencoderKL config JSON (overrides --vae_preset)")
    g.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                   help="override the preset; n entries downsample by 2^(n-1)")
    g.add_argument("--latent_channels", type=int, default=None, help="override the preset")
    g.add_argument("--layers_per_block", type=int, default=None, help="override the preset")
    g.add_argument("--norm_num_groups", type=int, default=None, help="override the preset (must divide the channels)")
    g = p.add_argument_group("loss")
    g.add_argument("--reconstruction_loss", choices=RECONSTRUCTION_LOSSES, default="l1+mse",
                   help="pixel loss on [-1, 1] images (means over pixels)")
    g.add_argument("--kl_weight", type=float, default=1e-4, help="β: weight of the KL to N(0, I), mean over latent elements")
    g.add_argument("--sample_posterior", action=argparse.BooleanOptionalAction, default=True,
                   help="decode a posterior sample (VAE) rather than its mean")
    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None, help="image folder (labels from sub-folders)")
    g.add_argument("--dataset_name", default=None, help="Hub dataset (needs network); default: built-in MNIST subset")
    g.add_argument("--image_column", default="image")
    g.add_argument("--label_column", default="label")
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--channels", type=int, default=None, help="image channels (default: from the data)")
    g.add_argument("--resize_mode", choices=("pad", "resize"), default=None,
                   help="pad small images (MNIST default) or resize + centre-crop (folders default)")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=64, help="per process")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (overrides --num_epochs)")
    g.add_argument("--num_epochs", type=int, default=30)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--lr_scheduler", default="cosine", help="diffusers get_scheduler name")
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)
    g.add_argument("--ema_max_decay", type=float, default=0.999)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads per process (torch.set_num_threads); default: torch's choice")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--checkpointing_steps", type=int, default=200, help="checkpoint, export and evaluate every N steps (0: end only)")
    g.add_argument("--checkpoints_total_limit", type=int, default=3)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--eval_images", type=int, default=1000, help="held-out images for metrics.json (MNIST: the 1,000 test digits)")
    g.add_argument("--scaling_images", type=int, default=0, help="training images for the scaling factor (0: all)")
    g.add_argument("--no_progress", action="store_true", help="plain log lines instead of a progress bar")
    args = p.parse_args(argv)
    if args.train_batch_size < 1:
        p.error("--train_batch_size must be ≥ 1")
    if args.kl_weight < 0:
        p.error("--kl_weight must be ≥ 0")
    if args.num_threads is not None and args.num_threads < 1:
        p.error("--num_threads must be ≥ 1")
    if args.eval_images < 1 or args.scaling_images < 0:
        p.error("--eval_images must be ≥ 1 and --scaling_images ≥ 0")
    return args


# ---- the objective ------------------------------------------------------------------------------------------
class AutoencoderForTraining(torch.nn.Module):
    """``AutoencoderKL`` with one ``forward`` (encode → sample → decode), so DDP and autocast see one call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def vae_loss(model, x: torch.Tensor, generator: torch.Generator | None, reconstruction_loss: str = "l1+mse",
             kl_weight: float = 1e-4, sample_posterior: bool = True) -> tuple[torch.Tensor, dict]:
    """Reconstruction (means over pixels of [-1, 1] images) + ``kl_weight`` · KL(q(z|x) ‖ N(0, I)) per latent element.

    Returns:
        the loss and its detached parts ``{"rec", "kl"}``.
    """
    recon, mean, logvar = model(x, generator, sample_posterior)
    err = recon.float() - x.float()
    l1, mse = err.abs().mean(), err.pow(2).mean()
    rec = {"l1": l1, "mse": mse, "l1+mse": l1 + mse}[reconstruction_loss]
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}


# ---- measurement --------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], measured on the [0, 1] range: 10·log10(1 / MSE) over all pixels."""
    x01 = (x.detach().float().clamp(-1, 1) + 1) / 2
    y01 = (y.detach().float().clamp(-1, 1) + 1) / 2
    mse = float((x01 - y01).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the posterior means: the reconstructions (clamped to [-1, 1]) and the latent means, both on the CPU."""
    device, dtype = _device_of(vae), next(vae.parameters()).dtype
    recons, latents = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, dtype)
        z = vae.encode(x).latent_dist.mean
        recons.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
        latents.append(z.float().cpu())
    return torch.cat(recons), torch.cat(latents)


@torch.no_grad()
def measure_latent_scale(vae, images: torch.Tensor, seed: int = 0, batch_size: int = 250) -> dict:
    """Latent statistics over ``images`` and the scaling factor 1 / std(z), z sampled from the posterior.

    (Stable Diffusion's 0.18215 is the same measurement on its training images.)
    """
    device, dtype = _device_of(vae), next(vae.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    means, samples = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i:i + batch_size].to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        samples.append(dist.sample(generator=gen).float().cpu())
    means, samples = torch.cat(means), torch.cat(samples)
    std = float(samples.std())
    return {"scaling_factor": 1.0 / std, "latent_sample_std": std, "latent_sample_mean": float(samples.mean()),
            "latent_mean_std": float(means.std()), "latent_channel_std": [float(s) for s in samples.std(dim=(0, 2, 3))],
            "latent_channel_mean": [float(m) for m in samples.mean(dim=(0, 2, 3))], "num_images": len(images)}


def evaluate_autoencoder(vae, images: torch.Tensor, labels: torch.Tensor | None = None, classifier="auto",
                         batch_size: int = 250) -> dict:
    """Reconstruction quality of ``vae`` on ``images`` ([N, C, H, W] in [-1, 1]), from the posterior means.

    Args:
        vae: an ``AutoencoderKL`` (put in eval mode by the caller).
        labels: digit labels; with them (and 1×32×32 images) the bundled MNIST classifier's accuracy on
            the originals and on the reconstructions is reported.
        classifier: a ``DigitClassifier``, ``"auto"`` (load the bundled one when it applies) or None.

    Returns:
        ``psnr`` (dB on the [0, 1] range, from the MSE over all pixels), ``psnr_per_image_mean``,
        ``mse`` and ``l1`` (on [-1, 1]), ``latent_mean``/``latent_std`` of the posterior means and,
        when labels are given, ``accuracy_originals``/``accuracy_reconstructions``.
    """
    images = images.float()
    recons, latents = reconstruct(vae, images, batch_size)
    per_image = [psnr(a, b) for a, b in zip(recons, images)]
    finite = [v for v in per_image if math.isfinite(v)]
    out = {
        "num_images": len(images),
        "psnr": psnr(recons, images),
        "psnr_per_image_mean": sum(finite) / len(finite) if finite else math.inf,
        "mse": float((recons - images).pow(2).mean()),
        "l1": float((recons - images).abs().mean()),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
    }
    if labels is not None and classifier is not None:
        if isinstance(classifier, str) and classifier == "auto":
            classifier = None
            if tuple(images.shape[1:]) == (1, 32, 32):
                from evaluation.classifier import DEFAULT_PATH, load_classifier

                if (Path(DEFAULT_PATH) / "model.safetensors").exists():
                    classifier = load_classifier(DEFAULT_PATH)
        if classifier is not None:
            from evaluation.classifier import accuracy

            out["accuracy_originals"] = accuracy(classifier, images, labels)
            out["accuracy_reconstructions"] = accuracy(classifier, recons, labels)
    return out


# ---- the run ------------------------------------------------------------------------------------------------
class AutoencoderTrainer:
    """One autoencoder training run, set up stage by stage like ``training.train.Trainer``: accelerator,
    data, model, optimisation, resume; :meth:`run` loops over optimizer steps (:meth:`train_step`), logs,
    checkpoints and exports (:meth:`export_model`).

    Args:
        args: the parsed arguments (:func:`parse_args`).
        argv: the command line as given, for the model card.
    """

    def __init__(self, args: argparse.Namespace, argv=None):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.command = "accelerate launch training/train_autoencoder.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        self._setup_accelerator()
        self._load_data()
        self._build_model()
        self._build_optimisation()
        self._resume()

    # ---- set-up -------------------------------------------------------------------------------------------
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.accelerator = Accelerator(mixed_precision=self.args.mixed_precision,
                                       project_config=ProjectConfiguration(project_dir=str(self.output_dir)))
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main_proc = self.accelerator.is_main_process

    def say(self, msg: str) -> None:
        if self.main_proc:
            print(msg, flush=True)

    def _load_data(self) -> None:
        """Decode the training images once; pick the evaluation set (MNIST: the 1,000 held-out digits)."""
        args = self.args
        try:
            self.data = load_training_data(args)
        except DataError as err:
            raise TrainingError(f"bad training data: {err}") from err
        self.images = self.data.images.to(self.accelerator.device)
        builtin_mnist = not args.train_data_dir and not args.dataset_name
        if builtin_mnist:
            n = min(args.eval_images, 1000)
            self.eval_images, self.eval_labels = mnist_digits("test", n=n, resolution=args.resolution)
            self.eval_set = f"{n} held-out digits of the MNIST subset (test split)"
        else:  # no held-out split of a user's folder: report the fit on the first training images
            n = min(args.eval_images, len(self.data))
            self.eval_images, self.eval_labels = self.data.images[:n], None
            self.eval_set = f"the first {n} training images (no held-out split)"
        self.classifier = None
        if self.eval_labels is not None and tuple(self.eval_images.shape[1:]) == (1, 32, 32):
            from evaluation.classifier import DEFAULT_PATH, load_classifier

            if (Path(DEFAULT_PATH) / "model.safetensors").exists():
                self.classifier = load_classifier(DEFAULT_PATH)

    def _build_model(self) -> None:
        from diffusers import AutoencoderKL

        args = self.args
        overrides = {"block_out_channels": args.block_out_channels, "latent_channels": args.latent_channels,
                     "layers_per_block": args.layers_per_block, "norm_num_groups": args.norm_num_groups}
        try:
            self.vae_config = vae_config(args.vae_preset, args.vae_config, resolution=args.resolution,
                                         channels=self.data.images.shape[1], overrides=overrides)
        except ValueError as err:
            raise TrainingError(str(err)) from err
        torch.manual_seed(args.seed)
        self.vae = AutoencoderKL(**self.vae_config)
        self.model = AutoencoderForTraining(self.vae)
        self.n_params = sum(p.numel() for p in self.vae.parameters())
        self.latent_shape = latent_shape(self.vae_config)

    def _build_optimisation(self) -> None:
        """AdamW, the LR schedule and EMA, prepared and registered for checkpointing."""
        from diffusers import AutoencoderKL
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        args, accelerator = self.args, self.accelerator
        self.ema = None
        if args.use_ema:
            self.ema = EMAModel(self.vae.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                                inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=AutoencoderKL,
                                model_config=self.vae.config)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        per_epoch = max(1, len(self.data) // (args.train_batch_size * self.world))
        self.max_steps = args.max_train_steps or args.num_epochs * per_epoch
        self.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=self.max_steps)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        if self.ema is not None:
            self.ema.to(accelerator.device)
            accelerator.register_for_checkpointing(self.ema)

    def _resume(self) -> None:
        """Start at step 0, or restore the newest (or named) checkpoint."""
        self.state = {"step": 0, "train_seconds": 0.0, "loss_ema": float("nan"), "rec_ema": float("nan"),
                      "kl_ema": float("nan"), "num_processes": self.world,
                      "device": f"{self.accelerator.device.type} × {self.world}", "threads": torch.get_num_threads()}
        self.last_checkpoint = None
        which = self.args.resume_from_checkpoint
        if not which:
            return
        folder = find_checkpoint(self.output_dir, which)
        if folder is None:
            self.say(f"--resume_from_checkpoint latest: no checkpoint in {self.output_dir / 'checkpoints'} yet; starting from step 0")
            return
        self.accelerator.load_state(str(folder))
        saved = read_training_state(folder)
        if saved.get("num_processes", self.world) != self.world:
            self.say(f"note: the checkpoint was written by {saved['num_processes']} processes, resuming with {self.world}; "
                     "the data order differs from an uninterrupted run")
        self.state.update({k: saved[k] for k in ("step", "train_seconds", "loss_ema", "rec_ema", "kl_ema") if k in saved})
        self.last_checkpoint = folder
        self.say(f"resumed from {folder} at step {self.state['step']}")

    @property
    def raw_vae(self):
        return self.accelerator.unwrap_model(self.model).vae

    # ---- outputs ------------------------------------------------------------------------------------------
    def resolved_args(self) -> dict:
        """The arguments as the run used them (``training_args.json``)."""
        return {**vars(self.args), "max_train_steps": self.max_steps, "num_processes": self.world,
                "vae_config": self.vae_config, "latent_shape": list(self.latent_shape), "parameters": self.n_params,
                "data_source": self.data.source, "num_train_images": len(self.data), "eval_set": self.eval_set}

    def _with_ema_weights(self, fn):
        """Call ``fn(vae)`` in eval mode with the EMA weights swapped in (the raw ones when EMA is off)."""
        vae = self.raw_vae
        if self.ema is not None:
            self.ema.store(vae.parameters())
            self.ema.copy_to(vae.parameters())
        was_training = vae.training
        vae.eval()
        try:
            return fn(vae)
        finally:
            vae.train(was_training)
            if self.ema is not None:
                self.ema.restore(vae.parameters())

    def evaluate(self, vae) -> dict:
        """Scaling factor on the training images and :func:`evaluate_autoencoder` on the evaluation set."""
        scale_images = self.data.images[:self.args.scaling_images or None]
        scale = measure_latent_scale(vae, scale_images, seed=self.args.seed)
        metrics = evaluate_autoencoder(vae, self.eval_images, self.eval_labels, classifier=self.classifier)
        return {"step": self.state["step"], "scaling_factor": scale["scaling_factor"], "eval_set": self.eval_set,
                **{f"eval_{k}": v for k, v in metrics.items()}, "latents": scale}

    def export_model(self) -> dict | None:
        """Evaluate the EMA weights and write ``<output_dir>/model`` atomically (main process only)."""
        if not self.main_proc:
            return None

        def export(vae):
            metrics = self.evaluate(vae)
            folder = self.output_dir / "model"
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=folder.parent))
            try:
                vae.register_to_config(scaling_factor=metrics["scaling_factor"])
                vae.save_pretrained(tmp / "vae", safe_serialization=True)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                (tmp / "training_args.json").write_text(json.dumps(self.resolved_args(), indent=2, default=str) + "\n")
                (tmp / "README.md").write_text(self.model_card(metrics))
                self._save_reconstructions(vae, tmp / "reconstructions.png")
                old = folder.with_name(".model.old")
                shutil.rmtree(old, ignore_errors=True)
                if folder.exists():
                    folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            with open(self.output_dir / "eval_log.jsonl", "a") as fh:
                fh.write(json.dumps({k: v for k, v in metrics.items() if k != "latents"}) + "\n")
            return metrics

        metrics = self._with_ema_weights(export)
        acc = ""
        if "eval_accuracy_reconstructions" in metrics:
            acc = (f", classifier accuracy {metrics['eval_accuracy_reconstructions']:.2%} on reconstructions vs "
                   f"{metrics['eval_accuracy_originals']:.2%} on originals")
        self.say(f"eval at step {metrics['step']}: PSNR {metrics['eval_psnr']:.2f} dB{acc}; "
                 f"scaling factor {metrics['scaling_factor']:.4f}")
        return metrics

    def _save_reconstructions(self, vae, path: Path) -> None:
        """Originals (odd rows) over their reconstructions (even rows), 16 of each."""
        from data.images import make_grid

        x = self.eval_images[:16]
        recon, _ = reconstruct(vae, x)
        rows = torch.cat([torch.cat([x[i:i + 8].cpu(), recon[i:i + 8]]) for i in range(0, len(x), 8)])
        make_grid(rows, nrow=8, scale=2).save(path)

    def model_card(self, metrics: dict) -> str:
        """README.md of the exported autoencoder: architecture, data, loss, steps, time, quality, the exact command."""
        args, state, cfg = self.args, self.state, self.vae_config
        c, h, w = self.latent_shape
        res, ch = args.resolution, self.data.images.shape[1]
        quality = [f"| reconstruction PSNR (posterior mean, [0, 1] range) | {metrics['eval_psnr']:.2f} dB |"]
        if "eval_accuracy_reconstructions" in metrics:
            quality += [f"| MNIST classifier accuracy on reconstructions | {metrics['eval_accuracy_reconstructions']:.2%} |",
                        f"| MNIST classifier accuracy on the originals | {metrics['eval_accuracy_originals']:.2%} |"]
        lat = metrics["latents"]
        lines = [
            "---", "library_name: diffusers", "tags: [autoencoder, vae, latent-diffusion, mnist, sampler-lab]", "---", "",
            f"# {self.output_dir.name}: AutoencoderKL, {res}×{res}×{ch} → {h}×{w}×{c} latents",
            "", (f"Trained with this project's `training/train_autoencoder.py` on {self.data.source}; "
                 "the weights in `vae/` are the EMA weights."), "",
            "| | |", "|---|---|",
            (f"| architecture | AutoencoderKL, block_out_channels {list(cfg['block_out_channels'])}, "
             f"{cfg.get('layers_per_block', 1)} layer(s) per block, "
             f"{'mid-block attention' if cfg.get('mid_block_add_attention', True) else 'no attention'} |"),
            f"| parameters | {self.n_params:,} |",
            f"| latents | {c}×{h}×{w} (downsampling factor {res // h}) |",
            (f"| loss | {args.reconstruction_loss} on [-1, 1] pixels + {args.kl_weight:g} · KL per latent element "
             f"({'posterior sample' if args.sample_posterior else 'posterior mean'} decoded) |"),
            f"| optimizer steps | {state['step']:,} (batch {args.train_batch_size} × {state['num_processes']} processes) |",
            (f"| training time | {state['train_seconds'] / 3600:.2f} h of wall time ({state['device']}, "
             f"{state.get('threads', torch.get_num_threads())} thread(s)) |"),
            (f"| final loss (running mean of the last 100 steps) | {state['loss_ema']:.4f} "
             f"(reconstruction {state['rec_ema']:.4f}, KL {state['kl_ema']:.3f}) |"),
            (f"| latent scaling factor (1 / std of posterior samples, {lat['num_images']} training images) "
             f"| {metrics['scaling_factor']:.5f} |"),
            (f"| latents before scaling: mean, std (per channel) | {lat['latent_sample_mean']:.3f}, {lat['latent_sample_std']:.3f} "
             f"({', '.join(f'{m:.2f}±{sd:.2f}' for m, sd in zip(lat['latent_channel_mean'], lat['latent_channel_std']))}) |"),
            "", f"## Quality on {metrics['eval_set']}", "", "| | |", "|---|---|", *quality,
            "", ("`metrics.json` has these and the latent statistics; `reconstructions.png` shows originals above their "
                 "reconstructions."), "",
            "## Use", "", "```python", "from diffusers import AutoencoderKL", "",
            'vae = AutoencoderKL.from_pretrained("path/to/model/vae")',
            f"z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor   # x: [N, {ch}, {res}, {res}] in [-1, 1]",
            "x_hat = vae.decode(z / vae.config.scaling_factor).sample", "```", "",
            "## Command", "", "```bash", self.command, "```", "",
            "The resolved arguments are in `training_args.json`.", "",
        ]
        return "\n".join(lines)

    def checkpoint(self) -> None:
        self.last_checkpoint = save_training_state(self.accelerator, self.output_dir, self.state,
                                                   self.args.checkpoints_total_limit)

    # ---- the loop -----------------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[torch.Tensor, dict]:
        """One optimizer step; every random draw comes from (seed, step, rank)."""
        args, accelerator = self.args, self.accelerator
        torch.manual_seed(step_generator(args.seed, step, self.rank).initial_seed())
        gen = step_generator(args.seed, step, self.rank)
        idx = batch_indices(len(self.data), args.train_batch_size, self.world, self.rank, args.seed, step).to(self.images.device)
        x = self.images[idx]
        if args.random_flip:
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(self.images.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss, parts = vae_loss(self.model, x, gen, args.reconstruction_loss, args.kl_weight, args.sample_posterior)
        self._check_finite(loss, step)
        accelerator.backward(loss)
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.raw_vae.parameters())
        return loss, parts

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Stop every process with one message when any rank's loss is not finite."""
        args = self.args
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
        if finite:
            return
        hint = ("fp16 overflow: try --mixed_precision bf16 or no" if args.mixed_precision == "fp16" else
                f"the learning rate {self.lr_scheduler.get_last_lr()[0]:.2e} is probably too high: try --learning_rate "
                f"{args.learning_rate / 10:.1e}, or check the data for NaN pixels")
        where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        raise TrainingError(f"non-finite loss at step {step + 1} (autoencoder, {args.reconstruction_loss} + "
                            f"{args.kl_weight:g}·KL); likely cause: {hint}; {where}. Fix the setting and run again with "
                            "--resume_from_checkpoint latest.")

    def _open_log(self) -> Path:
        """``train_log.jsonl``, one line per optimizer step; after a resume the steps about to be redone are dropped."""
        log_path = self.output_dir / "train_log.jsonl"
        if self.main_proc:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if log_path.exists():
                kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.state["step"]]
            log_path.write_text("".join(ln + "\n" for ln in kept))
        return log_path

    def _update_running_means(self, values: dict) -> None:
        for key, value in values.items():
            old = self.state[f"{key}_ema"]
            self.state[f"{key}_ema"] = value if math.isnan(old) else 0.99 * old + 0.01 * value

    def run(self) -> int:
        """Train to ``max_steps``, checkpointing, evaluating and exporting on the way; returns 0."""
        args, state = self.args, self.state
        c, h, w = self.latent_shape
        self.say(f"AutoencoderKL, {self.n_params:,} parameters, latents {c}×{h}×{w}; {len(self.data)} images from "
                 f"{self.data.source}; {self.max_steps} steps of {args.train_batch_size}×{self.world} images; "
                 f"{torch.get_num_threads()} thread(s) per process")
        log_path = self._open_log()
        progress = None
        if self.main_proc and not args.no_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.max_steps, initial=state["step"], desc="train vae", dynamic_ncols=True)
        self.model.train()
        t_start, imgs_since, t_since = time.time(), 0, time.time()
        base_seconds = state["train_seconds"]
        while state["step"] < self.max_steps:
            loss, parts = self.train_step(state["step"])
            values = {"loss": loss.item(), "rec": parts["rec"].item(), "kl": parts["kl"].item()}
            state["step"] += 1
            self._update_running_means(values)
            state["train_seconds"] = base_seconds + (time.time() - t_start)
            imgs_since += args.train_batch_size * self.world
            lr = self.lr_scheduler.get_last_lr()[0]
            if self.main_proc:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": state["step"], **values, "lr": lr}) + "\n")
                every = 10 if progress is not None else 50
                if progress is not None:
                    progress.update(1)
                if state["step"] % every == 0 or state["step"] == self.max_steps:
                    rate = imgs_since / max(time.time() - t_since, 1e-9)
                    if progress is not None:
                        progress.set_postfix(loss=f"{state['loss_ema']:.4f}", kl=f"{state['kl_ema']:.2f}", lr=f"{lr:.1e}",
                                             img_s=f"{rate:.0f}")
                    else:
                        print(f"step {state['step']}/{self.max_steps} loss {state['loss_ema']:.4f} (rec {state['rec_ema']:.4f}, "
                              f"kl {state['kl_ema']:.3f}) lr {lr:.2e} {rate:.1f} img/s", flush=True)
                    imgs_since, t_since = 0, time.time()
            if args.checkpointing_steps and state["step"] % args.checkpointing_steps == 0 and state["step"] < self.max_steps:
                self.checkpoint()
                self.export_model()
        if progress is not None:
            progress.close()
        self.checkpoint()
        self.final_metrics = self.export_model()
        self.accelerator.end_training()
        from pipelines.checkpoint import weights_digest

        print(f"[rank {self.rank}] weights sha256 {weights_digest(self.raw_vae)}", flush=True)
        self.say(f"done: {state['step']} steps in {state['train_seconds'] / 60:.1f} min, loss {state['loss_ema']:.4f}, "
                 f"model in {self.output_dir / 'model'}")
        return 0


def main(argv=None) -> int:
    """Parse the arguments and train; raises :class:`TrainingError` with a message for people."""
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.num_threads)
    return AutoencoderTrainer(args, argv).run()


def cli() -> None:
    """Console entry point: errors become one line on stderr and exit status 1."""
    try:
        sys.exit(main())
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
