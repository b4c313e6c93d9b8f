"""The Gradio event handlers: plain service calls wrapped for the UI and the API.

- **Named API inputs.** Gradio names an endpoint's parameters after the handler's positional
  parameters; the sampler parameters come from the registry, so :func:`named` gives the handler
  an explicit signature (``checkpoint, sampler, steps, …, eta, clip_sample, …``), each with a
  default: ``None`` means "the chosen sampler's registry default", applied on the server.
- **Refusals reach clients.** A refused request first shows its friendly "⚠️ …" in the status
  line, then raises ``gr.Error``, so a ``gradio_client`` call raises an ``AppError`` with the
  message instead of returning normally.
"""

from __future__ import annotations

import inspect
import random
from typing import Callable

import gradio as gr

from schedulers.registry import SAMPLERS, get_spec, nfe_of

from . import service
from .errors import UserError
from .spaces_gpu import gpu
from .toy import toy_pipeline
from .requests import ALL_DIGITS, UNCONDITIONAL, clean_params, default_steps, digit_choices

PARAMS = {}  # every sampler parameter name → its Param (one control per name; values are per sampler)
for _spec in SAMPLERS.values():
    for _p in _spec.params:
        PARAMS.setdefault(_p.name, _p)
PARAM_NAMES = list(PARAMS)
SAMPLER_CHOICES = [(spec.title, name) for name, spec in SAMPLERS.items()]


def param_label(p) -> str:
    """'η (eta)': the symbol and the API name, so no two controls share a label."""
    return f"{p.label} ({p.name})" if p.label and p.label != p.name else p.name


def steps_label(sampler: str) -> str:
    text = get_spec(sampler).steps_label
    return f"Steps: {text}" if text != "steps" else "Steps"


def named(fn: Callable, fixed: list, extra: list = (), progress: bool = False) -> Callable:
    """``fn(**values)`` behind an explicit signature: ``fixed`` [(name, default)] then ``extra`` names
    (default None), then a ``gr.Progress`` slot. Gradio reads the names for the API and passes values by
    position; a generator ``fn`` stays a generator (Gradio streams it)."""
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default) for name, default in fixed]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in extra]
    if progress:
        params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    sig = inspect.Signature(params)

    if inspect.isgeneratorfunction(fn):
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            yield from fn(**bound.arguments)
    else:
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return fn(**bound.arguments)
    wrapper.__signature__ = sig
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _sampler_config(checkpoint):
    """The loaded checkpoint's schedule (the registry derives step limits from it), or None before it loads."""
    try:
        return service.CACHE.get(checkpoint).sampler_config
    except (UserError, ValueError):
        return None


def _params(sampler, values: dict) -> dict:
    return clean_params(sampler, values) if sampler in SAMPLERS else {}


# ---- Generate tab: controls that follow the sampler and the checkpoint ----

def steps_update(checkpoint, sampler, value=None, params=None):
    """The Steps slider for this sampler on this checkpoint: label and range from the registry
    (``steps_range`` depends on the checkpoint's T and on the parameters, e.g. Langevin's K)."""
    spec = get_spec(sampler)
    base = _sampler_config(checkpoint)
    try:
        lo, hi = spec.steps_range(base, params)
    except ValueError:
        lo, hi = spec.steps_range(base)
    update = dict(label=steps_label(sampler), minimum=lo, maximum=hi, info=f"{lo}–{hi:,} on this checkpoint")
    if value is not None:
        update["value"] = min(max(int(value), lo), hi)
    return gr.update(**update)


