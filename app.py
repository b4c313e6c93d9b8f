"""Diffusion sampler lab: one trained model, every sampler — DDPM, DDIM, annealed Langevin,
score-SDE samplers — side by side.

    python app.py                      # the bundled MNIST checkpoints, http://127.0.0.1:7860
    python app.py --checkpoint PATH    # also offer a local checkpoint folder (or a Hub repo id)

This file only lays out the UI; what each control does is in ``ui/service.py``.
"""

from __future__ import annotations

import argparse
import os
import random

import gradio as gr

from schedulers.registry import LIMITS, SAMPLERS, get_spec, nfe_of
from ui import service
from ui.service import BUNDLED, DEFAULT_CHECKPOINT, UserError

MODEL = dict(concurrency_id="model", concurrency_limit=1)  # one model, one request at a time

PARAMS = {}  # every sampler parameter name → its Param (first definition wins; defaults are reset per sampler)
for _spec in SAMPLERS.values():
    for _p in _spec.params:
        PARAMS.setdefault(_p.name, _p)
PARAM_NAMES = list(PARAMS)
SAMPLER_CHOICES = [(spec.title, name) for name, spec in SAMPLERS.items()]
INTRO = """# 🌀 Diffusion sampler lab
Load a checkpoint, pick a sampler, watch x_t and the denoised estimate x̂₀ evolve. Every sampler drives every
checkpoint: DDPM networks and NCSN score networks alike (see the README for the math)."""
CSS = ".status-line {font-family: ui-monospace, monospace; font-size: 0.9em}"


def _param_component(p):
    label = f"{p.label or p.name}"
    common = dict(label=label, info=p.help, visible=False)
    if p.kind == "bool":
        return gr.Checkbox(value=bool(p.default), **common)
    if p.kind == "choice":
        return gr.Radio(choices=list(p.choices), value=p.default, **common)
    if p.kind == "int":
        return gr.Slider(p.minimum, p.maximum, value=p.default, step=1, **common)
    if p.default is None:  # 0 stands for "derived from the checkpoint"
        return gr.Number(value=0, minimum=0, maximum=p.maximum, **{**common, "label": f"{label} (0: from the checkpoint)"})
    return gr.Number(value=p.default, minimum=p.minimum, maximum=p.maximum, **common)


def _params_from(sampler, values) -> dict:
    spec = SAMPLERS.get(sampler)
    if spec is None:
        return {}
    chosen = {}
    for name, value in zip(PARAM_NAMES, values):
        if name in spec.defaults() and not (value in (None, 0) and spec.param(name).default is None):
            chosen[name] = value
    return chosen


def _sampler_config(checkpoint):
    """The loaded checkpoint's schedule (the registry derives step limits from it), or None before it loads."""
    try:
        return service.CACHE.get(checkpoint).sampler_config
    except (UserError, ValueError):
        return None


def _steps_update(checkpoint, sampler, value=None):
    """The Steps slider for this sampler on this checkpoint: label and range from the registry."""
    spec = get_spec(sampler)
    lo, hi = spec.steps_range(_sampler_config(checkpoint))
    update = dict(label=spec.steps_label.capitalize(), minimum=lo, maximum=hi)
    if value is not None:
        update["value"] = min(max(value, lo), hi)
    return gr.update(**update)


def on_sampler_change(checkpoint, sampler):
    spec = get_spec(sampler)
    updates = [_steps_update(checkpoint, sampler, spec.default_steps), gr.update(info=spec.description)]
    defaults = spec.defaults()
    for name in PARAM_NAMES:
        if name in defaults:
            value = 0 if defaults[name] is None else defaults[name]
            updates.append(gr.update(visible=True, value=value, info=spec.param(name).help))
        else:
            updates.append(gr.update(visible=False))
    return updates


def nfe_text(checkpoint, sampler, steps, *values):
    try:
        base = service.CACHE.get(checkpoint).sampler_config
        n = nfe_of(sampler, int(steps), _params_from(sampler, values), base)
        return f"**{n} network evaluations** (NFE) per image batch"
    except (UserError, ValueError, TypeError) as err:
        return f"⚠️ {err}"


