"""Server-side validation of a sampling request: every limit comes from the sampler registry
(``SamplerSpec.steps_range``, ``Param.bounds``, ``LIMITS``) and the loaded checkpoint.

What a caller leaves out (``None``) gets the *chosen sampler's* registry default here, on the
server, so an API client that never loaded the page runs the same sampler as the UI: ``pc``
keeps its one corrector step, ``langevin`` its 100 noise levels. Every refusal is a
:class:`UserError` whose message names the input.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

from schedulers.registry import LIMITS, SAMPLERS, get_spec, nfe_of, resolve_params, steps_for_nfe

from .errors import UserError
from .models import batch_limit, checkpoint_summary

UNCONDITIONAL = "unconditional"
ALL_DIGITS = "0–9"  # one image per digit in turn: the default on a class-conditional checkpoint
_UNCONDITIONAL_WORDS = ("random", "none", "unconditional", "uncond", "∅")
_ALL_WORDS = (ALL_DIGITS, "0-9", "all", "each", "mixed")
DEFAULT_GUIDANCE = 3.0
DEFAULT_BATCH = 16


def work_budget() -> int:
    """Largest NFE × batch size one request may ask for (``SAMPLER_LAB_MAX_WORK``, default 32,000)."""
    try:
        return max(1, int(os.environ.get("SAMPLER_LAB_MAX_WORK", "32000")))
    except ValueError:
        return 32000


def _number(value, name: str, lo: float, hi: float, integer: bool = False):
    if isinstance(value, str):
        value = value.strip()
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{name} must be finite, got {value!r}")
    if integer and x != int(x):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not lo <= x <= hi:
        raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return int(x) if integer else x


def digit_choices(summary: dict) -> list[str]:
    """The Digit control's choices on a checkpoint: ``0–9`` and each digit for a conditional one,
    ``unconditional`` where the checkpoint can sample without a label."""
    out = [ALL_DIGITS] if summary["conditional"] else []
    if not summary["conditional"] or summary["guidance"]:
        out.append(UNCONDITIONAL)
    return out + [str(i) for i in range(summary["num_classes"] if summary["conditional"] else 0)]


def default_digit(summary: dict) -> str:
    """A newcomer's first images should be digits, one of each: ``0–9`` with guidance on a conditional checkpoint."""
    return digit_choices(summary)[0]


def parse_digit(digit, summary: dict, batch_size: int) -> Union[None, int, list]:
    """``None`` (unconditional), one label, or one label per image (``0–9``); ints or strings alike."""
    if digit is None or (isinstance(digit, str) and not digit.strip()):
        digit = default_digit(summary)
    text = str(digit).strip().lower() if isinstance(digit, str) else None
    if text in _UNCONDITIONAL_WORDS:
        if summary["conditional"] and not summary["guidance"]:
            raise UserError("digit: this checkpoint needs a class label (it was trained without label dropout).")
        return None
    if not summary["conditional"]:
        raise UserError(f"digit: this checkpoint is unconditional; leave digit out or use {UNCONDITIONAL!r}, got {digit!r}")
    if text in _ALL_WORDS:
        return [i % summary["num_classes"] for i in range(batch_size)]
    return _number(digit, "digit", 0, summary["num_classes"] - 1, integer=True)


def digit_text(label) -> str:
    if label is None:
        return UNCONDITIONAL
    if isinstance(label, list):
        return ALL_DIGITS if len(set(label)) > 1 else str(label[0])
    return str(label)


def clean_params(sampler: str, params: Optional[dict]) -> dict:
    """The values a caller set for ``sampler``'s own parameters: ``None`` (and 0 for a parameter whose
    default is derived from the checkpoint) means "the registry default"; other samplers' parameters
    are dropped (the UI sends every box, most of them hidden)."""
    spec = get_spec(sampler)
    out = {}
    for name, value in (params or {}).items():
        if name not in spec.defaults() or value is None:
            continue
        if spec.param(name).default is None and value in (0, 0.0, ""):
            continue
        out[name] = value
    return out


@dataclass
class Request:
    """A validated sampling request."""

    checkpoint: str
    sampler: str
    steps: int
    params: dict
    seed: int
    batch_size: int
    class_label: Union[None, int, list]
    guidance_scale: float
    nfe: int
    explicit_params: Optional[dict] = None  # what the caller set (the rest are registry defaults)

    @property
    def digit(self) -> str:
        return digit_text(self.class_label)


def default_steps(sampler: str, base_config: Optional[dict] = None, params: Optional[dict] = None) -> int:
    """The registry's default step count, within the sampler's range on this checkpoint."""
    spec = get_spec(sampler)
    lo, hi = spec.steps_range(base_config, params)
    return min(max(spec.default_steps, lo), hi)