def sampler_updates(checkpoint, sampler, steps=None, params=None, sampler_value=False) -> list:
    """Updates for [sampler, steps, preset, *parameter boxes] showing ``sampler`` with ``steps``/``params``
    (default: the registry's)."""
    spec = get_spec(sampler)
    base = _sampler_config(checkpoint)
    values = {**spec.defaults(), **(params or {})}
    steps = default_steps(sampler, base, _params(sampler, params or {})) if steps is None else steps
    sampler_update = gr.update(info=spec.description, **({"value": sampler} if sampler_value else {}))
    labels = service.preset_labels(sampler, base)
    updates = [sampler_update, steps_update(checkpoint, sampler, steps, _params(sampler, params or {})),
               gr.update(choices=labels, value=labels[0] if not params and steps == default_steps(sampler, base) else None)]
    for name in PARAM_NAMES:
        if name in values:
            value = values[name]
            updates.append(gr.update(visible=True, value=0 if value is None else value, info=spec.param(name).help))
        else:
            updates.append(gr.update(visible=False))
    return updates


def on_sampler_change(checkpoint, sampler):
    return sampler_updates(checkpoint, sampler)


def on_param_change(checkpoint, sampler, steps, *values):
    """A parameter changed: the step range may have changed with it (K, corrector steps, Heun)."""
    return steps_update(checkpoint, sampler, None, _params(sampler, dict(zip(PARAM_NAMES, values))))


def apply_preset(checkpoint, sampler, label):
    try:
        steps, params = service.preset(sampler, label, _sampler_config(checkpoint))
    except UserError as err:
        raise gr.Error(str(err)) from err
    return sampler_updates(checkpoint, sampler, steps, params)[1:2] + sampler_updates(checkpoint, sampler, steps, params)[3:]


def nfe_text(checkpoint, sampler, steps, *values):
    try:
        params = _params(sampler, dict(zip(PARAM_NAMES, values)))
        base = service.CACHE.get(checkpoint).sampler_config
        steps = default_steps(sampler, base, params) if steps is None else int(steps)
        n = nfe_of(sampler, steps, params, base)
        return f"**{n} network evaluations** (NFE) per image batch"
    except (UserError, ValueError, TypeError) as err:
        return f"⚠️ {err}"


def guidance_update(digit):
    """Guidance acts only with a digit: the slider is inactive with 'unconditional' selected."""
    active = digit not in (None, "", UNCONDITIONAL)
    return gr.update(interactive=active, info=("classifier-free guidance: ε(∅) + w(ε(c) − ε(∅)); 1 = plain conditional"
                                               if active else "inactive: no digit chosen (unconditional samples)"))


def _digit_updates(summary, current=None):
    choices = digit_choices(summary)
    value = current if current in choices else choices[0]
    visible = summary["conditional"]
    return (gr.update(visible=visible, choices=choices, value=value),
            gr.update(visible=visible and summary["guidance"], **_interactive(value)))


def _interactive(digit):
    return {"interactive": digit not in (None, "", UNCONDITIONAL)}


def load_checkpoint(checkpoint, sampler="ddim", steps=None, digit=None):
    """Load a checkpoint: its description; the digit and guidance controls and the step range follow it."""
    try:
        text = service.describe(checkpoint)
        summary = service.checkpoint_summary(checkpoint)
    except UserError as err:
        yield (f"⚠️ {err}",) + (gr.skip(),) * 5
        raise gr.Error(str(err)) from err
    sampler = sampler if sampler in SAMPLERS else "ddim"
    d, g = _digit_updates(summary, digit)
    cd, cg = _digit_updates(summary, digit)
    yield text, d, g, cd, cg, steps_update(checkpoint, sampler, steps)


def on_page_load(checkpoint, sampler):
    """Everything the page needs at once: checkpoint facts, digit/guidance controls, the sampler's controls."""
    out = list(next(load_checkpoint(checkpoint, sampler)))
    return out[:5] + sampler_updates(checkpoint, sampler) + [nfe_text(checkpoint, sampler, None)]


# ---- Generate ----

GENERATE_INPUTS = [("checkpoint", service.DEFAULT_CHECKPOINT), ("sampler", "ddim"), ("steps", None), ("seed", 0),
                   ("batch_size", 16), ("digit", None), ("guidance_scale", 3.0), ("trajectory_image", 0)]


def _refuse(err, outputs: int, status_at: int):
    out = [gr.skip()] * outputs
    out[status_at] = f"⚠️ {err}"
    return tuple(out)


