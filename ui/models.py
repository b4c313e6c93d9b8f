"""Checkpoints the app can load, and the cache of loaded pipelines shared by every request."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from pipelines import CheckpointError, DeviceError, SamplerPipeline
from pipelines.checkpoint import HUB_PATTERNS, looks_like_repo_id
from pipelines.device import batch_limit as device_batch_limit
from pipelines.device import label as device_label
from pipelines.device import resolve_device, resolve_dtype
from schedulers.registry import LIMITS

from .errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = ROOT / "checkpoints"
BUNDLED = {
    "MNIST DDPM, class-conditional (bundled)": CHECKPOINT_DIR / "mnist-ddpm-cond",
    "MNIST NCSN score network (bundled)": CHECKPOINT_DIR / "mnist-ncsn",
    "MNIST latent DiT, class-conditional (bundled)": CHECKPOINT_DIR / "mnist-latent-dit",
    "MNIST latent UNet, class-conditional (bundled)": CHECKPOINT_DIR / "mnist-latent-unet",
}
DEFAULT_CHECKPOINT = next(iter(BUNDLED))
SPACE_REFUSAL = ("On this server only the bundled checkpoints and Hugging Face Hub repo ids (owner/name) can be loaded; "
                 "{source!r} is neither, or could not be loaded from the Hub.")


def on_space() -> bool:
    """True when running on Hugging Face Spaces (``SPACE_ID`` is set)."""
    return bool(os.environ.get("SPACE_ID"))


class ModelCache:
    """A small LRU cache of loaded pipelines, keyed by the resolved checkpoint folder.

    Loading is serialised by a lock, so two requests for the same checkpoint load it once. Every
    pipeline is loaded on ``device`` with the network in ``dtype`` (the one device rule of
    ``pipelines/device.py``; ``python app.py --device/--dtype`` sets them with :meth:`configure`).
    """

    def __init__(self, max_items: int = 3, device="cpu", dtype=None):
        self.max_items = max_items
        self._items: OrderedDict[str, SamplerPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.configure(device, dtype)

    def configure(self, device="auto", dtype=None) -> None:
        """Load every checkpoint on ``device`` (auto|cpu|cuda|mps) with the network in ``dtype`` from now on;
        pipelines loaded before are dropped. Raises :class:`~pipelines.DeviceError` for a device or
        precision this machine cannot run."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        with self._lock:
            if (device, dtype) != (self.device, self.dtype):
                self._items.clear()
            self.device, self.dtype = device, dtype

    def resolve(self, choice: str) -> str:
        """A bundled checkpoint's label → its folder; anything else is a path or a Hub repo id."""
        choice = (choice or "").strip()
        if not choice:
            raise UserError("Choose a checkpoint: a bundled one, a local folder or a Hub repo id.")
        return str(BUNDLED.get(choice, choice))

    def get(self, choice: str) -> SamplerPipeline:
        source = self.resolve(choice)
        with self._lock:
            if source in self._items:
                self._items.move_to_end(source)
                return self._items[source]
            try:
                pipe = self._load_on_space(source) if on_space() else self._load(source)
            except (CheckpointError, DeviceError) as err:
                raise UserError(str(err)) from err
            self._items[source] = pipe
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return pipe

    def _load(self, source: str, **kwargs) -> SamplerPipeline:
        try:
            return SamplerPipeline.from_pretrained(source, device=self.device, torch_dtype=self.dtype, **kwargs)
        except RuntimeError as err:  # too large for the device (out of memory while moving the weights)
            from pipelines.device import is_out_of_memory

            if not is_out_of_memory(err):
                raise
            raise UserError(f"{source}: the checkpoint does not fit in the free memory of {device_label(self.device)}; "
                            "start the app with --dtype float16 (or bfloat16), or --device cpu") from err

    def _load_on_space(self, source: str) -> SamplerPipeline:
        """On a public server: the app's own checkpoints, or a Hub repo id, and nothing else.

        The answer must not tell a visitor whether a path exists on the server, so whatever is not
        lexically inside ``checkpoints/`` is never looked up on disk: a repo id goes straight to the
        Hub (a local folder of the same name is ignored), anything else gets one fixed refusal.
        """
        local = Path(os.path.abspath(os.path.expanduser(source)))  # lexical: touches no file
        if local.is_relative_to(CHECKPOINT_DIR):
            return self._load(str(local), allowed_roots=[str(CHECKPOINT_DIR)])
        if not looks_like_repo_id(source):
            raise UserError(SPACE_REFUSAL.format(source=source))
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(source, allow_patterns=HUB_PATTERNS)
        except Exception as err:  # offline, unknown or gated repo: the same words for every failure
            raise UserError(SPACE_REFUSAL.format(source=source)) from err
        return self._load(folder, allow_hub=False, allowed_roots=[folder])

    def __len__(self) -> int:
        return len(self._items)


CACHE = ModelCache()



def describe(choice: str) -> str:
    """Markdown describing a checkpoint (loads it into the cache)."""
    pipe = CACHE.get(choice)
    info = pipe.info
    lines = [f"**{info.describe()}**", f"source: `{info.source}` · runs on {device_label(pipe.device, pipe.network_dtype)}"]
    args = info.training_args
    if args:
        lines.append(f"trained by `training/train.py`: objective `{args.get('objective')}`, "
                     f"{args.get('max_train_steps')} steps on {args.get('data_source')}")
    for note in getattr(info, "notes", None) or []:
        lines.append(f"scheduler config: {note}")
    return "  \n".join(lines)


def batch_limit(choice: str, guided: bool = False) -> int:
    """The largest batch one request may draw on this checkpoint: ``LIMITS.app_max_batch`` on the CPU; on a
    GPU (or MPS) also what 80 % of the device's free memory holds (``torch.cuda.mem_get_info``) at the
    pipeline's estimated memory per image (twice that with guidance)."""
    pipe = CACHE.get(choice)
    return device_batch_limit(pipe.device, pipe.bytes_per_image(guided), LIMITS.app_max_batch)


def checkpoint_summary(choice: str) -> dict:
    """Facts the UI adapts to: conditional or not, number of classes, family, and the sampler config."""
    pipe = CACHE.get(choice)
    f = pipe.family
    return {"conditional": f.is_conditional, "num_classes": f.num_classes or 0, "guidance": f.null_class_label is not None,
            "family": f.kind, "sampler_config": pipe.sampler_config}


def checkpoint_path(choice: str) -> str:
    """The folder (or repo id) a choice stands for, relative to the project when it lies inside it (for code snippets)."""
    source = CACHE.resolve(choice)
    try:
        return str(Path(source).resolve().relative_to(ROOT))
    except ValueError:
        return source


def choice_for(source: str) -> str:
    """The dropdown label of a bundled checkpoint given as a path (``checkpoints/mnist-ncsn``), else ``source``."""
    for label, path in BUNDLED.items():
        if source == label or os.path.abspath(source) == str(path):
            return label
    return source
