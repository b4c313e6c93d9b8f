"""Reproduce a result outside the app: a one-line settings string the app takes back, a short
snippet that runs the same scheduler loop on the checkpoint, and per-sampler presets.

The snippet spells out what the pipeline does (``pipelines/sampling.py``): the scheduler class and
its resolved config, the seeded initial draw, and diffusers' loop. The network is seen through
``EpsilonNetwork`` (the one place that knows whether it is a DDPM or an NCSN network, and applies
guidance), so the snippet gives the same images as the app for every checkpoint and sampler.
"""

from __future__ import annotations

import json
from typing import Optional

from schedulers.registry import SAMPLERS, create_scheduler, get_spec, steps_for_nfe

from .errors import UserError
from .models import CACHE, checkpoint_path, choice_for
from .requests import Request, digit_text

SETTINGS_KEYS = ("checkpoint", "sampler", "steps", "params", "seed", "batch_size", "digit", "guidance_scale")


def settings_string(req: Request) -> str:
    """One line of JSON with everything that decides the result; paste it back into the app to rerun it."""
    params = {k: v for k, v in req.params.items() if v is not None}
    settings = {"checkpoint": checkpoint_path(req.checkpoint), "sampler": req.sampler, "steps": req.steps, "params": params,
                "seed": req.seed, "batch_size": req.batch_size, "digit": digit_text(req.class_label),
                "guidance_scale": req.guidance_scale}
    return json.dumps(settings, ensure_ascii=False)


def parse_settings(text: str) -> dict:
    """A settings string → the values of the app's controls (``checkpoint`` as its dropdown label).

    Raises:
        UserError: text that is not such a string (the request itself is validated when it runs).
    """
    try:
        settings = json.loads(text or "")
    except json.JSONDecodeError as err:
        raise UserError(f"settings: not a settings string (JSON from a result's 'Reproduce' box): {err}") from None
    if not isinstance(settings, dict):
        raise UserError("settings: expected a JSON object such as {\"sampler\": \"ddim\", \"steps\": 50, …}")
    unknown = set(settings) - set(SETTINGS_KEYS)
    if unknown:
        raise UserError(f"settings: unknown keys {sorted(unknown)}; known: {', '.join(SETTINGS_KEYS)}")
    if settings.get("sampler", "ddim") not in SAMPLERS:
        raise UserError(f"settings: unknown sampler {settings.get('sampler')!r}")
    params = settings.get("params") or {}
    if not isinstance(params, dict):
        raise UserError("settings: 'params' must be an object of sampler parameters")
    out = {k: settings[k] for k in SETTINGS_KEYS if k in settings}
    out["params"] = params
    if "checkpoint" in out:
        out["checkpoint"] = choice_for(str(out["checkpoint"]))
    return out


def _import_line(cls) -> str:
    import diffusers

    if getattr(diffusers, cls.__name__, None) is cls:
        return f"from diffusers import {cls.__name__}"
    return f"from {cls.__module__} import {cls.__name__}"


def _literal(config: dict) -> str:
    """A Python dict literal (None, True, tuples as lists) of a scheduler config."""
    def value(v):
        if isinstance(v, tuple):
            v = list(v)
        return repr(v)
    return "{" + ", ".join(f"{k!r}: {value(v)}" for k, v in config.items()) + "}"


def code_snippet(req: Request) -> str:
    """Python that reproduces ``req`` outside the app: same scheduler, config, seed and loop."""
    pipe = CACHE.get(req.checkpoint)
    scheduler, step_kwargs = create_scheduler(req.sampler, pipe.sampler_config, req.params)
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    cls = type(scheduler)
    shape = (req.batch_size, *pipe.sample_shape)
    if isinstance(req.class_label, list):
        labels = f"torch.tensor({req.class_label})"
    elif req.class_label is not None:
        labels = f"torch.full(({req.batch_size},), {req.class_label})"
    else:
        labels = "None"
    decode = "pipe.to_images(x)" if getattr(pipe, "decoder", None) is not None else "x"
    lines = [
        "import torch",
        _import_line(cls),
        "from pipelines import SamplerPipeline",
        "from schedulers.parametrization import EpsilonNetwork",
        "",
        f"pipe = SamplerPipeline.from_pretrained({checkpoint_path(req.checkpoint)!r})",
        "net = EpsilonNetwork(pipe.unet, pipe.family, pipe.schedule)  # the checkpoint's network as an ε-network",
        f"scheduler = {cls.__name__}.from_config({_literal(config)})",
        f"scheduler.set_timesteps({req.steps})  # {req.nfe} network evaluations",
        f"step_kwargs = {step_kwargs!r}",
        f"g = torch.Generator('cpu').manual_seed({req.seed})",
        f"x = torch.randn({shape}, generator=g) * scheduler.init_noise_sigma",
        f"labels = {labels}",
        "with torch.no_grad():",
        "    for t in scheduler.timesteps:",
        f"        eps = net(scheduler.scale_model_input(x, t), t, class_labels=labels, guidance_scale={req.guidance_scale!r})",
        "        x = scheduler.step(eps, t, x, generator=g, **step_kwargs).prev_sample",
        f"images = ({decode}.clamp(-1, 1) + 1) / 2  # [B, C, H, W] in [0, 1]",
    ]
    return "\n".join(lines)


def presets(sampler: str, base_config: Optional[dict] = None) -> list:
    """[(label, steps, params)]: the registry's defaults, the sampler's own presets (``SamplerSpec.presets``:
    the paper's settings, a fast one) where the registry has them, else a fast setting of about 20 NFE."""
    spec = get_spec(sampler)
    out = [(f"registry default ({spec.default_steps} {spec.steps_label})", None, {})]
    own = tuple(getattr(spec, "presets", ()) or ())
    for entry in own:
        label, steps, params = entry
        out.append((str(label), steps, dict(params or {})))
    if not own:
        try:
            fast = steps_for_nfe(sampler, 20, None, base_config)
            out.append((f"fast: ≈20 NFE ({fast} {spec.steps_label})", fast, {}))
        except ValueError:
            pass
    return out


def preset_labels(sampler: str, base_config: Optional[dict] = None) -> list:
    return [label for label, _, _ in presets(sampler, base_config)]


def preset(sampler: str, label: str, base_config: Optional[dict] = None) -> tuple:
    """(steps, params) of the preset ``label`` (steps None: the registry default)."""
    for name, steps, params in presets(sampler, base_config):
        if name == label:
            return steps, {**get_spec(sampler).defaults(), **params}
    raise UserError(f"preset: {sampler!r} has no preset {label!r}; it has: {', '.join(preset_labels(sampler, base_config))}")