def generate(checkpoint, sampler, steps, seed, batch_size, digit, guidance_scale, trajectory_image, progress=None, **params):
    """Draw images with one sampler. Outputs: preview, gallery, status, grid (PNG), trajectory (GIF),
    settings string, code snippet. Parameters left out get the chosen sampler's registry defaults."""
    n_out = 8
    try:
        req = service.make_request(checkpoint, sampler, steps, params, seed, batch_size, digit, guidance_scale)
        k = 0 if trajectory_image is None else int(trajectory_image)
        if not 0 <= k < req.batch_size:
            raise UserError(f"trajectory_image must be an image of the batch (0–{req.batch_size - 1}), got {trajectory_image!r}")
    except (UserError, ValueError, TypeError) as err:
        yield _refuse(err, n_out, 2)
        raise gr.Error(str(err)) from err
    for upd in service.generate(req, trajectory_image=k):
        if progress is not None:
            progress(upd.progress, desc="sampling")
        if upd.kind == "tick":
            yield gr.skip(), gr.skip(), upd.status, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        elif not upd.done:
            yield upd.preview, gr.skip(), upd.status, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        elif upd.kind == "done":
            yield (upd.preview, upd.images, upd.status, upd.grid_file, upd.gif_file, service.settings_string(req),
                   service.code_snippet(req), upd.run_id)
        else:  # cancelled or failed: keep the last results on screen
            yield (gr.skip(), gr.skip(), upd.status) + (gr.skip(),) * 5
            if upd.kind == "error":
                raise gr.Error(upd.status.removeprefix("⚠️").strip())


def cancelled_status():
    return "⏹️ Cancelled."


def after_run(run_id):
    """The trajectory explorer after a run: slider over its stored steps, the last one shown."""
    if run_id is None:
        return (gr.update(interactive=False), None, "No trajectory for this run: this sampler chooses its steps during "
                "the run (see the README).", None)
    try:
        n = service.TRAJECTORIES.get(run_id).__len__()
        image, caption, plot = service.trajectory_view(run_id, n - 1)
    except UserError as err:
        return gr.skip(), gr.skip(), f"⚠️ {err}", gr.skip()
    return gr.update(minimum=0, maximum=max(1, n - 1), value=n - 1, interactive=n > 1), image, caption, plot


def show_trajectory(run_id, position):
    try:
        return service.trajectory_view(run_id, position)
    except UserError as err:
        raise gr.Error(str(err)) from err


def random_seed():
    return random.randint(0, 2**31 - 1)


def apply_settings(text, checkpoint):
    """Take a settings string back: every control is set from it (run it with Generate)."""
    try:
        s = service.parse_settings(text)
    except UserError as err:
        raise gr.Error(str(err)) from err
    ckpt = s.get("checkpoint", checkpoint)
    sampler = s.get("sampler", "ddim")
    params = {k: v for k, v in s.get("params", {}).items() if k in get_spec(sampler).defaults()}
    digit = s.get("digit")
    return ([gr.update(value=ckpt), s.get("seed", 0), s.get("batch_size", 16), gr.update(value=digit),
             s.get("guidance_scale", 3.0)] + sampler_updates(ckpt, sampler, s.get("steps"), params, sampler_value=True)
            + [f"Settings applied: {sampler}, {s.get('steps', 'default')} steps, seed {s.get('seed', 0)}; press Generate."])


# ---- Compare ----

COMPARE_INPUTS = [("checkpoint", service.DEFAULT_CHECKPOINT), ("samplers", ["ddim", "dpmsolver++", "langevin"]),
                  ("budgets", "10, 50"), ("mode", "nfe"), ("seed", 0), ("batch_size", 4), ("digit", None),
                  ("guidance_scale", 3.0)]


