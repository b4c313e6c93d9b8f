"""Checkpoint folders in diffusers format: find, inspect, load and save them.

A checkpoint is a folder with ``model_index.json``, a denoiser (``unet/`` with a ``UNet2DModel``,
or ``transformer/`` with a DiT ``DiTTransformer2DModel``/``Transformer2DModel``: ``config.json`` and
safetensors weights) and ``scheduler/scheduler_config.json``; a **latent** checkpoint also has a
decoder (``vae/`` ``AutoencoderKL`` or ``vqvae/`` ``VQModel``, see :mod:`pipelines.latent`). The
families are recognised from the configs alone, so published checkpoints load without extra flags:

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

from .latent import DECODER_FOLDERS, DecoderInfo, inspect_decoder

LAB_KEY = "_sampler_lab"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.ckpt")
HUB_PATTERNS = ["model_index.json", "README.md", "training_args.json", "unet/config.json", f"unet/{WEIGHTS_NAME}",
                "transformer/config.json", f"transformer/{WEIGHTS_NAME}", "vae/config.json", f"vae/{WEIGHTS_NAME}",
                "vqvae/config.json", f"vqvae/{WEIGHTS_NAME}",
                "scheduler/scheduler_config.json", "config.json", WEIGHTS_NAME, "scheduler_config.json"]
DENOISER_FOLDERS = ("unet", "transformer")
DENOISER_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
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
        sample_size, in_channels: resolution and channels the denoiser takes (latents for a latent checkpoint).
        unet_config: the raw config of the denoiser (``unet/`` or ``transformer/``).
        training_args: ``training_args.json`` if the checkpoint was made by ``training/train.py``.
        notes: every option of the published scheduler config that this lab does not apply as saved,
            each with what it does instead and how to match it (:func:`scheduler_notes`); the app shows
            them with the checkpoint.
        unet_path: the denoiser's folder.
        denoiser_class: ``UNet2DModel`` or ``DiTTransformer2DModel``.
        decoder: the decoder of a latent checkpoint, else None.
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
    unet_path: Optional[Path] = None  # the folder with the denoiser's config.json and weights
    denoiser_class: str = "UNet2DModel"
    decoder: Optional[DecoderInfo] = None
    notes: list = field(default_factory=list)  # published scheduler options this lab does not apply, and why

    @property
    def is_latent(self) -> bool:
        return self.decoder is not None

    @property
    def image_shape(self) -> tuple:
        """(channels, height, width) of the images the checkpoint makes (decoded, for a latent one)."""
        if self.decoder is None:
            return (self.in_channels, self.sample_size, self.sample_size)
        side = self.sample_size * self.decoder.downsampling
        return (self.decoder.image_channels, side, side)

    def describe(self) -> str:
        """One line for people: family, prediction type, resolution, conditioning."""
        f = self.family
        kind = ("VP (DDPM), " + f.prediction_type + "-prediction") if f.kind == "vp" else (
            f"VE (NCSN score network, σ ∈ [{f.sigma_min:g}, {f.sigma_max:g}])")
        cond = "unconditional"
        if f.is_conditional:
            cond = f"class-conditional ({f.num_classes} classes"
            cond += ", classifier-free guidance)" if f.null_class_label is not None else ", no guidance)"
        shape = f"{self.sample_size}×{self.sample_size}×{self.in_channels}"
        if self.decoder is not None:
            c, h, w = self.image_shape
            backbone = "DiT" if "Transformer" in self.denoiser_class else "UNet"
            return (f"latent {kind}, {backbone} on {shape} latents → {self.decoder.class_name} → {h}×{w}×{c} images "
                    f"({self.decoder.scaling_note}); {cond}")
        return f"{kind}; {shape}; {cond}"


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


def class_embeddings(unet_config: dict, lab: dict) -> tuple[Optional[int], Optional[int]]:
    """(num_class_embeds, null_class_label) of a denoiser config.

    A ``UNet2DModel`` states ``num_class_embeds``; the null label of guidance is recorded by this
    project. A DiT embeds ``num_embeds_ada_norm`` classes plus one more, the "no class" label
    ``num_embeds_ada_norm`` that classifier-free guidance uses (Peebles & Xie 2023).
    """
    if unet_config.get("norm_type") == "ada_norm_zero" or "DiT" in unet_config.get("_class_name", ""):
        n = unet_config.get("num_embeds_ada_norm")
        return (None, None) if n is None else (int(n) + 1, int(lab.get("null_class_label", n)))
    return unet_config.get("num_class_embeds"), lab.get("null_class_label")


def family_from_configs(scheduler_config: dict, unet_config: dict, latent: bool = False) -> tuple[ModelFamily, dict]:
    """Decide the family and the samplers' DDPM-style schedule from the two configs."""
    lab = scheduler_config.get(LAB_KEY, {}) or {}
    cls = scheduler_config.get("_class_name", "DDPMScheduler")
    if "timesteps" in scheduler_config and "num_train_timesteps" not in scheduler_config:  # old diffusers key (LDM)
        scheduler_config = {**scheduler_config, "num_train_timesteps": scheduler_config["timesteps"]}
    num_class_embeds, null_class_label = class_embeddings(unet_config, lab)
    if cls == "ScoreSdeVeScheduler" or lab.get("family") == "ve":
        if latent:
            raise CheckpointError("a latent checkpoint with a VE (ScoreSdeVeScheduler) denoiser is not supported")
        if unet_config.get("time_embedding_type", "positional") != "fourier":
            raise CheckpointError("a VE (ScoreSdeVeScheduler) checkpoint needs a UNet with Fourier time embedding fed σ")
        data_range = tuple(lab.get("data_range", (0.0, 1.0)))  # diffusers' NCSN++ checkpoints use [0, 1]
        family = ModelFamily(
            kind="ve", prediction_type=lab.get("prediction_type", "score"), data_range=data_range,
            sigma_min=float(scheduler_config.get("sigma_min", 0.01)), sigma_max=float(scheduler_config.get("sigma_max", 1348.0)),
            input_scaling=lab.get("input_scaling", "none"),
            num_class_embeds=num_class_embeds, null_class_label=null_class_label,
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
                         num_class_embeds=num_class_embeds, null_class_label=null_class_label, latent=latent)
    sampler_config = {k: scheduler_config.get(k) for k in DDPM_SCHEDULE_KEYS if k in scheduler_config}
    sampler_config.setdefault("num_train_timesteps", 1000)
    return family, sampler_config


