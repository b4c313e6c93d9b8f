"""Fit a UNet2DModel with the DDPM ε-objective or NCSN denoising score matching.

    accelerate launch training/train.py --objective ddpm --output_dir runs/mnist-ddpm
    accelerate launch --multi_gpu --num_processes 2 training/train.py --objective ncsn ...

Single process on a CPU or GPU, many GPUs or nodes under ``accelerate launch``. Conventions
follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (argument
names, AdamW + warmup/cosine LR, EMA, ``accelerator.save_state`` checkpoints) with these
differences, each for a reason:

- The data set is decoded and normalised once into memory (``data/sources.py``); a step only
  indexes it. That is most of the speed-up over the per-step image transforms of the example.
- Every random draw of optimizer step k (data order, noise, σ or t, label dropout) comes from
  generators seeded by (seed, k, rank), so a resumed run repeats the uninterrupted run exactly.
- Checkpoints are written to a temporary folder and renamed into place once complete, so a
  run killed while saving never leaves a half-written "latest" checkpoint.
- A non-finite loss stops the run with a message; the last good checkpoint is kept.

The final model (EMA weights) is a diffusers-format folder ``<output_dir>/model`` that
``pipelines.SamplerPipeline`` and ``app.py`` load without extra flags; it is also refreshed
at every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from data.sources import DataError, load_training_data
from training.checkpointing import (  # noqa: F401  (STATE_FILE, CHECKPOINT_PREFIX: part of this module's interface)
    CHECKPOINT_PREFIX, STATE_FILE, TrainingError, find_checkpoint, read_training_state, save_training_state,
)
from training.hub import push_model, redact_args, redact_argv
from training.losses import TIMESTEP_SAMPLING, ddpm_loss, ncsn_loss
from training.presets import DIT_INITS, DIT_PRESETS, PRESETS, dit_config, init_dit_weights_, unet_config
from training.reports import build_model_card, save_sample_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=("ddpm", "ncsn"), default="ddpm",
                   help="ddpm: VP ε/x₀/v objective; ncsn: VE denoising score matching (docs/schedules.md)")
    g.add_argument("--prediction_type", choices=("epsilon", "sample", "v_prediction"), default="epsilon", help="ddpm only")
    g.add_argument("--num_train_timesteps", type=int, default=1000, help="ddpm: T")
    g.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLING, default="uniform",
                   help="ddpm: training labels t uniform (Ho et al.) or logit-normal around the middle (Esser et al. 2024)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="ddpm, logit_normal: m (0 centres the draws on t = T/2)")
    g.add_argument("--logit_std", type=float, default=1.0, help="ddpm, logit_normal: s")
    g.add_argument("--beta_schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    g.add_argument("--beta_start", type=float, default=1e-4)
    g.add_argument("--beta_end", type=float, default=0.02)
    g.add_argument("--sigma_min", type=float, default=0.01, help="ncsn: smallest σ (pixels in [-1, 1])")
    g.add_argument("--sigma_max", type=float, default=50.0, help="ncsn: largest σ (≈ largest distance between images)")
    g.add_argument("--num_sigma_levels", type=int, default=0,
                   help="ncsn: train on this many geometric levels (NCSN); 0 = continuous σ (--sigma_sampling)")
    g.add_argument("--sigma_sampling", choices=("log_uniform", "vp_uniform"), default="log_uniform",
                   help="ncsn: continuous σ log-uniform, or distributed as DDPM's uniform timesteps on the linear "
                        "schedule spanning [sigma_min, sigma_max]")
    g.add_argument("--ncsn_input_scaling", choices=("unit_variance", "none"), default="unit_variance",
                   help="ncsn: feed x̃/√(1+σ²) (EDM's c_in) or x̃ as is (diffusers' NCSN++)")
    g.add_argument("--fourier_scale", type=float, default=1.0,
                   help="ncsn: scale of the random Fourier features of log σ (diffusers' default 16 suits large nets)")
    g = p.add_argument_group("latent diffusion")
    g.add_argument("--vae", default=None,
                   help="train on the latents of this autoencoder (a folder with vae/ or an AutoencoderKL/VQModel folder, "
                        "e.g. the output of training/train_autoencoder.py); the exported checkpoint includes it")
    g.add_argument("--latent_scaling", choices=("measure", "config"), default="measure",
                   help="latent scaling factor: 1/std of the training latents (as Stable Diffusion) or the VAE config's")
    g.add_argument("--backbone", choices=("unet", "dit"), default="unet", help="denoiser: UNet2DModel or a DiT transformer")
    g.add_argument("--dit_preset", default="dit-cpu-p1", choices=sorted(DIT_PRESETS),
                   help="dit: size preset (training/presets.py; the default is the bundled latent DiT's)")
    g.add_argument("--patch_size", type=int, default=None, help="dit: patch size (default: the preset's)")
    g.add_argument("--dit_init", choices=DIT_INITS, default="default",
                   help="dit: diffusers' initialisation (PyTorch defaults; the bundled DiT's) or the DiT paper's "
                        "(adaln_zero: every block starts as the identity, the output at 0)")
    g = p.add_argument_group("conditioning")
    g.add_argument("--class_conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="train with class labels (default: when the data has labels)")
    g.add_argument("--p_uncond", type=float, default=0.1, help="label dropout for classifier-free guidance (docs/guidance.md)")
    g = p.add_argument_group("model")
    g.add_argument("--model_preset", default="cpu-small", choices=sorted(PRESETS))
    g.add_argument("--model_config", default=None, help="UNet2DModel config JSON (overrides --model_preset)")
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
    g.add_argument("--train_batch_size", type=int, default=128, help="per process")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (overrides --num_epochs)")
    g.add_argument("--num_epochs", type=int, default=100)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-4)
    g.add_argument("--lr_scheduler", default="cosine", help="diffusers get_scheduler name")
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--adam_beta1", type=float, default=0.95)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-6)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)
    g.add_argument("--ema_max_decay", type=float, default=0.9999)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="the training precision (what --dtype is for sampling); weights and optimizer stay float32")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda or mps; under `accelerate launch` each "
                        "process takes its own GPU")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=3)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--save_images_steps", type=int, default=1000, help="sample grid every N steps (0: never)")
    g.add_argument("--report_to", default="tensorboard", help="'tensorboard' (when installed) or 'none'")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--no_progress", action="store_true", help="plain log lines instead of a progress bar")
    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload <output_dir>/model when training ends")
    g.add_argument("--hub_model_id", default=None, help="repo id (default: <your user>/<output_dir name>)")
    g.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    g.add_argument("--hub_token", default=None, help="token (default: the one from `huggingface-cli login`); never logged")
    args = p.parse_args(argv)
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        p.error("--train_batch_size and --gradient_accumulation_steps must be ≥ 1")
    if not 0 <= args.p_uncond < 1:
        p.error("--p_uncond must be in [0, 1)")
    if not args.logit_std > 0:
        p.error("--logit_std must be positive")
    if args.objective == "ncsn" and not 0 < args.sigma_min < args.sigma_max:
        p.error("--sigma_min must be positive and below --sigma_max")
    if args.vae and args.objective != "ddpm":
        p.error("--vae: latent models are trained with --objective ddpm")
    if args.vae and args.random_flip:
        p.error("--vae: --random_flip does not apply to cached latents (flip the data set instead)")
    if args.backbone == "dit" and args.objective != "ddpm":
        p.error("--backbone dit: DiT denoisers are trained with --objective ddpm")
    from pipelines.device import DeviceError, resolve_device

    try:
        resolve_device(args.device)  # the one device rule: a device this machine lacks is refused here
    except DeviceError as err:
        p.error(str(err))
    return args


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, rank, micro)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63))


def batch_indices(num_items: int, batch_size: int, num_processes: int, rank: int, seed: int, k: int) -> torch.Tensor:
    """Indices of the k-th micro-batch of this rank: epoch-wise shuffles seeded by (seed, epoch)."""
    per_epoch = max(1, num_items // (batch_size * num_processes))
    epoch, j = divmod(k, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 65_537 + epoch))
    start = (j * num_processes + rank) * batch_size
    idx = perm[start:start + batch_size]
    if len(idx) < batch_size:  # data smaller than one global batch: wrap around
        idx = perm[torch.arange(start, start + batch_size) % num_items]
    return idx


def load_autoencoder(path: str):
    """(model, note) of the autoencoder at ``path``: a folder with ``vae/`` or ``vqvae/``, or the model folder itself."""
    import diffusers

    from pipelines.latent import DECODER_FOLDERS

    root = Path(path)
    for folder in [root / name for name in DECODER_FOLDERS] + [root]:
        config_file = folder / "config.json"
        if config_file.exists():
            class_name = json.loads(config_file.read_text()).get("_class_name", "")
            if class_name in DECODER_FOLDERS.values():
                model = getattr(diffusers, class_name).from_pretrained(folder, use_safetensors=True)
                return model.eval().requires_grad_(False), f"{class_name} from {folder}"
    raise TrainingError(f"--vae {path}: no AutoencoderKL or VQModel there (looked for vae/, vqvae/ and config.json)")


class Trainer:
    """One training run, set up in the order a reader meets it: accelerator, data, model, optimisation,
    resume; then :meth:`run` loops over optimizer steps (:meth:`train_step`), logs, checkpoints and exports.

    Args:
        args: the parsed arguments (:func:`parse_args`).
        argv: the command line as given, for the model card.
    """

    def __init__(self, args: argparse.Namespace, argv=None):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.command = "accelerate launch training/train.py " + " ".join(
            shlex.quote(a) for a in redact_argv(list(argv if argv is not None else sys.argv[1:])))
        self._setup_accelerator()
        self._load_data()
        self._build_model()
        self._build_optimisation()
        self._resume()

    # ---- set-up -------------------------------------------------------------------------------------------
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        args = self.args
        report_to = args.report_to
        if report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                report_to = None
        self.report_to = None if report_to in (None, "none") else report_to
        self.accelerator = Accelerator(
            cpu=getattr(args, "device", "auto") == "cpu",  # auto/cuda/mps: accelerate's own choice, CUDA first
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=self.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / args.logging_dir)),
        )
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main_proc = self.accelerator.is_main_process

    def say(self, msg: str) -> None:
        if self.main_proc:
            print(msg, flush=True)

    def _load_data(self) -> None:
        """Decode the data once; decide conditioning and the null label of classifier-free guidance."""
        args = self.args
        if args.model_config and args.channels is None:
            cfg = json.loads(Path(args.model_config).read_text()) if Path(args.model_config).exists() else {}
            args.channels = cfg.get("in_channels")
        try:
            self.data = load_training_data(args)
        except DataError as err:
            raise TrainingError(f"bad training data: {err}") from err
        data = self.data
        self.conditional = args.class_conditional if args.class_conditional is not None else data.labels is not None
        if self.conditional and data.labels is None:
            raise TrainingError("--class_conditional needs labelled data (sub-folders of --train_data_dir, or --label_column)")
        self.num_classes = data.num_classes if self.conditional else None
        self.null_label = self.num_classes if (self.conditional and args.p_uncond > 0) else None
        self.num_class_embeds = None if not self.conditional else self.num_classes + (1 if self.null_label is not None else 0)
        self.images = data.images.to(self.accelerator.device)
        self.labels = data.labels.to(self.accelerator.device) if self.conditional else None
        self.decoder, self.latent_std = None, None
        if args.vae:
            self._encode_latents()

    def _encode_latents(self) -> None:
        """Encode the data once: the posterior mean and std of every image's latent, scaled.

        With ``--latent_scaling measure`` the scaling factor is 1/std of the training latents (the
        posterior means), as Stable Diffusion chose 0.18215; each step draws z = mean + std·n from
        the posterior with the step's generator.
        """
        from pipelines.latent import LatentDecoder

        model, note = load_autoencoder(self.args.vae)
        decoder = LatentDecoder(model.to(self.accelerator.device), 1.0, note)
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(self.images), 256):
                x = self.images[i:i + 256]
                if decoder.is_vq:
                    means.append(model.encode(x).latents)
                    stds.append(torch.zeros_like(means[-1]))
                else:
                    dist = model.encode(x).latent_dist
                    means.append(dist.mean)
                    stds.append(dist.std)
        mean, std = torch.cat(means), torch.cat(stds)
        if self.args.latent_scaling == "measure":
            decoder.scaling_factor = float(1.0 / mean.std())
            decoder.note = f"scaling_factor {decoder.scaling_factor:.4g} measured on the training latents"
        else:
            decoder.scaling_factor = float(model.config.scaling_factor)
        self.images, self.latent_std = mean * decoder.scaling_factor, std * decoder.scaling_factor
        self.decoder = decoder
        self.say(f"latents {tuple(self.images.shape[1:])} from {self.args.vae}; {decoder.note}; "
                 f"scaled latent std {float(self.images.std()):.3f}")

    def _build_model(self) -> None:
        """The UNet and the model family (what the pipeline needs to sample it)."""
        from diffusers import UNet2DModel

        from schedulers.parametrization import ModelFamily
        from schedulers.schedules import DiscreteVPSchedule

        args = self.args
        torch.manual_seed(args.seed)
        channels, size = self.images.shape[1], self.images.shape[-1]  # latents for a latent model
        if args.backbone == "dit":
            from diffusers import DiTTransformer2DModel

            if not self.conditional:
                raise TrainingError("--backbone dit: a DiT is class-conditional; train it on labelled data")
            self.unet_config = dit_config(args.dit_preset, args.model_config, sample_size=size, channels=channels,
                                          num_classes=self.num_classes, patch_size=args.patch_size)
            self.unet = DiTTransformer2DModel(**self.unet_config)
            if args.dit_init == "adaln_zero":
                init_dit_weights_(self.unet)
            for module in self.unet.modules():  # label dropout is ours (seeded, --p_uncond), not the embedding's own
                if type(module).__name__ == "LabelEmbedding":
                    module.dropout_prob = 0.0
            self.null_label = self.num_classes  # DiT's "no class" embedding (always present)
            self.num_class_embeds = self.num_classes + 1
        else:
            self.unet_config = unet_config(args.model_preset, args.model_config, resolution=size, channels=channels,
                                           objective=args.objective, num_class_embeds=self.num_class_embeds)
            self.unet = UNet2DModel(**self.unet_config)
        if args.objective == "ncsn":  # Fourier features of log σ at the requested scale
            self.unet.time_proj.weight.data = torch.randn(self.unet.time_proj.weight.shape) * args.fourier_scale
        self.n_params = sum(p.numel() for p in self.unet.parameters())
        if args.objective == "ddpm":
            schedule = DiscreteVPSchedule(args.num_train_timesteps, args.beta_start, args.beta_end, args.beta_schedule)
            self.family = ModelFamily(kind="vp", prediction_type=args.prediction_type, latent=self.decoder is not None,
                                      num_class_embeds=self.num_class_embeds, null_class_label=self.null_label)
            self.sampler_config = {"num_train_timesteps": args.num_train_timesteps, "beta_start": args.beta_start,
                                   "beta_end": args.beta_end, "beta_schedule": args.beta_schedule}
            self.alphas_cumprod = schedule.alphas_cumprod.float().to(self.accelerator.device)
        else:
            self.family = ModelFamily(kind="ve", prediction_type="score", data_range=(-1.0, 1.0), sigma_min=args.sigma_min,
                                      sigma_max=args.sigma_max, input_scaling=args.ncsn_input_scaling,
                                      num_class_embeds=self.num_class_embeds, null_class_label=self.null_label)
            self.sampler_config = {}

    def _build_optimisation(self) -> None:
        """AdamW, the LR schedule and EMA, prepared and registered for checkpointing."""
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        args, accelerator = self.args, self.accelerator
        self.ema = None
        if args.use_ema:
            self.ema = EMAModel(self.unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                                inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=type(self.unet),
                                model_config=self.unet.config)
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        per_epoch = max(1, len(self.data) // (args.train_batch_size * self.world * args.gradient_accumulation_steps))
        self.max_steps = args.max_train_steps or args.num_epochs * per_epoch
        self.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=self.max_steps)
        self.unet, self.optimizer = accelerator.prepare(self.unet, optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        if self.ema is not None:
            self.ema.to(accelerator.device)
            accelerator.register_for_checkpointing(self.ema)

    def _resume(self) -> None:
        """Start at step 0, or restore the newest (or named) checkpoint."""
        self.state = {"step": 0, "train_seconds": 0.0, "loss_ema": float("nan"), "num_processes": self.world,
                      "device": f"{self.accelerator.device.type} × {self.world}"}
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
        self.state.update({k: saved[k] for k in ("step", "train_seconds", "loss_ema") if k in saved})
        self.last_checkpoint = folder
        self.say(f"resumed from {folder} at step {self.state['step']}")

    # ---- outputs ------------------------------------------------------------------------------------------
    def resolved_args(self) -> dict:
        """The arguments as the run used them (``training_args.json``)."""
        return {**redact_args(vars(self.args)), "max_train_steps": self.max_steps, "num_processes": self.world,
                "unet_config": self.unet_config, "data_source": self.data.source, "num_train_images": len(self.data),
                "class_names": self.data.class_names if self.conditional else None,
                "latent_scaling_factor": self.decoder.scaling_factor if self.decoder is not None else None}

    def _with_ema_weights(self, fn) -> None:
        """Call ``fn(model)`` with the EMA weights swapped in (the raw ones when EMA is off)."""
        model = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        try:
            fn(model)
        finally:
            if self.ema is not None:
                self.ema.restore(model.parameters())

    def export_model(self) -> None:
        """Write the EMA (or raw) weights as a diffusers checkpoint folder ``<output_dir>/model`` (main process only)."""
        from pipelines.checkpoint import save_checkpoint, weights_digest

        if not self.main_proc:
            return

        def export(model):
            self.state["weights_sha256"] = weights_digest(model)  # of the exported (EMA) weights
            save_checkpoint(self.output_dir / "model", model, self.family, self.sampler_config,
                            training_args=self.resolved_args(),
                            model_card=build_model_card(self.args, self.family, self.data, self.n_params, self.state,
                                                        self.command, decoder=self.decoder,
                                                        latent_shape=tuple(self.images.shape[1:]) if self.decoder else None),
                            lab_extra={"class_names": self.data.class_names if self.conditional else None},
                            decoder=self.decoder)
            if self.args.save_images_steps:
                self.save_samples(model)

        self._with_ema_weights(export)

    def save_samples(self, model, ema=None) -> None:
        save_sample_grid(model, self.family, self.sampler_config,
                         self.output_dir / "samples" / f"step-{self.state['step']:07d}.png", self.num_classes,
                         self.accelerator, ema=ema, decoder=self.decoder)

    def checkpoint(self) -> None:
        self.last_checkpoint = save_training_state(self.accelerator, self.output_dir, self.state,
                                                   self.args.checkpoints_total_limit)

    # ---- the loop -----------------------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (with gradient accumulation); every random draw comes from (seed, step, rank, micro)."""
        args, accelerator, unet = self.args, self.accelerator, self.unet
        torch.manual_seed(step_generator(args.seed, step, self.rank).initial_seed())  # dropout etc.
        for micro in range(args.gradient_accumulation_steps):
            gen = step_generator(args.seed, step, self.rank, micro)
            k = step * args.gradient_accumulation_steps + micro
            idx = batch_indices(len(self.data), args.train_batch_size, self.world, self.rank, args.seed, k).to(self.images.device)
            x_0 = self.images[idx]
            if self.latent_std is not None:  # a draw from the VAE posterior: z = mean + std·n
                x_0 = x_0 + self.latent_std[idx] * torch.randn(x_0.shape, generator=gen).to(x_0.device)
            if args.random_flip:
                flip = (torch.rand(len(idx), generator=gen) < 0.5).to(self.images.device)
                x_0 = torch.where(flip.view(-1, 1, 1, 1), x_0.flip(-1), x_0)
            class_labels = None
            if self.conditional:
                class_labels = self.labels[idx]
                if self.null_label is not None:  # label dropout for classifier-free guidance
                    drop = (torch.rand(len(idx), generator=gen) < args.p_uncond).to(self.images.device)
                    class_labels = torch.where(drop, torch.full_like(class_labels, self.null_label), class_labels)
            with accelerator.accumulate(unet):
                if args.objective == "ddpm":
                    loss = ddpm_loss(unet, x_0, self.alphas_cumprod, gen, args.prediction_type, class_labels,
                                     args.timestep_sampling, args.logit_mean, args.logit_std)
                else:
                    loss = ncsn_loss(unet, x_0, args.sigma_min, args.sigma_max, gen, args.num_sigma_levels or None,
                                     class_labels, args.ncsn_input_scaling, args.sigma_sampling)
                self._check_finite(loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(unet.parameters())
        return loss

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
        raise TrainingError(f"non-finite loss at step {step + 1} (objective {args.objective}); likely cause: {hint}; "
                            f"{where}. Fix the setting and run again with --resume_from_checkpoint latest.")

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

    def run(self) -> int:
        """Train to ``max_steps``, checkpointing and exporting on the way; returns 0."""
        args, accelerator, state = self.args, self.accelerator, self.state
        if self.report_to and self.main_proc:
            accelerator.init_trackers("train", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        self.say(f"{self.n_params:,} parameters; {len(self.data)} images from {self.data.source}; {self.max_steps} steps of "
                 f"{args.train_batch_size}×{self.world}×{args.gradient_accumulation_steps} images; objective {args.objective}")
        log_path = self._open_log()
        progress = None
        if self.main_proc and not args.no_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.max_steps, initial=state["step"], desc="train", dynamic_ncols=True)
        self.unet.train()
        t_start, imgs_since, t_since = time.time(), 0, time.time()
        base_seconds = state["train_seconds"]
        while state["step"] < self.max_steps:
            loss_value = self.train_step(state["step"]).item()
            state["step"] += 1
            state["loss_ema"] = loss_value if math.isnan(state["loss_ema"]) else 0.99 * state["loss_ema"] + 0.01 * loss_value
            state["train_seconds"] = base_seconds + (time.time() - t_start)
            imgs_since += args.train_batch_size * self.world * args.gradient_accumulation_steps
            lr = self.lr_scheduler.get_last_lr()[0]
            if self.main_proc:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": state["step"], "loss": loss_value, "lr": lr}) + "\n")
                if self.report_to:
                    accelerator.log({"loss": loss_value, "lr": lr}, step=state["step"])
                every = 10 if progress is not None else 100
                if progress is not None:
                    progress.update(1)
                if state["step"] % every == 0 or state["step"] == self.max_steps:
                    rate = imgs_since / max(time.time() - t_since, 1e-9)
                    if progress is not None:
                        progress.set_postfix(loss=f"{state['loss_ema']:.4f}", lr=f"{lr:.1e}", img_s=f"{rate:.0f}")
                    else:
                        print(f"step {state['step']}/{self.max_steps} loss {state['loss_ema']:.4f} lr {lr:.2e} {rate:.0f} img/s",
                              flush=True)
                    imgs_since, t_since = 0, time.time()
            if args.checkpointing_steps and state["step"] % args.checkpointing_steps == 0 and state["step"] < self.max_steps:
                self.checkpoint()
                self.export_model()
            elif args.save_images_steps and state["step"] % args.save_images_steps == 0 and self.main_proc:
                self.save_samples(accelerator.unwrap_model(self.unet), ema=self.ema)
        if progress is not None:
            progress.close()
        self.checkpoint()
        self.export_model()
        accelerator.end_training()
        from pipelines.checkpoint import weights_digest

        print(f"[rank {self.rank}] weights sha256 {weights_digest(accelerator.unwrap_model(self.unet))}", flush=True)
        self.say(f"done: {state['step']} steps, loss {state['loss_ema']:.4f}, model in {self.output_dir / 'model'}")
        if args.push_to_hub and self.main_proc:
            try:
                repo = push_model(self.output_dir / "model", args.hub_model_id, args.hub_private_repo, args.hub_token)
            except RuntimeError as err:
                raise TrainingError(f"{err}; the trained model is kept in {self.output_dir / 'model'}") from err
            self.say(f"pushed {self.output_dir / 'model'} to https://huggingface.co/{repo}")
        return 0


def main(argv=None) -> int:
    """Parse the arguments and train; raises :class:`TrainingError` with a message for people."""
    return Trainer(parse_args(argv), argv).run()


def cli() -> None:
    """Console entry point (``sampler-lab-train``): errors become one line on stderr and exit status 1."""
    try:
        sys.exit(main())
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