def compare(checkpoint, samplers, budgets, mode, seed, batch_size, digit, guidance_scale):
    """Samplers side by side at equal cost: each NFE budget converted to each sampler's steps (``mode="nfe"``),
    or at the given step counts (``mode="steps"``); one seed, the same initial noise for every cell.
    Outputs: grid image, table (sampler, budget, steps, NFE, seconds), status, conversion (Markdown)."""
    mode = {"equal NFE": "nfe", "equal steps": "steps"}.get(mode, mode or "nfe")
    try:
        stream = service.compare(checkpoint, samplers, budgets, seed, batch_size, digit, guidance_scale, mode=mode)
        first = next(stream)
    except UserError as err:
        yield gr.skip(), gr.skip(), f"⚠️ {err}", gr.skip()
        raise gr.Error(str(err)) from err
    for upd in _chain(first, stream):
        if upd.kind == "tick":
            yield gr.skip(), gr.skip(), upd.status, gr.skip()
        else:
            yield (upd.image if upd.image is not None else gr.skip()), upd.rows, upd.status, upd.conversion
        if upd.kind == "error":
            raise gr.Error(upd.status.removeprefix("⚠️").strip())


def _chain(first, rest):
    yield first
    yield from rest


# ---- Forward process, quality, toy ----

FORWARD_INPUTS = [("checkpoint", service.DEFAULT_CHECKPOINT), ("digit_index", 0), ("t", 250), ("log10_sigma", -0.5),
                  ("sampler", "ddim"), ("steps", None)]


def forward_process(checkpoint, digit_index, t, log10_sigma, sampler, steps):
    """A held-out digit noised by the VP forward process at t and by SMLD at σ = 10^log10_sigma; the schedule
    plot with the timesteps ``sampler`` visits at ``steps``. Outputs: VP image, SMLD image, note, plot."""
    try:
        vp, ve, note = service.forward_process(checkpoint, digit_index, t, 10 ** float(log10_sigma))
        fig = service.schedule_figure(checkpoint, sampler if sampler in SAMPLERS else None, steps)
        return vp, ve, note, service.figure_image(fig)
    except (UserError, ValueError, TypeError) as err:
        raise gr.Error(str(err)) from err


def quality(checkpoint, sampler, steps, *values):
    try:
        params = _params(sampler, dict(zip(PARAM_NAMES, values)))
        base = service.CACHE.get(checkpoint).sampler_config
        steps = default_steps(sampler, base, params) if steps is None else int(steps)
        nfe = nfe_of(sampler, steps, params, base)
        image, caption = service.quality_figure(checkpoint, sampler, nfe, params)
    except (UserError, ValueError, TypeError) as err:
        raise gr.Error(str(err)) from err
    return image, caption


@gpu  # the GPU call of a ZeroGPU Space (a no-op elsewhere)
def _live_quality(checkpoint, sampler, steps, params) -> str:
    return service.live_quality(checkpoint, sampler, steps, params, num_samples=32)


def live_quality(checkpoint, sampler, steps, *values):
    try:
        params = _params(sampler, dict(zip(PARAM_NAMES, values)))
        return _live_quality(checkpoint, sampler, steps, params)
    except (UserError, ValueError) as err:
        raise gr.Error(str(err)) from err


def toy_steps_update(sampler):
    spec = get_spec(sampler)
    pipe = toy_pipeline()
    lo, hi = spec.steps_range(pipe.sampler_config)
    return gr.update(label=steps_label(sampler), minimum=lo, maximum=min(hi, 2000), value=min(spec.default_steps, 2000),
                     info=spec.description)


def run_toy(sampler, steps, particles, seed):
    """The exact-score 2-D mixture: particles over the true density as ``sampler`` moves them from noise to the
    modes. Outputs: figure, caption, mode table."""
    try:
        return service.run_toy(sampler, steps, None, particles, seed)
    except (UserError, ValueError) as err:
        raise gr.Error(str(err)) from err


def run_toy_all(budget, particles, seed):
    try:
        image, rows = service.toy_all(budget, particles, seed)
    except (UserError, ValueError) as err:
        raise gr.Error(str(err)) from err
    return image, rows


DIGIT_HELP = f"{ALL_DIGITS}: one image of each digit in turn; a digit; or {UNCONDITIONAL}"