# Options of a scheduler config that decide the trained schedule itself: always applied.
VP_APPLIED = frozenset(DDPM_SCHEDULE_KEYS) | {"prediction_type", "timesteps"}
# diffusers' defaults of options that change sampling: a config that states these values changes nothing here.
VP_DIFFUSERS_DEFAULTS = {"clip_sample_range": 1.0, "sample_max_value": 1.0, "thresholding": False,
                         "dynamic_thresholding_ratio": 0.995, "steps_offset": 0, "rescale_betas_zero_snr": False,
                         "set_alpha_to_one": True, "variance_type": "fixed_small"}
VE_APPLIED = frozenset({"sigma_min", "sigma_max", "num_train_timesteps"})  # a continuous-time network: T is not its schedule


def _fmt(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, str)) or value is None else f"{value:g}" if isinstance(
        value, float) else str(value)


def scheduler_notes(scheduler_config: dict, family: ModelFamily) -> list[str]:
    """What this lab does with each option of a checkpoint's scheduler config that it does not apply as saved.

    Every sampler here is configured from the trained schedule alone (β's and T for VP, σ_min/σ_max for VE)
    plus its own registry parameters, so options that belong to one diffusers sampler (``clip_sample``,
    ``timestep_spacing``, ``steps_offset``, ``variance_type``, ``snr``, ``correct_steps``, ``sampling_eps``…)
    are either equal to what the lab does (no note) or named here with what happens instead and how
    to match them. Nothing is dropped without a note.
    """
    from schedulers.registry import SAMPLERS  # the samplers' own defaults (registry is read, never changed)

    notes = []
    cls = scheduler_config.get("_class_name", "DDPMScheduler")
    for key, value in scheduler_config.items():
        if key.startswith("_"):
            continue
        shown = f"{key} = {_fmt(value)}"
        if family.kind == "ve":
            if key in VE_APPLIED:
                continue
            if key in ("snr", "correct_steps"):
                pc = SAMPLERS["pc"].defaults()
                ours = pc["snr"] if key == "snr" else pc["corrector_steps"]
                if value is None or float(value) == float(ours):
                    continue
                param = "snr" if key == "snr" else "corrector_steps"
                notes.append(f"{shown} (diffusers' ScoreSdeVePipeline): not a default here; the `pc` sampler uses "
                             f"{param} = {_fmt(ours)}: set {param}={_fmt(value)} on `pc` to sample as published")
            elif key == "sampling_eps":
                # diffusers' VE-SDE ends at σ(t_ε) = σ_min (σ_max/σ_min)^t_ε; every sampler here ends at σ_min
                end = family.sigma_min * (family.sigma_max / family.sigma_min) ** float(value or 0.0)
                if end <= 1.01 * family.sigma_min:
                    continue
                notes.append(f"{shown}: diffusers' VE sampler stops at σ = {end:.3g}; the samplers here go down to "
                             f"σ_min = {family.sigma_min:g} (set sigma_min on `langevin`, sampling_eps on the SDE "
                             "samplers to stop earlier)")
            else:
                notes.append(f"{shown}: an option of diffusers' {cls}; not used by this lab's samplers")
            continue
        if key in VP_APPLIED:
            continue
        if key == "clip_sample":
            if bool(value) == family.clip_denoised:
                continue
            notes.append(f"{shown}: the samplers here {'clip' if family.clip_denoised else 'never clip'} x̂₀ "
                         f"by default ({'pixels in [-1, 1]' if family.clip_denoised else 'latents'}); "
                         f"set clip_sample={value} (thresholding for dpmsolver++) on a sampler to match")
        elif key in VP_DIFFUSERS_DEFAULTS:
            if value == VP_DIFFUSERS_DEFAULTS[key] or (key == "variance_type" and value is None):
                continue
            what = {"variance_type": "the `ddpm` sampler uses fixed_small (σ_t² = β̃_t)"
                                     + ("; the network's variance channels are dropped" if "learned" in str(value) else ""),
                    "steps_offset": "no sampler here offsets its timesteps",
                    "set_alpha_to_one": "DDIM's last step here goes to ᾱ = 1 (a clean image)",
                    "rescale_betas_zero_snr": "the betas are used as saved, without zero-terminal-SNR rescaling: "
                                              "samples may differ from the authors'",
                    }.get(key, "it serves diffusers' own DDPM/DDIM step (which keeps the unclipped ε̂); the samplers "
                               "here clip x̂₀ to [-1, 1] and re-derive ε̂ (each sampler's clip_sample/thresholding)")
            notes.append(f"{shown}: not applied; {what}")
        elif key == "timestep_spacing":
            notes.append(f"{shown}: not applied; each sampler places its own steps (DDIM: leading, DDPM: linspace, "
                         "the others: their time_grid parameter)")
        else:
            notes.append(f"{shown}: an option of diffusers' {cls}; not used by this lab's samplers")
    return notes