def make_request(checkpoint, sampler, steps=None, params=None, seed=0, batch_size=DEFAULT_BATCH, digit=None,
                 guidance_scale=None) -> Request:
    """Validate everything on the server side (the UI's own limits can be bypassed through the API).

    Every limit is the registry's: the sampler's step range on this checkpoint, its parameters' bounds,
    the batch and guidance limits, and this server's work budget (NFE × batch). ``None`` for the steps
    or a parameter means the chosen sampler's registry default; for the digit, the checkpoint's default
    (``0–9`` on a class-conditional checkpoint); for the guidance weight, 3 with a digit.
    """
    sampler = (sampler or "ddim").strip() if isinstance(sampler, str) else sampler
    if sampler not in SAMPLERS:
        raise UserError(f"sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    spec = get_spec(sampler)
    summary = checkpoint_summary(checkpoint)
    base_config = summary["sampler_config"]
    seed = _number(0 if seed is None else seed, "seed", 0, 2**63 - 1, integer=True)
    batch_size = _number(DEFAULT_BATCH if batch_size is None else batch_size, "batch size", 1, LIMITS.app_max_batch,
                         integer=True)
    clean = clean_params(sampler, params)
    try:
        values = resolve_params(sampler, clean, base_config)
    except ValueError as err:
        raise UserError(str(err)) from err
    if steps is None or (isinstance(steps, str) and not steps.strip()):
        steps = default_steps(sampler, base_config, clean)
    steps = _number(steps, f"steps ({spec.steps_label})", -math.inf, math.inf, integer=True)
    try:
        steps = spec.check_steps(steps, base_config, clean)
        nfe = nfe_of(sampler, steps, clean, base_config)
    except ValueError as err:
        raise UserError(f"steps: {err}") from err
    if nfe * batch_size > work_budget():
        raise UserError(f"{nfe} network evaluations × batch {batch_size} = {nfe * batch_size:,} exceeds this server's budget "
                        f"of {work_budget():,}; lower the steps or the batch size.")
    label = parse_digit(digit, summary, batch_size)
    if label is None or not summary["guidance"]:
        guidance_scale = 1.0
    else:
        guidance_scale = _number(DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale, "guidance scale", 0,
                                 LIMITS.max_guidance)
    guided = label is not None and guidance_scale != 1.0
    fits = batch_limit(checkpoint, guided)  # the fixed limit on the CPU; the free memory's on a GPU
    if batch_size > fits:
        raise UserError(f"batch size: {batch_size} images do not fit in the accelerator's free memory now; this "
                        f"checkpoint fits about {fits} at a time{' with guidance' if guided else ''}. Use a batch "
                        f"size of {fits} or less.")
    return Request(checkpoint, sampler, steps, values, seed, batch_size, label, guidance_scale, nfe, clean)


def parse_numbers(text, what: str = "step counts", most: int = 6) -> list[int]:
    """'10, 25, 50' → [10, 25, 50]."""
    if isinstance(text, (int, float)):
        text = str(text)
    if isinstance(text, (list, tuple)):
        text = ",".join(str(x) for x in text)
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        raise UserError(f"Give at least one of the {what}, e.g. 10, 25, 50.")
    out = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise UserError(f"The {what} must be whole numbers, got {p!r}.") from None
        if value != int(value) or value < 1:
            raise UserError(f"The {what} must be whole numbers of at least 1, got {p!r}.")
        out.append(int(value))
    if len(out) > most:
        raise UserError(f"At most {most} {what} at a time.")
    return out


def parse_steps(text) -> list[int]:
    """'10, 25, 50' → [10, 25, 50]."""
    return parse_numbers(text, "step counts")


def steps_for_budget(sampler: str, budget: int, base_config: Optional[dict] = None) -> int:
    """The step count (noise levels, ODE steps…) of ``sampler`` at its defaults whose NFE is closest to ``budget``
    (``schedulers.registry.steps_for_nfe``; remembered, since it tries step counts one by one)."""
    return _steps_for_budget(sampler, int(budget), json.dumps(base_config or {}, sort_keys=True, default=str))


@functools.lru_cache(maxsize=512)
def _steps_for_budget(sampler: str, budget: int, config_key: str) -> int:
    base_config = json.loads(config_key) or None
    lo, hi = get_spec(sampler).steps_range(base_config)
    try:
        return steps_for_nfe(sampler, budget, None, base_config)
    except ValueError:
        return lo if budget < nfe_of(sampler, lo, None, base_config) else hi