def on_load(checkpoint, sampler, steps):
    try:
        text = service.describe(checkpoint)
        summary = service.checkpoint_summary(checkpoint)
    except UserError as err:
        return f"⚠️ {err}", gr.update(), gr.update(), gr.update()
    cond = summary["conditional"]
    digits = (["unconditional"] if summary["guidance"] else []) + [str(i) for i in range(summary["num_classes"])]
    return (text, gr.update(visible=cond, choices=digits, value=digits[0] if digits else None),
            gr.update(visible=cond and summary["guidance"]), _steps_update(checkpoint, sampler, steps))


def run_generate(checkpoint, sampler, steps, seed, batch_size, digit, guidance, *values, progress=gr.Progress()):
    try:
        req = service.make_request(checkpoint, sampler, steps, _params_from(sampler, values), seed, batch_size, digit, guidance)
    except UserError as err:
        yield gr.skip(), gr.skip(), f"⚠️ {err}", gr.skip(), gr.skip()
        return
    for upd in service.generate(req):
        progress(upd.progress, desc="sampling")
        if not upd.done:
            yield upd.preview, gr.skip(), upd.status, gr.skip(), gr.skip()
        elif upd.images is None:  # cancelled or failed: keep the last results on screen
            yield gr.skip(), gr.skip(), upd.status, gr.skip(), gr.skip()
        else:
            yield upd.preview, upd.images, upd.status, upd.grid_file, upd.gif_file


def run_compare(checkpoint, samplers, steps_text, seed, batch_size, digit, guidance):
    try:
        image, rows = service.compare(checkpoint, samplers, steps_text, seed, batch_size, digit, guidance)
    except UserError as err:
        return gr.skip(), gr.skip(), f"⚠️ {err}"
    return image, rows, f"✅ {len(rows)} runs, seed {int(seed)}"


def run_forward(checkpoint, index, t, log_sigma):
    try:
        vp, ve, note = service.forward_process(checkpoint, index, t, 10 ** float(log_sigma))
        return vp, ve, note, service.schedule_figure(checkpoint)
    except UserError as err:
        return gr.skip(), gr.skip(), f"⚠️ {err}", gr.skip()


