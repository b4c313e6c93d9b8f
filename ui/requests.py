"""Server-side validation of a sampling request: every limit comes from the sampler registry
(``SamplerSpec.steps_range``, ``Param.bounds``, ``LIMITS``) and the loaded checkpoint."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from schedulers.registry import LIMITS, SAMPLERS, get_spec, nfe_of, resolve_params

from .errors import UserError
from .models import checkpoint_summary

UNCONDITIONAL = ("", "random", "none", "unconditional")


def work_budget() -> int:
    """Largest NFE × batch size one request may ask for (``SAMPLER_LAB_MAX_WORK``, default 32,000)."""
    try:
        return max(1, int(os.environ.get("SAMPLER_LAB_MAX_WORK", "32000")))
    except ValueError:
        return 32000


def _number(value, name: str, lo: float, hi: float, integer: bool = False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{name} must be finite")
    if integer and x != int(x):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not lo <= x <= hi:
        raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return int(x) if integer else x


@dataclass
class Request:
    """A validated sampling request."""

    checkpoint: str
    sampler: str
    steps: int
    params: dict
    seed: int
    batch_size: int
    class_label: Optional[int]
    guidance_scale: float
    nfe: int


def make_request(checkpoint, sampler, steps, params, seed, batch_size, digit=None, guidance_scale=1.0) -> Request:
    """Validate everything on the server side (the UI's own limits can be bypassed through the API).

    Every limit is the registry's: the sampler's step range on this checkpoint, its parameters' bounds,
    the batch and guidance limits, and this server's work budget (NFE × batch).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    spec = get_spec(sampler)
    summary = checkpoint_summary(checkpoint)
    base_config = summary["sampler_config"]
    seed = _number(seed, "seed", 0, 2**63 - 1, integer=True)
    batch_size = _number(batch_size, "batch size", 1, LIMITS.app_max_batch, integer=True)
    clean = {k: v for k, v in (params or {}).items() if k in spec.defaults()}
    try:
        values = resolve_params(sampler, clean, base_config)
        steps = spec.check_steps(_number(steps, spec.steps_label, -math.inf, math.inf, integer=True), base_config, clean)
        nfe = nfe_of(sampler, steps, clean, base_config)
    except ValueError as err:
        raise UserError(str(err)) from err
    if nfe * batch_size > work_budget():
        raise UserError(f"{nfe} network evaluations × batch {batch_size} = {nfe * batch_size:,} exceeds this server's budget "
                        f"of {work_budget():,}; lower the steps or the batch size.")
    label = None
    if summary["conditional"] and digit not in (None, *UNCONDITIONAL):
        label = _number(digit, "digit", 0, summary["num_classes"] - 1, integer=True)
    guidance_scale = _number(guidance_scale if guidance_scale is not None else 1.0, "guidance scale", 0, LIMITS.max_guidance)
    if label is None:
        guidance_scale = 1.0
    if summary["conditional"] and label is None and not summary["guidance"]:
        raise UserError("This checkpoint needs a class label.")
    return Request(checkpoint, sampler, steps, values, seed, batch_size, label, guidance_scale, nfe)


def parse_steps(text) -> list[int]:
    """'10, 25, 50' → [10, 25, 50]."""
    if isinstance(text, (int, float)):
        return [int(text)]
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        raise UserError("Give at least one step count, e.g. 10, 25, 50.")
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise UserError(f"Step counts must be whole numbers, got {p!r}.") from None
    if len(out) > 6:
        raise UserError("At most 6 step counts at a time.")
    return out