def _denoiser_folder(path: Path, index: dict, source: str) -> Path:
    """The folder of the denoiser: the component ``model_index.json`` names, else ``unet/`` or ``transformer/``."""
    named = [name for name in DENOISER_FOLDERS if name in index]
    for name in named + [n for n in DENOISER_FOLDERS if n not in named]:
        if (path / name / "config.json").exists():
            return path / name
    if (path / "config.json").exists() and (path / WEIGHTS_NAME).exists():
        return path  # flat layout: a UNet saved at the top level
    if not index and not any((path / n).exists() for n in DENOISER_FOLDERS):
        raise CheckpointError(f"checkpoint: {source} is not a diffusers checkpoint (no model_index.json and no unet/ folder)")
    raise CheckpointError(f"checkpoint: {source} has no denoiser (expected unet/config.json or transformer/config.json)")


def _check_weights(folder: Path, source: str, what: str) -> None:
    rel = folder.name
    if not (folder / WEIGHTS_NAME).exists():
        if any((folder / name).exists() for name in PICKLE_NAMES):
            raise CheckpointError(f"checkpoint: {source} stores its {what} as a pickle (.bin/.ckpt), which can run code when "
                                  f"loaded; only safetensors weights are accepted ({rel}/{WEIGHTS_NAME})")
        raise CheckpointError(f"checkpoint: {source} has no {what} weights (expected {rel}/{WEIGHTS_NAME})")


