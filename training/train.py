"""Fit a UNet2DModel with the DDPM ε-objective or NCSN denoising score matching.

    accelerate launch training/train.py --objective ddpm --output_dir runs/mnist-ddpm
    accelerate launch --multi_gpu --num_processes 2 training/train.py --objective ncsn ...

Single process on a CPU or GPU, many GPUs or nodes under ``accelerate launch``. Conventions
follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (argument
names, AdamW + warmup/cosine LR, EMA, ``accelerator.save_state`` checkpoints) with these
differences, each for a reason:

- The data set is decoded and normalised once into memory (``training/data.py``); a step only
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
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch training/train.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training.data import DataError, load_training_data
from training.losses import ddpm_loss, ncsn_loss
from training.presets import PRESETS, unet_config

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "lab_state.json"  # written last: a checkpoint folder without it is incomplete


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=("ddpm", "ncsn"), default="ddpm",
                   help="ddpm: VP ε/x₀/v objective (MATH.md §1); ncsn: VE denoising score matching (§4)")
    g.add_argument("--prediction_type", choices=("epsilon", "sample", "v_prediction"), default="epsilon", help="ddpm only")
    g.add_argument("--num_train_timesteps", type=int, default=1000, help="ddpm: T")
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
    g = p.add_argument_group("conditioning")
    g.add_argument("--class_conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="train with class labels (default: when the data has labels)")
    g.add_argument("--p_uncond", type=float, default=0.1, help="label dropout for classifier-free guidance (MATH.md §6)")
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
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
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
    args = p.parse_args(argv)
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        p.error("--train_batch_size and --gradient_accumulation_steps must be ≥ 1")
    if not 0 <= args.p_uncond < 1:
        p.error("--p_uncond must be in [0, 1)")
    if args.objective == "ncsn" and not 0 < args.sigma_min < args.sigma_max:
        p.error("--sigma_min must be positive and below --sigma_max")
    return args


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """The newest complete checkpoint (``latest``) or the named folder; None if there is none yet."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).exists():
            raise TrainingError(f"--resume_from_checkpoint {which}: not a complete checkpoint folder (no {STATE_FILE})")
        return path
    root = output_dir / "checkpoints"
    done = [d for d in root.glob(f"{CHECKPOINT_PREFIX}*") if (d / STATE_FILE).exists()] if root.exists() else []
    return max(done, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):])) if done else None


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


