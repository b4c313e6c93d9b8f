"""Diffusion sampler lab: one trained model, every sampler — DDPM, DDIM, annealed Langevin,
score-SDE samplers — side by side.

    python app.py                      # the bundled MNIST checkpoints, http://127.0.0.1:7860
    python app.py --checkpoint PATH    # also offer a local checkpoint folder (or a Hub repo id)
    python app.py --device cuda --dtype float16   # where the networks run (default: auto = CUDA, else MPS, else CPU)

This file only lays out the UI and wires events; what each control does is in ``ui/handlers.py``
(Gradio glue) and ``ui/service.py`` (plain Python).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from ui import spaces_gpu  # noqa: I001 - imports ``spaces`` (on a ZeroGPU Space) before anything touches CUDA

import gradio as gr

from pipelines import DeviceError
from pipelines.device import add_device_arguments, resolve_device, resolve_dtype
from pipelines.device import label as device_label
from schedulers.registry import LIMITS, get_spec
from ui import handlers as h
from ui import service, widgets
from ui import evaluation_panel as ev
from ui.handlers import PARAM_NAMES, PARAMS, SAMPLER_CHOICES
from ui.service import BUNDLED, DEFAULT_CHECKPOINT

# Concurrency: sampling on the shared model runs one request at a time; everything light (page load,
# checkpoint facts, forward process, plots, trajectory views) has its own group and never waits behind it.
MODEL = dict(concurrency_id="model", concurrency_limit=1)
LIGHT = dict(concurrency_id="light", concurrency_limit=4)
TOY = dict(concurrency_id="toy", concurrency_limit=2)
INSTANT = dict(queue=False, show_progress="hidden")

INTRO = """# 🌀 Diffusion sampler lab
Load a checkpoint, pick a sampler, watch x_t and the denoised estimate x̂₀ evolve; step through a trajectory, compare
samplers at equal cost, see quality against NFE, and watch every sampler on an exact-score 2-D toy. Every sampler drives
every checkpoint: DDPM networks, NCSN score networks and a latent DiT alike (see the README for the math and the API)."""

CSS = """
.status-line {font-family: ui-monospace, monospace; font-size: 0.9em}
/* the gallery shows every image: 8 columns that fit the column's width (4 on a phone), no inner scroll */
#samples .grid-wrap {height: auto !important; max-height: none !important; overflow: visible !important}
#samples .grid-container {grid-template-columns: repeat(8, minmax(0, 1fr)) !important; width: 100% !important}
#samples .thumbnail-item {width: 100% !important; height: auto !important; aspect-ratio: 1 / 1}
@media (max-width: 720px) {#samples .grid-container {grid-template-columns: repeat(4, minmax(0, 1fr)) !important}}
/* previews keep one size, live or final */
#preview img, #traj-image img {image-rendering: pixelated; width: 100% !important; height: auto !important;
                               max-height: none !important; object-fit: contain}