def _decoder(path: Path, index: dict, source: str) -> Optional[DecoderInfo]:
    """The decoder a latent checkpoint names (or has); None for a pixel-space checkpoint."""
    for name, class_name in DECODER_FOLDERS.items():
        named = name in index
        if not named and not (path / name / "config.json").exists():
            continue
        folder = path / name
        if not (folder / "config.json").exists():
            raise CheckpointError(f"checkpoint: {source}/model_index.json names a decoder '{name}' ({index[name]}) but "
                                  f"{name}/config.json is missing; a latent checkpoint cannot be sampled without its decoder")
        _check_weights(folder, source, f"decoder ({name}/)")
        config = _read_json(folder / "config.json")
        class_name = config.get("_class_name", class_name)
        if class_name not in DECODER_FOLDERS.values():
            raise CheckpointError(f"checkpoint: the decoder {name}/ is a {class_name}; supported: AutoencoderKL, VQModel")
        return inspect_decoder(folder, class_name)
    return None


def inspect_checkpoint(source: str, allow_hub: bool = True, allowed_roots: Optional[list] = None) -> CheckpointInfo:
    """Read a checkpoint's configs and check its files, without loading weights.

    Raises:
        CheckpointError: for a missing folder, a folder that is not a checkpoint, pickle weights,
            a latent checkpoint without a matching decoder, or a model this project cannot sample.
    """
    path = resolve_checkpoint(source, allow_hub=allow_hub, allowed_roots=allowed_roots)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {source} is a file, not a checkpoint folder")
    index = _read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    unet_dir = _denoiser_folder(path, index, source)
    sched_file = path / "scheduler" / "scheduler_config.json" if unet_dir != path else path / "scheduler_config.json"
    _check_weights(unet_dir, source, "denoiser" if unet_dir != path else "UNet")
    unet_config = _read_json(unet_dir / "config.json")
    denoiser_class = unet_config.get("_class_name", "UNet2DModel")
    if denoiser_class not in DENOISER_CLASSES:
        raise CheckpointError(f"checkpoint: the denoiser is a {denoiser_class}; this lab samples "
                              f"{', '.join(DENOISER_CLASSES)} models (text-conditioned models are not supported)")
    if denoiser_class == "Transformer2DModel":
        if unet_config.get("norm_type") != "ada_norm_zero":
            raise CheckpointError("checkpoint: only class-conditional DiT transformers (norm_type 'ada_norm_zero') are "
                                  f"supported, this Transformer2DModel has norm_type {unet_config.get('norm_type')!r}")
        denoiser_class = "DiTTransformer2DModel"  # diffusers maps DiT configs to this class
    decoder = _decoder(path, index, source)
    in_channels = int(unet_config.get("in_channels", 3))
    sample_size = unet_config.get("sample_size", 32)
    sample_size = int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
    if decoder is not None and decoder.latent_channels != in_channels:
        raise CheckpointError(f"checkpoint: the decoder {decoder.folder.name}/config.json makes images from "
                              f"{decoder.latent_channels}-channel latents, but the denoiser {unet_dir.name}/config.json "
                              f"takes {in_channels} channels ({sample_size}×{sample_size}×{in_channels})")
    scheduler_config = _read_json(sched_file) if sched_file.exists() else {"_class_name": "DDPMScheduler"}
    family, sampler_config = family_from_configs(scheduler_config, unet_config, latent=decoder is not None)
    args_file = path / "training_args.json"
    return CheckpointInfo(
        path=path, source=str(source), family=family, sampler_config=sampler_config, sample_size=sample_size,
        in_channels=in_channels, unet_config=unet_config,
        scheduler_class=scheduler_config.get("_class_name", "DDPMScheduler"),
        training_args=_read_json(args_file) if args_file.exists() else {}, unet_path=unet_dir,
        denoiser_class=denoiser_class, decoder=decoder, notes=scheduler_notes(scheduler_config, family),
    )