def build_model_card(args, family, data, n_params, state, command) -> str:
    hours = state["train_seconds"] / 3600
    lines = [
        "---", "library_name: diffusers", "tags: [diffusion, mnist, sampler-lab]", "---", "",
        f"# {Path(args.output_dir).name}: {'DDPM (VP, ' + args.prediction_type + '-prediction)' if family.kind == 'vp' else 'NCSN (VE score network)'}",
        "", f"Trained with this project's `training/train.py` on {data.source}.", "",
        "| | |", "|---|---|",
        f"| objective | {args.objective} |",
        f"| parameters | {n_params:,} |",
        f"| resolution | {args.resolution}×{args.resolution}×{data.images.shape[1]} |",
        f"| conditioning | {'class-conditional, ' + str(data.num_classes) + ' classes, label dropout p=' + str(args.p_uncond) if family.is_conditional else 'unconditional'} |",
        f"| optimizer steps | {state['step']:,} (batch {args.train_batch_size} × {state['num_processes']} processes × {args.gradient_accumulation_steps} accumulation) |",
        f"| training time | {hours:.2f} h of wall time ({state['device']}) |",
        f"| final loss (running mean of the last 100 steps) | {state['loss_ema']:.4f} |",
        "", "## Command", "", "```bash", command, "```", "",
        "The resolved arguments are in `training_args.json`.", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from pipelines.checkpoint import save_checkpoint, weights_digest
    from schedulers.parametrization import ModelFamily
    from schedulers.schedules import DiscreteVPSchedule

    output_dir = Path(args.output_dir)
    report_to = args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if report_to in (None, "none") else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process

    def say(msg: str):
        if main_proc:
            print(msg, flush=True)

    # ---- data (decoded once) ----
    if args.model_config and args.channels is None:
        cfg = json.loads(Path(args.model_config).read_text()) if Path(args.model_config).exists() else {}
        args.channels = cfg.get("in_channels")
    try:
        data = load_training_data(args)
    except DataError as err:
        raise TrainingError(f"bad training data: {err}") from err
    conditional = args.class_conditional if args.class_conditional is not None else data.labels is not None
    if conditional and data.labels is None:
        raise TrainingError("--class_conditional needs labelled data (sub-folders of --train_data_dir, or --label_column)")
    num_classes = data.num_classes if conditional else None
    null_label = num_classes if (conditional and args.p_uncond > 0) else None
    num_class_embeds = None if not conditional else num_classes + (1 if null_label is not None else 0)

    # ---- model ----
    torch.manual_seed(args.seed)
    config = unet_config(args.model_preset, args.model_config, resolution=args.resolution, channels=data.images.shape[1],
                         objective=args.objective, num_class_embeds=num_class_embeds)
    unet = UNet2DModel(**config)
    if args.objective == "ncsn":  # Fourier features of log σ at the requested scale
        unet.time_proj.weight.data = torch.randn(unet.time_proj.weight.shape) * args.fourier_scale
    n_params = sum(p.numel() for p in unet.parameters())
    if args.objective == "ddpm":
        schedule = DiscreteVPSchedule(args.num_train_timesteps, args.beta_start, args.beta_end, args.beta_schedule)
        family = ModelFamily(kind="vp", prediction_type=args.prediction_type, num_class_embeds=num_class_embeds,
                             null_class_label=null_label)
        sampler_config = {"num_train_timesteps": args.num_train_timesteps, "beta_start": args.beta_start,
                          "beta_end": args.beta_end, "beta_schedule": args.beta_schedule}
        alphas_cumprod = schedule.alphas_cumprod.float().to(accelerator.device)
    else:
        family = ModelFamily(kind="ve", prediction_type="score", data_range=(-1.0, 1.0), sigma_min=args.sigma_min,
                             sigma_max=args.sigma_max, input_scaling=args.ncsn_input_scaling,
                             num_class_embeds=num_class_embeds, null_class_label=null_label)
        sampler_config = {}

    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    per_epoch = max(1, len(data) // (args.train_batch_size * world * args.gradient_accumulation_steps))
    max_steps = args.max_train_steps or args.num_epochs * per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    images = data.images.to(accelerator.device)
    labels = data.labels.to(accelerator.device) if conditional else None

    # ---- resume ----
    state = {"step": 0, "train_seconds": 0.0, "loss_ema": float("nan"), "num_processes": world,
             "device": f"{accelerator.device.type} × {world}"}
    resume_from = None
    if args.resume_from_checkpoint:
        resume_from = find_checkpoint(output_dir, args.resume_from_checkpoint)
        if resume_from is None:
            say(f"--resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'} yet; starting from step 0")
        else:
            accelerator.load_state(str(resume_from))
            saved = json.loads((resume_from / STATE_FILE).read_text())
            if saved.get("num_processes", world) != world:
                say(f"note: the checkpoint was written by {saved['num_processes']} processes, resuming with {world}; "
                    "the data order differs from an uninterrupted run")
            state.update({k: saved[k] for k in ("step", "train_seconds", "loss_ema") if k in saved})
            say(f"resumed from {resume_from} at step {state['step']}")

    command = "accelerate launch training/train.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    resolved = {**vars(args), "max_train_steps": max_steps, "num_processes": world, "unet_config": config,
                "data_source": data.source, "num_train_images": len(data), "class_names": data.class_names if conditional else None}

    def export_model():
        """Write the EMA (or raw) weights as a diffusers checkpoint folder (main process only)."""
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        try:
            if main_proc:
                save_checkpoint(output_dir / "model", model, family, sampler_config, training_args=resolved,
                                model_card=build_model_card(args, family, data, n_params, state, command),
                                lab_extra={"class_names": data.class_names if conditional else None})
            if main_proc and args.save_images_steps:
                save_sample_grid(model, family, sampler_config, output_dir / "samples" / f"step-{state['step']:07d}.png",
                                 num_classes, accelerator)
        finally:
            if ema is not None:
                ema.restore(model.parameters())

    def save_training_state():
        accelerator.wait_for_everyone()
        root = output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{state['step']}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{state['step']}"
        if main_proc:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main_proc:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # complete checkpoints only ever appear under their final name
            done = sorted((d for d in root.glob(f"{CHECKPOINT_PREFIX}*") if (d / STATE_FILE).exists()),
                          key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))
            for old in done[:-args.checkpoints_total_limit] if args.checkpoints_total_limit else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if report_to not in (None, "none") and main_proc:
        accelerator.init_trackers("train", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    say(f"{n_params:,} parameters; {len(data)} images from {data.source}; {max_steps} steps of "
        f"{args.train_batch_size}×{world}×{args.gradient_accumulation_steps} images; objective {args.objective}")

    log_path = output_dir / "train_log.jsonl"  # one line per optimizer step: step, loss, lr
    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if log_path.exists():  # after a resume, drop the steps that are about to be redone
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= state["step"]]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    progress = None
    if main_proc and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=state["step"], desc="train", dynamic_ncols=True)
    unet.train()
    last_ckpt = resume_from
    t_start, imgs_since, t_since = time.time(), 0, time.time()
    base_seconds = state["train_seconds"]
    while state["step"] < max_steps:
        step = state["step"]
        torch.manual_seed(step_generator(args.seed, step, rank).initial_seed())  # dropout etc.
        for micro in range(args.gradient_accumulation_steps):
            gen = step_generator(args.seed, step, rank, micro)
            k = step * args.gradient_accumulation_steps + micro
            idx = batch_indices(len(data), args.train_batch_size, world, rank, args.seed, k).to(images.device)
            x_0 = images[idx]
            if args.random_flip:
                flip = (torch.rand(len(idx), generator=gen) < 0.5).to(images.device)
                x_0 = torch.where(flip.view(-1, 1, 1, 1), x_0.flip(-1), x_0)
            class_labels = None
            if conditional:
                class_labels = labels[idx]
                if null_label is not None:  # label dropout for classifier-free guidance
                    drop = (torch.rand(len(idx), generator=gen) < args.p_uncond).to(images.device)
                    class_labels = torch.where(drop, torch.full_like(class_labels, null_label), class_labels)
            with accelerator.accumulate(unet):
                if args.objective == "ddpm":
                    loss = ddpm_loss(unet, x_0, alphas_cumprod, gen, args.prediction_type, class_labels)
                else:
                    loss = ncsn_loss(unet, x_0, args.sigma_min, args.sigma_max, gen, args.num_sigma_levels or None, class_labels,
                                     args.ncsn_input_scaling, args.sigma_sampling)
                finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
                if not finite:
                    hint = ("fp16 overflow: try --mixed_precision bf16 or no" if args.mixed_precision == "fp16" else
                            f"the learning rate {lr_scheduler.get_last_lr()[0]:.2e} is probably too high: try --learning_rate "
                            f"{args.learning_rate / 10:.1e}, or check the data for NaN pixels")
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingError(f"non-finite loss at step {step + 1} (objective {args.objective}); likely cause: {hint}; "
                                        f"{where}. Fix the setting and run again with --resume_from_checkpoint latest.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        if ema is not None:
            ema.step(unet.parameters())
        state["step"] = step + 1
        loss_value = loss.item()
        state["loss_ema"] = loss_value if math.isnan(state["loss_ema"]) else 0.99 * state["loss_ema"] + 0.01 * loss_value
        state["train_seconds"] = base_seconds + (time.time() - t_start)
        imgs_since += args.train_batch_size * world * args.gradient_accumulation_steps
        if main_proc:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": state["step"], "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}) + "\n")
            if report_to not in (None, "none"):
                accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=state["step"])
            if progress is not None:
                progress.update(1)
                if state["step"] % 10 == 0:
                    rate = imgs_since / max(time.time() - t_since, 1e-9)
                    progress.set_postfix(loss=f"{state['loss_ema']:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.1e}",
                                         img_s=f"{rate:.0f}")
                    imgs_since, t_since = 0, time.time()
            elif state["step"] % 100 == 0 or state["step"] == max_steps:
                rate = imgs_since / max(time.time() - t_since, 1e-9)
                print(f"step {state['step']}/{max_steps} loss {state['loss_ema']:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e} "
                      f"{rate:.0f} img/s", flush=True)
                imgs_since, t_since = 0, time.time()
        if args.checkpointing_steps and state["step"] % args.checkpointing_steps == 0 and state["step"] < max_steps:
            save_training_state()
            last_ckpt = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state['step']}"
            export_model()
        elif args.save_images_steps and state["step"] % args.save_images_steps == 0 and main_proc:
            model = accelerator.unwrap_model(unet)
            save_sample_grid(model, family, sampler_config, output_dir / "samples" / f"step-{state['step']:07d}.png",
                             num_classes, accelerator, ema=ema)
    if progress is not None:
        progress.close()
    save_training_state()
    export_model()
    accelerator.end_training()
    print(f"[rank {rank}] weights sha256 {weights_digest(accelerator.unwrap_model(unet))}", flush=True)
    say(f"done: {state['step']} steps, loss {state['loss_ema']:.4f}, model in {output_dir / 'model'}")
    return 0


def save_sample_grid(model, family, sampler_config, path: Path, num_classes, accelerator, ema=None):
    """Sample a 4×4 grid with the project's own pipeline (DDIM, 25 steps) and save it as PNG."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    was_training = model.training
    model.eval()
    try:
        from pipelines.sampling import SamplerPipeline, make_grid

        pipe = SamplerPipeline(model, family, sampler_config)
        labels = [i % num_classes for i in range(16)] if num_classes else None
        out = pipe(scheduler="ddim", num_inference_steps=25, batch_size=16, seed=0, class_labels=labels,
                   guidance_scale=3.0 if family.null_class_label is not None else 1.0, output_type="np")
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(out.images, nrow=4)
        grid.save(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("samples", np.asarray(grid), int(path.stem.split("-")[-1]), dataformats="HWC"
                                         if np.asarray(grid).ndim == 3 else "HW")
    except Exception as err:  # a failed preview must never stop training
        print(f"warning: sample grid failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    finally:
        if was_training:
            model.train()
        if ema is not None:
            ema.restore(model.parameters())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
