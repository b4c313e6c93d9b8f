"""Checkpoint folders in diffusers format: find, inspect, load and save them.

A checkpoint is a folder with ``model_index.json``, ``unet/`` (``config.json`` and safetensors
weights) and ``scheduler/scheduler_config.json``. Two families are recognised from the scheduler
config alone, so published checkpoints load without extra flags:

- VP (DDPM): any scheduler config with the DDPM keys (``DDPMScheduler``, ``DDIMScheduler``, …):
  the network is fed the timestep label; ``prediction_type`` says what it outputs.
- VE (SMLD/NCSN): ``ScoreSdeVeScheduler``: the network is fed σ and outputs the score
  (diffusers' NCSN++ checkpoints, pixels in [0, 1]; this project's NCSN models, pixels in [-1, 1]).

This project writes a private ``_sampler_lab`` entry into the scheduler config (diffusers ignores
keys that start with ``_``) recording the family, pixel range and the null label for guidance.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from schedulers.parametrization import ModelFamily
from schedulers.schedules import SUPPORTED_BETA_SCHEDULES, linear_betas_for_sigma_range

LAB_KEY = "_sampler_lab"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.ckpt")
HUB_PATTERNS = ["model_index.json", "README.md", "training_args.json", "unet/config.json", f"unet/{WEIGHTS_NAME}",
                "scheduler/scheduler_config.json", "config.json", WEIGHTS_NAME, "scheduler_config.json"]
DDPM_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


class CheckpointError(ValueError):
    """A folder or repo id that is not a usable checkpoint; the message says why and what to do."""


@dataclass
class CheckpointInfo:
    """What a checkpoint is, read from its folder without loading weights.

    Attributes:
        path: the local folder.
        source: the path or repo id the user gave.
        family: how the network was trained (see :class:`~schedulers.parametrization.ModelFamily`).
        sampler_config: the DDPM-style schedule (``num_train_timesteps``, ``beta_*``) every sampler
            is configured from; for a VE network it spans the network's σ range.
        sample_size, in_channels: image resolution and channels the network takes.
        unet_config: the raw ``unet/config.json``.
        training_args: ``training_args.json`` if the checkpoint was made by ``training/train.py``.
    """

    path: Path
    source: str
    family: ModelFamily
    sampler_config: dict
    sample_size: int
    in_channels: int
    unet_config: dict
    scheduler_class: str
    training_args: dict = field(default_factory=dict)
    unet_path: Optional[Path] = None  # the folder with the UNet's config.json and weights

    def describe(self) -> str:
        """One line for people: family, prediction type, resolution, conditioning."""
        f = self.family
        kind = ("VP (DDPM), " + f.prediction_type + "-prediction") if f.kind == "vp" else (
            f"VE (NCSN score network, σ ∈ [{f.sigma_min:g}, {f.sigma_max:g}])")
        cond = "unconditional"
        if f.is_conditional:
            cond = f"class-conditional ({f.num_classes} classes"
            cond += ", classifier-free guidance)" if f.null_class_label is not None else ", no guidance)"
        return f"{kind}; {self.sample_size}×{self.sample_size}×{self.in_channels}; {cond}"


def _read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def looks_like_repo_id(source: str) -> bool:
    """True for 'owner/name' strings that could be Hub repo ids."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.startswith((".", "/"))


