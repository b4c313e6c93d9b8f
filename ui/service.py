"""What the app does, without the UI, in one namespace for ``app.py`` and the tests.

Each concern lives in its own module:

- ``ui/models.py``: which checkpoints exist and the cache of loaded pipelines;
- ``ui/requests.py``: where a request is validated (every limit from the sampler registry; per-sampler defaults);
- ``ui/sampling.py``: generation with streamed previews, trajectory capture and cancel; the comparison at equal cost;
- ``ui/trajectory.py``: one image's x_t, x̂₀, ε̂ at every step, stored once per run;
- ``ui/outputs.py``: preview images, galleries, labelled grids, files (every picture through ``to_display``);
- ``ui/views.py``: forward process, schedule plot with a sampler's timesteps, trajectory explorer, quality vs NFE;
- ``ui/toy.py``: the exact-score 2-D world;
- ``ui/reproduce.py``: settings strings, code snippets, presets;
- ``ui/handlers.py``: the Gradio event handlers (named API parameters, errors clients receive).

Every function here takes and returns plain Python values, so the tests call them directly.
"""

from __future__ import annotations

from schedulers.registry import LIMITS

from .errors import UserError
from .models import (BUNDLED, CACHE, CHECKPOINT_DIR, DEFAULT_CHECKPOINT, ModelCache, checkpoint_path, checkpoint_summary,
                     choice_for, describe, on_space)
from .outputs import (DISPLAY_SIZE, figure_image, gallery_images, labelled_grid, preview_image, save_outputs, start_sweeper,
                      sweep_files, to_display)
from .outputs import _outdir as outputs_dir
from .reproduce import code_snippet, parse_settings, preset, preset_labels, presets, settings_string
from .requests import (ALL_DIGITS, UNCONDITIONAL, Request, default_digit, default_steps, digit_choices, make_request,
                       parse_steps, steps_for_budget, work_budget)
from .sampling import (CompareUpdate, Update, apply_threads, choose_threads, compare, compare_blocking, conversion_text,
                       generate, generate_blocking, plan_compare, progress_line, status_line)
from .toy import run_toy, toy_all
from .trajectory import TRAJECTORIES, Trajectory
from .views import (forward_process, held_out_digits, live_quality, quality_figure, sampler_timesteps, schedule_figure,
                    table_for, trajectory_view)

MAX_BATCH = LIMITS.app_max_batch  # images per request in the app

__all__ = [
    "ALL_DIGITS", "BUNDLED", "CACHE", "CHECKPOINT_DIR", "DEFAULT_CHECKPOINT", "DISPLAY_SIZE", "MAX_BATCH", "ModelCache",
    "Request", "TRAJECTORIES", "Trajectory", "UNCONDITIONAL", "CompareUpdate", "Update", "UserError", "apply_threads",
    "checkpoint_path", "checkpoint_summary", "choice_for", "choose_threads", "code_snippet", "compare", "compare_blocking",
    "conversion_text", "default_digit", "default_steps", "describe", "digit_choices", "figure_image", "forward_process",
    "gallery_images", "generate", "generate_blocking", "held_out_digits", "labelled_grid", "live_quality", "make_request",
    "on_space", "parse_settings", "parse_steps", "plan_compare", "preset", "preset_labels", "presets", "preview_image",
    "progress_line", "quality_figure", "run_toy", "sampler_timesteps", "save_outputs", "schedule_figure",
    "settings_string", "start_sweeper", "status_line", "sweep_files", "outputs_dir", "steps_for_budget", "table_for",
    "to_display", "toy_all", "trajectory_view",
    "work_budget",
]
