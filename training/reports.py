"""What a training run leaves for people: the model card and the sample grids."""

from __future__ import annotations

import sys
from pathlib import Path


def build_model_card(args, family, data, n_params, state, command, decoder=None, latent_shape=None) -> str:
    """README.md of an exported model: objective, size, data, steps, time, loss and the exact command.

    For a latent model (``decoder``, the ``LatentDecoder``; ``latent_shape``, (C, h, w)) the card also
    names the backbone, the latent shape and the decoder with its scaling factor."""
    hours = state["train_seconds"] / 3600
    if family.kind == "vp":
        kind = f"DDPM (VP, {args.prediction_type}-prediction)"
        if decoder is not None:
            backbone = "DiT" if getattr(args, "backbone", "unet") == "dit" else "UNet"
            kind = f"latent {backbone}, {kind}"
    else:
        kind = "NCSN (VE score network)"
    if decoder is not None and latent_shape is not None:
        c, h, w = latent_shape
        resolution = (f"latents {c}×{h}×{w} of {args.resolution}×{args.resolution} images; decoder "
                      f"{type(decoder.model).__name__} (`vae/`), {decoder.note}")
    else:
        resolution = f"{args.resolution}×{args.resolution}×{data.images.shape[1]}"
    lines = [
        "---", "library_name: diffusers", "tags: [diffusion, mnist, sampler-lab]", "---", "",
        f"# {Path(args.output_dir).name}: {kind}",
        "", f"Trained with this project's `training/train.py` on {data.source}.", "",
        "| | |", "|---|---|",
        f"| objective | {args.objective} |",
        f"| parameters | {n_params:,} |",
        f"| resolution | {resolution} |",
        f"| conditioning | {'class-conditional, ' + str(data.num_classes) + ' classes, label dropout p=' + str(args.p_uncond) if family.is_conditional else 'unconditional'} |",
        f"| optimizer steps | {state['step']:,} (batch {args.train_batch_size} × {state['num_processes']} processes × {args.gradient_accumulation_steps} accumulation) |",
        f"| training time | {hours:.2f} h of wall time ({state['device']}) |",
        f"| final loss (running mean of the last 100 steps) | {state['loss_ema']:.4f} |",
        f"| weights SHA-256 (first 16 hex digits, `pipelines.checkpoint.weights_digest`) | `{state.get('weights_sha256', '')}` |",
        "", "## Command", "", "```bash", command, "```", "",
        "The resolved arguments are in `training_args.json`.", "",
    ]
    return "\n".join(lines)


def save_sample_grid(model, family, sampler_config, path: Path, num_classes, accelerator, ema=None, decoder=None):
    """Sample a 4×4 grid with the project's own pipeline (DDIM, 25 steps) and save it as PNG."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    was_training = model.training
    model.eval()
    try:
        from pipelines.sampling import SamplerPipeline, make_grid

        pipe = SamplerPipeline(model, family, sampler_config, decoder=decoder)
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