def resolve_checkpoint(source: str, allow_hub: bool = True, allowed_roots: Optional[list] = None) -> Path:
    """Turn a local path or a Hub repo id into a local checkpoint folder.

    Args:
        source: a folder, or ``owner/name`` on the Hugging Face Hub (needs network).
        allow_hub: whether a repo id may be downloaded.
        allowed_roots: if given, local folders must lie below one of these (public deployments).

    Raises:
        CheckpointError: with a message that says what is wrong.
    """
    source = str(source).strip()
    if not source:
        raise CheckpointError("checkpoint: no path or repo id given")
    path = Path(os.path.expanduser(source))
    if path.exists():
        path = path.resolve()
        if allowed_roots is not None and not any(path.is_relative_to(Path(r).resolve()) for r in allowed_roots):
            raise CheckpointError(f"checkpoint: local folders outside the app's own checkpoints are not allowed here ({source})")
        return path
    if not (allow_hub and looks_like_repo_id(source)):
        raise CheckpointError(f"checkpoint: {source!r} is not an existing folder"
                              + ("" if allow_hub else " (Hub downloads are disabled)"))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated repo, …
        raise CheckpointError(f"checkpoint: {source!r} is not a local folder and could not be downloaded from the "
                              f"Hugging Face Hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def ve_sampler_config(family: ModelFamily, num_train_timesteps: int = 1000) -> dict:
    """The linear DDPM schedule whose σ_t spans a VE network's σ range (in [-1, 1] pixels).

    Every sampler sees the VE network through it (docs/schedules.md#a-vp-schedule-for-a-ve-network): label t stands for σ_t.
    """
    c = (family.data_range[1] - family.data_range[0]) / 2.0  # σ in the samplers' [-1, 1] pixels is σ_net / c
    beta_start, beta_end = linear_betas_for_sigma_range(family.sigma_min / c, family.sigma_max / c, num_train_timesteps)
    return {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
            "beta_schedule": "linear"}


def family_from_configs(scheduler_config: dict, unet_config: dict) -> tuple[ModelFamily, dict]:
    """Decide the family and the samplers' DDPM-style schedule from the two configs."""
    lab = scheduler_config.get(LAB_KEY, {}) or {}
    cls = scheduler_config.get("_class_name", "DDPMScheduler")
    num_class_embeds = unet_config.get("num_class_embeds")
    if cls == "ScoreSdeVeScheduler" or lab.get("family") == "ve":
        if unet_config.get("time_embedding_type", "positional") != "fourier":
            raise CheckpointError("a VE (ScoreSdeVeScheduler) checkpoint needs a UNet with Fourier time embedding fed σ")
        data_range = tuple(lab.get("data_range", (0.0, 1.0)))  # diffusers' NCSN++ checkpoints use [0, 1]
        family = ModelFamily(
            kind="ve", prediction_type=lab.get("prediction_type", "score"), data_range=data_range,
            sigma_min=float(scheduler_config.get("sigma_min", 0.01)), sigma_max=float(scheduler_config.get("sigma_max", 1348.0)),
            input_scaling=lab.get("input_scaling", "none"),
            num_class_embeds=num_class_embeds, null_class_label=lab.get("null_class_label"),
        )
        return family, ve_sampler_config(family)
    if "beta_start" not in scheduler_config and "trained_betas" not in scheduler_config and "beta_schedule" not in scheduler_config:
        raise CheckpointError(f"scheduler config of class {cls} has no DDPM schedule (beta_start/beta_end/beta_schedule)")
    if unet_config.get("time_embedding_type", "positional") == "fourier":
        raise CheckpointError("a UNet with Fourier time embedding is a σ-conditioned (VE) network, but its scheduler "
                              f"config is {cls}; save it with a ScoreSdeVeScheduler config")
    schedule = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is None and schedule not in SUPPORTED_BETA_SCHEDULES:
        raise CheckpointError(f"beta_schedule {schedule!r} is not supported (supported: {', '.join(SUPPORTED_BETA_SCHEDULES)})")
    family = ModelFamily(kind="vp", prediction_type=scheduler_config.get("prediction_type", "epsilon"),
                         num_class_embeds=num_class_embeds, null_class_label=lab.get("null_class_label"))
    sampler_config = {k: scheduler_config.get(k) for k in DDPM_SCHEDULE_KEYS if k in scheduler_config}
    sampler_config.setdefault("num_train_timesteps", 1000)
    return family, sampler_config


def inspect_checkpoint(source: str, allow_hub: bool = True, allowed_roots: Optional[list] = None) -> CheckpointInfo:
    """Read a checkpoint's configs and check its files, without loading weights.

    Raises:
        CheckpointError: for a missing folder, a folder that is not a checkpoint, pickle weights,
            or a model this project cannot sample.
    """
    path = resolve_checkpoint(source, allow_hub=allow_hub, allowed_roots=allowed_roots)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {source} is a file, not a checkpoint folder")
    unet_dir = path / "unet"
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not unet_dir.exists() and (path / "config.json").exists() and (path / WEIGHTS_NAME).exists():
        unet_dir, sched_file = path, path / "scheduler_config.json"  # flat layout: a UNet saved at the top level
    if not (path / "model_index.json").exists() and not (unet_dir / "config.json").exists():
        raise CheckpointError(f"checkpoint: {source} is not a diffusers checkpoint (no model_index.json and no unet/ folder)")
    if not (unet_dir / "config.json").exists():
        raise CheckpointError(f"checkpoint: {source} has no UNet (expected unet/config.json)")
    if not (unet_dir / WEIGHTS_NAME).exists():
        if any((unet_dir / name).exists() for name in PICKLE_NAMES):
            raise CheckpointError(f"checkpoint: {source} stores its UNet as a pickle (.bin/.ckpt), which can run code when "
                                  f"loaded; only safetensors weights are accepted (unet/{WEIGHTS_NAME})")
        raise CheckpointError(f"checkpoint: {source} has no UNet weights (expected unet/{WEIGHTS_NAME})")
    unet_config = _read_json(unet_dir / "config.json")
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"checkpoint: the UNet is a {unet_config.get('_class_name')}; this lab samples UNet2DModel "
                              "pixel-space models (latent or text-conditioned models are not supported)")
    scheduler_config = _read_json(sched_file) if sched_file.exists() else {"_class_name": "DDPMScheduler"}
    family, sampler_config = family_from_configs(scheduler_config, unet_config)
    args_file = path / "training_args.json"
    sample_size = unet_config.get("sample_size", 32)
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return CheckpointInfo(
        path=path, source=str(source), family=family, sampler_config=sampler_config, sample_size=int(sample_size),
        in_channels=int(unet_config.get("in_channels", 3)), unet_config=unet_config,
        scheduler_class=scheduler_config.get("_class_name", "DDPMScheduler"),
        training_args=_read_json(args_file) if args_file.exists() else {}, unet_path=unet_dir,
    )


