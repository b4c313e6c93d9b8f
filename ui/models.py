"""Checkpoints the app can load, and the cache of loaded pipelines shared by every request."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from pipelines import CheckpointError, SamplerPipeline

from .errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = ROOT / "checkpoints"
BUNDLED = {
    "MNIST DDPM, class-conditional (bundled)": CHECKPOINT_DIR / "mnist-ddpm-cond",
    "MNIST NCSN score network (bundled)": CHECKPOINT_DIR / "mnist-ncsn",
}
DEFAULT_CHECKPOINT = next(iter(BUNDLED))


def on_space() -> bool:
    """True when running on Hugging Face Spaces (``SPACE_ID`` is set)."""
    return bool(os.environ.get("SPACE_ID"))


class ModelCache:
    """A small LRU cache of loaded pipelines, keyed by the resolved checkpoint folder.

    Loading is serialised by a lock, so two requests for the same checkpoint load it once.
    """

    def __init__(self, max_items: int = 3):
        self.max_items = max_items
        self._items: OrderedDict[str, SamplerPipeline] = OrderedDict()
        self._lock = threading.Lock()

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
            allowed = [str(CHECKPOINT_DIR)] if on_space() else None
            try:
                pipe = SamplerPipeline.from_pretrained(source, allowed_roots=allowed)
            except CheckpointError as err:
                raise UserError(str(err)) from err
            self._items[source] = pipe
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return pipe

    def __len__(self) -> int:
        return len(self._items)


CACHE = ModelCache()



def describe(choice: str) -> str:
    """Markdown describing a checkpoint (loads it into the cache)."""
    pipe = CACHE.get(choice)
    info = pipe.info
    lines = [f"**{info.describe()}**", f"source: `{info.source}`"]
    args = info.training_args
    if args:
        lines.append(f"trained by `training/train.py`: objective `{args.get('objective')}`, "
                     f"{args.get('max_train_steps')} steps on {args.get('data_source')}")
    return "  \n".join(lines)


def checkpoint_summary(choice: str) -> dict:
    """Facts the UI adapts to: conditional or not, number of classes, family, and the sampler config."""
    pipe = CACHE.get(choice)
    f = pipe.family
    return {"conditional": f.is_conditional, "num_classes": f.num_classes or 0, "guidance": f.null_class_label is not None,
            "family": f.kind, "sampler_config": pipe.sampler_config}