def build(extra_checkpoints=()) -> gr.Blocks:
    """The Gradio app (not launched)."""
    choices = list(BUNDLED) + [c for c in extra_checkpoints if c not in BUNDLED]
    default = extra_checkpoints[0] if extra_checkpoints else DEFAULT_CHECKPOINT
    with gr.Blocks(title="Diffusion sampler lab") as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(choices=choices, value=default, allow_custom_value=True, scale=4, label="Checkpoint",
                                     info="a bundled model, a local checkpoint folder, or a Hub repo id (online only)")
            load = gr.Button("Load", scale=0, min_width=120)
        info = gr.Markdown()
        with gr.Tabs():
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        ddim = get_spec("ddim")
                        sampler = gr.Dropdown(choices=SAMPLER_CHOICES, value="ddim", label="Sampler", info=ddim.description)
                        steps = gr.Slider(*ddim.steps_range(), value=ddim.default_steps, step=1, label="Steps")
                        nfe = gr.Markdown()
                        with gr.Row(equal_height=True):
                            seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                            dice = gr.Button("🎲 Random seed")
                        batch = gr.Slider(1, LIMITS.app_max_batch, value=16, step=1, label="Batch size")
                        digit = gr.Dropdown(choices=["unconditional"], value="unconditional", label="Digit", visible=False)
                        guidance = gr.Slider(0, LIMITS.max_guidance, value=3.0, step=0.5, label="Guidance scale w", visible=False,
                                             info="classifier-free guidance: ε(∅) + w(ε(c) − ε(∅)); 1 = plain conditional")
                        with gr.Accordion("Advanced: sampler parameters", open=False):
                            param_boxes = [_param_component(PARAMS[name]) for name in PARAM_NAMES]
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary")
                            stop = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=2):
                        status = gr.Markdown(elem_classes=["status-line"])
                        preview = gr.Image(label="Preview: x_t (left) · x̂₀ (right)", type="pil", format="png",
                                           interactive=False, height=340)
                        gallery = gr.Gallery(label="Samples", columns=8, format="png", height="auto")
                        with gr.Row():
                            grid_file = gr.File(label="Grid (PNG)")
                            gif_file = gr.File(label="Denoising trajectory (GIF)")
            with gr.Tab("Compare"):
                gr.Markdown("One seed, several samplers and step counts, side by side. Each cell: sampler, NFE, seconds.")
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        cmp_samplers = gr.CheckboxGroup(choices=SAMPLER_CHOICES, value=["ddpm", "ddim", "langevin"], label="Samplers")
                        cmp_steps = gr.Textbox(value="10, 50", label="Step counts (comma-separated; noise levels for Langevin)")
                        cmp_seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                        cmp_batch = gr.Slider(1, 8, value=4, step=1, label="Images per cell")
                        cmp_go = gr.Button("Compare", variant="primary")
                        cmp_stop = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=2):
                        cmp_status = gr.Markdown(elem_classes=["status-line"])
                        cmp_image = gr.Image(label="Comparison", type="pil", format="png", interactive=False)
                        cmp_table = gr.Dataframe(headers=["sampler", "steps", "NFE", "seconds"], label="Runs")
            with gr.Tab("Forward process & schedule"):
                with gr.Row():
                    fw_index = gr.Slider(0, 999, value=0, step=1, label="Held-out digit")
                    fw_t = gr.Slider(0, 999, value=250, step=1, label="VP timestep t")
                    fw_sigma = gr.Slider(-2, 2, value=-0.5, step=0.05, label="SMLD log₁₀ σ")
                with gr.Row():
                    fw_vp = gr.Image(label="VP: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε", type="pil", format="png", interactive=False)
                    fw_ve = gr.Image(label="SMLD: x̃ = x₀ + σ ε", type="pil", format="png", interactive=False)
                fw_note = gr.Markdown()
                fw_plot = gr.Plot(label="Schedule of the loaded checkpoint")

        # ---- wiring ----
        load_outputs = [info, digit, guidance, steps]
        load.click(on_load, [checkpoint, sampler, steps], load_outputs, api_name="load_checkpoint", **MODEL)
        demo.load(on_load, [checkpoint, sampler, steps], load_outputs, api_visibility="private", **MODEL)
        sampler.change(on_sampler_change, [checkpoint, sampler], [steps, sampler, *param_boxes], api_visibility="private")
        for comp in (checkpoint, sampler, steps, *param_boxes):
            comp.change(nfe_text, [checkpoint, sampler, steps, *param_boxes], nfe, api_visibility="private", show_progress="hidden")
        dice.click(lambda: random.randint(0, 2**31 - 1), None, seed, api_visibility="private")
        gen = go.click(run_generate, [checkpoint, sampler, steps, seed, batch, digit, guidance, *param_boxes],
                       [preview, gallery, status, grid_file, gif_file], api_name="generate", show_progress_on=[status],
                       **MODEL)
        stop.click(None, None, None, cancels=[gen], api_visibility="private")
        cmp = cmp_go.click(run_compare, [checkpoint, cmp_samplers, cmp_steps, cmp_seed, cmp_batch, digit, guidance],
                           [cmp_image, cmp_table, cmp_status], api_name="compare", show_progress_on=[cmp_status], **MODEL)
        cmp_stop.click(None, None, None, cancels=[cmp], api_visibility="private")
        fw_inputs, fw_outputs = [checkpoint, fw_index, fw_t, fw_sigma], [fw_vp, fw_ve, fw_note, fw_plot]
        fw_index.release(run_forward, fw_inputs, fw_outputs, api_name="forward_process", **MODEL)
        for trigger in (fw_t.release, fw_sigma.release, demo.load, load.click):
            trigger(run_forward, fw_inputs, fw_outputs, api_visibility="private", **MODEL)
        demo.load(nfe_text, [checkpoint, sampler, steps, *param_boxes], nfe, api_visibility="private")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="Diffusion sampler lab")
    parser.add_argument("--checkpoint", action="append", default=[], help="extra checkpoint folder or Hub repo id")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args()
    demo = build(tuple(args.checkpoint))
    demo.queue(max_size=32)
    demo.launch(server_name="0.0.0.0" if service.on_space() else args.host, server_port=args.port, share=args.share,
                theme=gr.themes.Soft(), css=CSS, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
