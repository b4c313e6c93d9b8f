"""What the app does, without the UI, in one namespace for ``app.py`` and the tests.

Each concern lives in its own module:

- ``ui/models.py``: which checkpoints exist and the cache of loaded pipelines;
- ``ui/requests.py``: where a request is validated (every limit from the sampler registry);
- ``ui/sampling.py``: generation with streamed previews and cancel, and the comparison grid;
- ``ui/outputs.py``: preview images, galleries, labelled grids, and the files offered for download;
- ``ui/views.py``: the forward process on a held-out digit and the schedule plot.

Every function takes and returns plain Python values, so the tests call them directly.
"""

from __future__ import annotations

from schedulers.registry import LIMITS

from .errors import UserError
from .models import BUNDLED, CACHE, CHECKPOINT_DIR, DEFAULT_CHECKPOINT, ModelCache, checkpoint_summary, describe, on_space
from .outputs import DISPLAY_SIZE, gallery_images, labelled_grid, preview_image, save_outputs
from .requests import Request, make_request, parse_steps, work_budget
from .sampling import Update, compare, generate, generate_blocking, status_line
from .views import forward_process, held_out_digits, schedule_figure

MAX_BATCH = LIMITS.app_max_batch  # images per request in the app

__all__ = [
    "BUNDLED", "CACHE", "CHECKPOINT_DIR", "DEFAULT_CHECKPOINT", "DISPLAY_SIZE", "MAX_BATCH", "ModelCache", "Request", "Update",
    "UserError", "checkpoint_summary", "compare", "describe", "forward_process", "gallery_images", "generate",
    "generate_blocking", "held_out_digits", "labelled_grid", "make_request", "on_space", "parse_steps", "preview_image",
    "save_outputs", "schedule_figure", "status_line", "work_budget",
]