def load_unet(info: CheckpointInfo, device="cpu", dtype=None):
    """Load the checkpoint's denoiser (``UNet2DModel`` or DiT; safetensors only) in eval mode."""
    import torch
    import diffusers

    cls = getattr(diffusers, info.denoiser_class)
    try:
        unet = cls.from_pretrained(info.unet_path or info.path / "unet", use_safetensors=True,
                                   torch_dtype=dtype or torch.float32)
    except Exception as err:
        raise CheckpointError(f"checkpoint: could not load the denoiser of {info.source}: {err}") from err
    unet = unet.to(device=torch.device(device))
    unet.eval().requires_grad_(False)
    return unet


def load_decoder(info: CheckpointInfo, device="cpu", dtype=None):
    """The checkpoint's :class:`~pipelines.latent.LatentDecoder`, or None for a pixel-space checkpoint."""
    if info.decoder is None:
        return None
    from .latent import load_decoder as _load

    try:
        return _load(info.decoder, device=device, dtype=dtype)
    except Exception as err:  # e.g. a VQ codebook whose size does not match its config
        raise CheckpointError(f"checkpoint: could not load the decoder {info.decoder.folder.name}/ of {info.source}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def scheduler_config_for(family: ModelFamily, sampler_config: dict, extra: Optional[dict] = None) -> dict:
    """The ``scheduler/scheduler_config.json`` this project writes for a model of ``family``."""
    lab = {"family": family.kind, "prediction_type": family.prediction_type, "data_range": list(family.data_range),
           "input_scaling": family.input_scaling,
           "null_class_label": family.null_class_label, **(extra or {})}
    if family.kind == "ve":
        return {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 1000, "sigma_min": family.sigma_min,
                "sigma_max": family.sigma_max, "snr": 0.16, "sampling_eps": 1e-5, "correct_steps": 1, LAB_KEY: lab}
    schedule = {k: sampler_config[k] for k in DDPM_SCHEDULE_KEYS if sampler_config.get(k) is not None}
    # clip_sample: diffusers' DDPM/DDIM clip x̂₀ to [-1, 1], right for pixels, wrong for latents
    return {"_class_name": "DDPMScheduler", **schedule, "prediction_type": family.prediction_type,
            "clip_sample": family.clip_denoised, "variance_type": "fixed_small", LAB_KEY: lab}


def save_checkpoint(folder, unet, family: ModelFamily, sampler_config: dict, training_args: Optional[dict] = None,
                    model_card: Optional[str] = None, lab_extra: Optional[dict] = None, decoder=None) -> Path:
    """Write a checkpoint folder atomically (written beside the target, then renamed into place).

    Args:
        folder: destination; an existing checkpoint there is replaced only once the new one is complete.
        unet: the ``UNet2DModel`` (saved as safetensors).
        family: how it was trained.
        sampler_config: the DDPM schedule keys (VP) — ignored for VE, whose σ range is in ``family``.
        training_args: resolved training arguments, written to ``training_args.json``.
        model_card: README.md text.
        decoder: a latent checkpoint's :class:`~pipelines.latent.LatentDecoder`, saved as ``vae/`` (or
            ``vqvae/``) with its scaling factor in the config.
    """
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        denoiser_class = type(unet).__name__
        denoiser_folder = "transformer" if "Transformer" in denoiser_class else "unet"
        unet.save_pretrained(tmp / denoiser_folder, safe_serialization=True)
        sched = scheduler_config_for(family, sampler_config, lab_extra)
        sched["_diffusers_version"] = diffusers.__version__
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        pipeline_class = "ScoreSdeVePipeline" if family.kind == "ve" else "DDPMPipeline"
        index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", sched["_class_name"]], denoiser_folder: ["diffusers", denoiser_class]}
        if decoder is not None:
            decoder_class = type(decoder.model).__name__
            decoder_folder = "vqvae" if decoder_class == "VQModel" else "vae"
            decoder.model.register_to_config(scaling_factor=decoder.scaling_factor)
            decoder.model.save_pretrained(tmp / decoder_folder, safe_serialization=True)
            index[decoder_folder] = ["diffusers", decoder_class]
            index["_class_name"] = "DiTPipeline" if denoiser_folder == "transformer" else "LDMPipeline"
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
