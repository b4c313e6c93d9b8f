"""Training-state checkpoints: ``<output_dir>/checkpoints/checkpoint-<step>``, written atomically.

A checkpoint folder is complete once ``lab_state.json`` is in it; it is written under a
temporary name and renamed into place, so a run killed while saving never leaves a
half-written "latest" checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "lab_state.json"  # written last: a checkpoint folder without it is incomplete


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def _step_of(folder: Path) -> int:
    return int(folder.name[len(CHECKPOINT_PREFIX):])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted((d for d in root.glob(f"{CHECKPOINT_PREFIX}*") if (d / STATE_FILE).exists()), key=_step_of)


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """The newest complete checkpoint (``latest``) or the named folder; None if there is none yet."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).exists():
            raise TrainingError(f"--resume_from_checkpoint {which}: not a complete checkpoint folder (no {STATE_FILE})")
        return path
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def save_training_state(accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """Save model, optimizer, LR schedule, EMA and ``state`` at ``state["step"]``; keep the newest ``keep``."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['step']}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{state['step']}"
    main_proc = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if main_proc:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main_proc:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # complete checkpoints only ever appear under their final name
        for old in complete_checkpoints(output_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_training_state(folder: Path) -> dict:
    """The ``state`` dict saved with a checkpoint."""
    return json.loads((Path(folder) / STATE_FILE).read_text())