def load_unet(info: CheckpointInfo, device="cpu", dtype=None):
    """Load the checkpoint's ``UNet2DModel`` (safetensors only) in eval mode."""
    import torch
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(info.unet_path or info.path / "unet", use_safetensors=True,
                                           torch_dtype=dtype or torch.float32)
    except Exception as err:
        raise CheckpointError(f"checkpoint: could not load the UNet of {info.source}: {err}") from err
    unet = unet.to(device=torch.device(device))
    unet.eval().requires_grad_(False)
    return unet


def scheduler_config_for(family: ModelFamily, sampler_config: dict, extra: Optional[dict] = None) -> dict:
    """The ``scheduler/scheduler_config.json`` this project writes for a model of ``family``."""
    lab = {"family": family.kind, "prediction_type": family.prediction_type, "data_range": list(family.data_range),
           "input_scaling": family.input_scaling,
           "null_class_label": family.null_class_label, **(extra or {})}
    if family.kind == "ve":
        return {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 1000, "sigma_min": family.sigma_min,
                "sigma_max": family.sigma_max, "snr": 0.16, "sampling_eps": 1e-5, "correct_steps": 1, LAB_KEY: lab}
    schedule = {k: sampler_config[k] for k in DDPM_SCHEDULE_KEYS if sampler_config.get(k) is not None}
    return {"_class_name": "DDPMScheduler", **schedule,
            "prediction_type": family.prediction_type, "clip_sample": True, "variance_type": "fixed_small", LAB_KEY: lab}


def save_checkpoint(folder, unet, family: ModelFamily, sampler_config: dict, training_args: Optional[dict] = None,
                    model_card: Optional[str] = None, lab_extra: Optional[dict] = None) -> Path:
    """Write a checkpoint folder atomically (written beside the target, then renamed into place).

    Args:
        folder: destination; an existing checkpoint there is replaced only once the new one is complete.
        unet: the ``UNet2DModel`` (saved as safetensors).
        family: how it was trained.
        sampler_config: the DDPM schedule keys (VP) — ignored for VE, whose σ range is in ``family``.
        training_args: resolved training arguments, written to ``training_args.json``.
        model_card: README.md text.
    """
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        sched = scheduler_config_for(family, sampler_config, lab_extra)
        sched["_diffusers_version"] = diffusers.__version__
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        pipeline_class = "ScoreSdeVePipeline" if family.kind == "ve" else "DDPMPipeline"
        index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", sched["_class_name"]], "unet": ["diffusers", "UNet2DModel"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if training_args is not None:
            (tmp / "training_args.json").write_text(json.dumps(training_args, indent=2, default=str) + "\n")
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def weights_digest(module: torch.nn.Module) -> str:
    """The first 16 hex digits of the SHA-256 of a network's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