#compare-image img {image-rendering: pixelated}
"""


def cache_ttl() -> tuple[int, int]:
    """(every, older than) seconds for Gradio's temporary files (``SAMPLER_LAB_CACHE_TTL``, default 1800 s)."""
    try:
        age = max(10, int(os.environ.get("SAMPLER_LAB_CACHE_TTL", "1800")))
    except ValueError:
        age = 1800
    return max(5, age // 4), age


def _param_component(p):
    common = dict(label=h.param_label(p), info=p.help, visible=False, elem_id=f"param-{p.name}")
    if p.kind == "bool":
        return widgets.Checkbox(value=None, **common)
    if p.kind == "choice":
        return widgets.Radio(choices=list(p.choices), value=None, **common)
    if p.kind == "int":
        return widgets.Slider(p.minimum, p.maximum, value=None, step=1, **common)
    if p.default is None:  # empty or 0 stands for "derived from the checkpoint"
        return widgets.Number(value=None, minimum=0, maximum=p.maximum,
                              **{**common, "label": f"{common['label']} (0: from the checkpoint)"})
    return widgets.Number(value=None, minimum=p.minimum, maximum=p.maximum, **common)


def build(extra_checkpoints=()) -> gr.Blocks:
    """The Gradio app (not launched)."""
    choices = list(BUNDLED) + [c for c in extra_checkpoints if c not in BUNDLED]
    default = extra_checkpoints[0] if extra_checkpoints else DEFAULT_CHECKPOINT
    try:
        summary = service.checkpoint_summary(default)
        digits = service.digit_choices(summary)
    except service.UserError:
        summary, digits = None, [service.ALL_DIGITS, service.UNCONDITIONAL] + [str(i) for i in range(10)]
    ddim = get_spec("ddim")
    lo, hi = ddim.steps_range(summary["sampler_config"] if summary else None)
    with gr.Blocks(title="Diffusion sampler lab", delete_cache=cache_ttl()) as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(choices=choices, value=default, allow_custom_value=True, scale=4, label="Checkpoint",
                                     info="a bundled model, a local checkpoint folder, or a Hub repo id (online only)")
            load = gr.Button("Load", scale=0, min_width=120)
        info = gr.Markdown()
        run_state = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        sampler = gr.Dropdown(choices=SAMPLER_CHOICES, value="ddim", label="Sampler", info=ddim.description)
                        preset = gr.Dropdown(choices=service.preset_labels("ddim"), value=None, label="Preset",
                                             info="the registry default, the paper's settings, a fast one")
                        steps = widgets.Slider(lo, hi, value=None, step=1, label="Steps", elem_id="steps")
                        nfe = gr.Markdown()
                        with gr.Row(equal_height=True):
                            seed = widgets.Number(value=0, precision=0, label="Seed", minimum=0)
                            dice = gr.Button("🎲 Random seed")
                        batch = widgets.Slider(1, LIMITS.app_max_batch, value=16, step=1, label="Batch size")
                        digit = gr.Dropdown(choices=digits, value=None, allow_custom_value=True, label="Digit",
                                            info=h.DIGIT_HELP, visible=bool(summary and summary["conditional"]))
                        guidance = widgets.Slider(0, LIMITS.max_guidance, value=3.0, step=0.5, label="Guidance scale w",
                                                  visible=bool(summary and summary["guidance"]),
                                                  info="classifier-free guidance: ε(∅) + w(ε(c) − ε(∅)); 1 = plain conditional")
                        with gr.Accordion("Advanced: sampler parameters", open=False):
                            param_boxes = [_param_component(PARAMS[name]) for name in PARAM_NAMES]
                            traj_image = widgets.Number(value=0, precision=0, minimum=0, label="Trajectory of image #",
                                                        info="which image of the batch the trajectory explorer stores")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary")
                            stop = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=2):
                        status = gr.Markdown(elem_classes=["status-line"], elem_id="status")
                        preview = gr.Image(label="Preview: x_t (left) · x̂₀ (right)", type="pil", format="png",
                                           interactive=False, elem_id="preview", buttons=["download"])
                        gallery = gr.Gallery(label="Samples", columns=8, format="png", height="auto", elem_id="samples",
                                             object_fit="contain")
                        with gr.Row():
                            grid_file = gr.File(label="Grid (PNG)")
                            gif_file = gr.File(label="Denoising trajectory (GIF)")
                        with gr.Accordion("Reproduce in code", open=False):
                            settings_box = gr.Textbox(label="Settings (paste back below to rerun)", lines=2,
                                                      buttons=["copy"], elem_id="settings")
                            code_box = gr.Code(label="Python: the same scheduler, config, seed and loop", language="python")
                            with gr.Row(equal_height=True):
                                paste = gr.Textbox(label="Paste a settings string", lines=1, scale=4, elem_id="paste")
                                apply = gr.Button("Apply settings", scale=1)
                            applied = gr.Markdown()
            with gr.Tab("Trajectory", id="trajectory"):
                gr.Markdown("One image of the last run, step by step: the network's input x_t, its denoised estimate x̂₀ "
                            "and the noise ε̂ consistent with both, stored once per run. Below, σ_t with every step of "
                            "the run: where the sampler spends its network evaluations.")
                traj_step = widgets.Slider(0, 1, value=0, step=1, label="Position in the run (0: the first step)",
                                           interactive=False,
                                           elem_id="traj-step")
                traj_caption = gr.Markdown("Generate images first.")
                traj_view = gr.Image(label="x_t · x̂₀ · ε̂", type="pil", format="png", interactive=False,
                                     elem_id="traj-image")
                traj_plot = gr.Image(label="σ_t and the sampler's steps", type="pil", format="png", interactive=False)
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("Samplers side by side **at equal cost**: each NFE budget is converted to each sampler's steps "
                            "(noise levels for Langevin, Heun steps for the ODE); one seed, so every cell starts from the "
                            "same noise. Each cell: steps, NFE, seconds.")
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        cmp_samplers = gr.CheckboxGroup(choices=SAMPLER_CHOICES, value=["ddim", "dpmsolver++", "langevin"],
                                                        label="Samplers")
                        cmp_mode = gr.Radio(choices=[("equal NFE", "nfe"), ("equal steps", "steps")], value="nfe",
                                            label="Compare at")
                        cmp_budgets = gr.Textbox(value="10, 50", label="NFE budgets (or step counts), comma-separated")
                        cmp_seed = widgets.Number(value=0, precision=0, label="Seed", minimum=0)
                        cmp_batch = widgets.Slider(1, 8, value=4, step=1, label="Images per cell")
                        cmp_digit = gr.Dropdown(choices=digits, value=None, allow_custom_value=True, label="Digit",
                                                info=h.DIGIT_HELP, visible=bool(summary and summary["conditional"]))
                        cmp_guidance = widgets.Slider(0, LIMITS.max_guidance, value=3.0, step=0.5, label="Guidance scale w",
                                                      visible=bool(summary and summary["guidance"]))
                        with gr.Row():
                            cmp_go = gr.Button("Compare", variant="primary")
                            cmp_stop = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=2):
                        cmp_status = gr.Markdown(elem_classes=["status-line"], elem_id="cmp-status")
                        cmp_image = gr.Image(label="Comparison", type="pil", format="png", interactive=False,
                                             elem_id="compare-image")
                        cmp_conversion = gr.Markdown()
                        cmp_table = gr.Dataframe(headers=["sampler", "budget (NFE)", "steps", "NFE", "seconds"], label="Runs")
            with gr.Tab("Quality vs NFE", id="quality") as quality_tab:
                gr.Markdown("Classifier-FID against network evaluations for every sampler, from the evaluation table the "
                            "project ships for this checkpoint; the star is your current Generate setting.")
                quality_image = gr.Image(label="FID against NFE", type="pil", format="png", interactive=False,
                                         elem_id="quality-image", show_label=False)
                quality_caption = gr.Markdown()
                live_go = gr.Button("Quick live check (32 samples, classifier-scored)")
                live_text = gr.Markdown()
            with gr.Tab("Evaluate", id="evaluate") as evaluate_tab:
                gr.Markdown("A **quick evaluation** of the loaded checkpoint, every measure side by side: classifier-FID, "
                            "KID and Inception Score of a small batch of unconditional samples (each beside real digits "
                            "at the same count), and the likelihood of held-out digits in bits/dim by the variational "
                            "bound (VP checkpoints; plotted term by term) and the probability-flow ODE (both families). "
                            "Small batches: indicative only; the README's tables are the full evaluation.")
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        ev_samples = widgets.Slider(*ev.SAMPLES, value=ev.DEFAULT_SAMPLES, step=1,
                                                    label="Quick evaluation: number of samples", info=ev.HELP_SAMPLES)
                        ev_sampler = gr.Dropdown(choices=SAMPLER_CHOICES, value="ddim", label="Sampler")
                        ev_steps = widgets.Number(value=None, precision=0, minimum=1,
                                                  label="Steps (empty: the sampler's default)")
                        ev_bound = widgets.Checkbox(value=True, label="Variational bound (bits/dim)", info=ev.BOUND_HELP)
                        ev_ode = widgets.Checkbox(value=True, label="Probability-flow ODE likelihood (bits/dim)",
                                                  info=f"RK45 at rtol = atol = {ev.ODE_TOL:g}, Hutchinson trace; "
                                                       "VP and VE checkpoints")
                        ev_digits = widgets.Slider(*ev.NLL_IMAGES, value=ev.DEFAULT_NLL_IMAGES, step=1,
                                                   label="Held-out digits for the likelihood", info=ev.HELP_NLL)
                        ev_seed = widgets.Number(value=0, precision=0, label="Seed", minimum=0)
                        with gr.Row():
                            ev_go = gr.Button("Evaluate", variant="primary")
                            ev_stop = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=2):
                        ev_status = gr.Markdown(elem_classes=["status-line"], elem_id="ev-status")
                        ev_table = gr.Markdown(elem_id="ev-table")
                        ev_plot = gr.Image(label="Variational bound, bits/dim per step: which steps carry the bound",
                                           type="pil", format="png", interactive=False, elem_id="ev-plot")
            with gr.Tab("Toy 2-D", id="toy"):
                gr.Markdown("An exact-score world: a mixture of three 2-D Gaussians (weights 0.2 / 0.5 / 0.3) whose score "
                            "is known in closed form, so what you see is the sampler's own error. Particles (red) over the "
                            "exact density of x_t (blue), from noise to the modes.")
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        toy_sampler = gr.Dropdown(choices=SAMPLER_CHOICES, value="langevin", label="Sampler")
                        toy_steps = widgets.Slider(2, 2000, value=30, step=1, label="Steps: noise levels L")
                        toy_particles = widgets.Slider(100, 4000, value=2000, step=100, label="Particles")
                        toy_seed = widgets.Number(value=0, precision=0, label="Seed", minimum=0)
                        toy_go = gr.Button("Run", variant="primary")
                        toy_budget = widgets.Slider(3, 200, value=20, step=1, label="NFE budget for all samplers")
                        toy_all_go = gr.Button("All samplers at this NFE")
                    with gr.Column(scale=3):
                        toy_image = gr.Image(label="Particles over the true density", type="pil", format="png",
                                             interactive=False, elem_id="toy-image", show_label=False)
                        toy_caption = gr.Markdown()
                        toy_table = gr.Dataframe(headers=["mode", "true weight", "sampled weight", "true std", "sampled std"],
                                                 label="Modes")
            with gr.Tab("Forward process & schedule", id="forward"):
                with gr.Row():
                    fw_index = widgets.Slider(0, 999, value=0, step=1, label="Held-out digit")
                    fw_t = widgets.Slider(0, 999, value=250, step=1, label="VP timestep t")
                    fw_sigma = widgets.Slider(-2, 2, value=-0.5, step=0.05, label="SMLD log₁₀ σ")
                with gr.Row():
                    fw_vp = gr.Image(label="VP: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε", type="pil", format="png", interactive=False)
                    fw_ve = gr.Image(label="SMLD: x̃ = x₀ + σ ε", type="pil", format="png", interactive=False)
                fw_note = gr.Markdown()
                fw_plot = gr.Image(label="Schedule of the loaded checkpoint, with the Generate tab's sampler steps",
                                   type="pil", format="png", interactive=False)

        # ---- wiring ----
        sampler_outputs = [sampler, steps, preset, *param_boxes]
        load_outputs = [info, digit, guidance, cmp_digit, cmp_guidance, steps]
        load.click(h.named(h.load_checkpoint, [("checkpoint", DEFAULT_CHECKPOINT), ("sampler", "ddim"), ("steps", None),
                                               ("digit", None)]),
                   [checkpoint, sampler, steps, digit], load_outputs, api_name="load_checkpoint", **LIGHT)
        checkpoint.select(h.load_checkpoint, [checkpoint, sampler, steps, digit], load_outputs, api_visibility="private",
                          **LIGHT)
        demo.load(h.on_page_load, [checkpoint, sampler], load_outputs[:5] + sampler_outputs + [nfe],
                  api_visibility="private", **LIGHT)
        # dropdowns: .select, once per choice (Gradio 6's Dropdown fires .input twice for one choice, and the
        # second answer could overwrite a step count typed in between)
        sampler.select(h.on_sampler_change, [checkpoint, sampler], sampler_outputs, api_visibility="private", **INSTANT)
        preset.select(h.apply_preset, [checkpoint, sampler, preset], [steps, *param_boxes], api_visibility="private",
                     **INSTANT)
        for box in param_boxes:
            box.input(h.on_param_change, [checkpoint, sampler, steps, *param_boxes], steps, api_visibility="private",
                      **INSTANT)
        # one event for every trigger, "always_last": a late answer for an earlier sampler or step count can never
        # overwrite the NFE of what the controls show now (separate events raced on a loaded machine)
        gr.on([c.change for c in (sampler, steps, *param_boxes)], h.nfe_text, [checkpoint, sampler, steps, *param_boxes],
              nfe, api_visibility="private", trigger_mode="always_last", **INSTANT)
        digit.change(h.guidance_update, digit, guidance, api_visibility="private", **INSTANT)
        cmp_digit.change(h.guidance_update, cmp_digit, cmp_guidance, api_visibility="private", **INSTANT)
        dice.click(h.random_seed, None, seed, api_visibility="private", **INSTANT)

        gen_fn = h.named(h.generate, h.GENERATE_INPUTS, PARAM_NAMES, progress=True)
        gen = go.click(gen_fn, [checkpoint, sampler, steps, seed, batch, digit, guidance, traj_image, *param_boxes],
                       [preview, gallery, status, grid_file, gif_file, settings_box, code_box, run_state],
                       api_name="generate", show_progress_on=[status], **MODEL)
        gen.success(h.after_run, run_state, [traj_step, traj_view, traj_caption, traj_plot], api_visibility="private",
                    **LIGHT)
        stop.click(h.cancelled_status, None, status, cancels=[gen], api_visibility="private", **INSTANT)
        for trigger in (traj_step.input, traj_step.release):
            trigger(h.show_trajectory, [run_state, traj_step], [traj_view, traj_caption, traj_plot], api_visibility="private",
                    show_progress="hidden", trigger_mode="always_last", **LIGHT)
        apply.click(h.apply_settings, [paste, checkpoint],
                    [checkpoint, seed, batch, digit, guidance, *sampler_outputs, applied], api_visibility="private",
                    **INSTANT).then(h.load_checkpoint, [checkpoint, sampler, steps, digit], load_outputs,
                                    api_visibility="private", **LIGHT)

        cmp_fn = h.named(h.compare, h.COMPARE_INPUTS)
        cmp = cmp_go.click(cmp_fn, [checkpoint, cmp_samplers, cmp_budgets, cmp_mode, cmp_seed, cmp_batch, cmp_digit,
                                    cmp_guidance],
                           [cmp_image, cmp_table, cmp_status, cmp_conversion], api_name="compare",
                           show_progress_on=[cmp_status], **MODEL)
        cmp_stop.click(h.cancelled_status, None, cmp_status, cancels=[cmp], api_visibility="private", **INSTANT)

        quality_inputs = [checkpoint, sampler, steps, *param_boxes]
        quality_tab.select(h.quality, quality_inputs, [quality_image, quality_caption], api_visibility="private", **LIGHT)
        live_go.click(h.live_quality, quality_inputs, live_text, api_visibility="private", show_progress_on=[live_text],
                      **MODEL)

        for trigger in (evaluate_tab.select, load.click, checkpoint.select):  # the bound box follows the checkpoint
            trigger(ev.bound_checkbox, checkpoint, ev_bound, api_visibility="private", **LIGHT)
        ev_run = ev_go.click(h.named(ev.evaluate, ev.EVALUATE_INPUTS, progress=True),
                             [checkpoint, ev_samples, ev_sampler, ev_steps, ev_bound, ev_ode, ev_digits, ev_seed],
                             [ev_status, ev_table, ev_plot], api_name="evaluate", show_progress_on=[ev_status], **MODEL)
        ev_stop.click(h.cancelled_status, None, ev_status, cancels=[ev_run], api_visibility="private", **INSTANT)

        toy_sampler.select(h.toy_steps_update, toy_sampler, toy_steps, api_visibility="private", **INSTANT)
        toy_go.click(h.named(h.run_toy, [("sampler", "langevin"), ("steps", None), ("particles", 2000), ("seed", 0)]),
                     [toy_sampler, toy_steps, toy_particles, toy_seed], [toy_image, toy_caption, toy_table],
                     api_name="toy", **TOY)
        toy_all_go.click(h.run_toy_all, [toy_budget, toy_particles, toy_seed], [toy_image, toy_table],
                         api_visibility="private", **TOY)

        fw_fn = h.named(h.forward_process, h.FORWARD_INPUTS)
        fw_inputs, fw_outputs = [checkpoint, fw_index, fw_t, fw_sigma, sampler, steps], [fw_vp, fw_ve, fw_note, fw_plot]
        fw_index.release(fw_fn, fw_inputs, fw_outputs, api_name="forward_process", **LIGHT)
        for trigger in (fw_t.release, fw_sigma.release, load.click):
            trigger(fw_fn, fw_inputs, fw_outputs, api_visibility="private", **LIGHT)
        demo.load(fw_fn, fw_inputs, fw_outputs, api_visibility="private", **LIGHT)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    """The app's command line; ``--device``/``--dtype`` are resolved (``args.device`` a torch.device,
    ``args.dtype`` a torch.dtype) and a device this machine lacks is a usage error naming the fix.
    On a ZeroGPU Space ``auto`` means CUDA (the GPU is attached during each sampling call)."""
    parser = argparse.ArgumentParser(description="Diffusion sampler lab")
    parser.add_argument("--checkpoint", action="append", default=[], help="extra checkpoint folder or Hub repo id")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    name = args.device
    if name.strip().lower() == "auto" and spaces_gpu.zero_gpu():
        name = "cuda"
    try:
        try:
            args.device = resolve_device(name)
        except DeviceError:
            if name == args.device:
                raise
            logging.getLogger("sampler_lab").warning("ZeroGPU Space without a visible CUDA device: running on the CPU")
            args.device = resolve_device("cpu")
        args.dtype = resolve_dtype(args.dtype, args.device)
    except DeviceError as err:
        parser.error(str(err))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    service.apply_threads()
    service.CACHE.configure(args.device, args.dtype)  # every checkpoint loads there from now on
    logging.getLogger("sampler_lab").info("networks run on %s", device_label(args.device, args.dtype))
    # Gradio's copies of our outputs go to a folder of our own, which the sweeper may prune
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(tempfile.gettempdir(), "sampler-lab-gradio"))
    demo = build(tuple(args.checkpoint))
    every, age = cache_ttl()
    from gradio.utils import get_upload_folder

    keep = lambda: {p for b in demo.blocks.values() for p in getattr(b, "keep_in_cache", ())}  # noqa: E731
    service.start_sweeper([get_upload_folder(), service.outputs_dir()], age, every, keep)
    demo.queue(max_size=32, default_concurrency_limit=4)
    demo.launch(server_name="0.0.0.0" if service.on_space() else args.host, server_port=args.port, share=args.share,
                theme=gr.themes.Soft(), css=CSS, footer_links=["api", "gradio"], show_error=True)


if __name__ == "__main__":
    main()
