"""ZeroGPU: the ``spaces`` package's ``GPU`` decorator around the sampling calls on a ZeroGPU Space,
a no-op everywhere else (a laptop, a CPU-basic Space, a Space with its own GPU).

On a ZeroGPU Space a GPU is attached only while a function decorated with ``spaces.GPU`` runs, and
``spaces`` must see those functions at startup; so the decision is made when a module is imported:

    from ui.spaces_gpu import gpu

    @gpu                      # or @gpu(duration=180)
    def sample(request): ...

A ZeroGPU Space is recognised as the ``spaces`` package recognises it: the environment variable
``SPACES_ZERO_GPU`` is set (truthy) and ``spaces`` is importable. ``SAMPLER_LAB_GPU_DURATION``
(seconds, default 120) is the longest a call may hold the GPU. What runs under the decorator may
run in another process than the web server (ZeroGPU's worker), so a decorated function must take
and return plain, picklable values and must not rely on changing module state; see
:func:`ui.sampling.generate`, which stores the trajectory in the server's process.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

DEFAULT_DURATION = 120
DECORATED: list[str] = []  # qualified names of every function given to :func:`gpu` (whether it is active or not)


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _spaces():
    """The ``spaces`` module, or None where it is not installed (or fails to import)."""
    try:
        import spaces  # noqa: PLC0415 - optional, only on Hugging Face Spaces
    except Exception:  # noqa: BLE001 - any import failure means: not on ZeroGPU
        return None
    return spaces


def zero_gpu() -> bool:
    """True on a ZeroGPU Space: ``SPACES_ZERO_GPU`` is set and the ``spaces`` package imports."""
    return _truthy(os.environ.get("SPACES_ZERO_GPU")) and _spaces() is not None


def gpu_duration() -> int:
    """Seconds one decorated call may hold the GPU (``SAMPLER_LAB_GPU_DURATION``, default 120)."""
    try:
        return max(1, int(os.environ.get("SAMPLER_LAB_GPU_DURATION", DEFAULT_DURATION)))
    except ValueError:
        return DEFAULT_DURATION


def gpu(func: Optional[Callable] = None, *, duration: Optional[int] = None):
    """``spaces.GPU(duration=…)(func)`` on a ZeroGPU Space, ``func`` itself elsewhere.

    Usable bare (``@gpu``) or with a duration (``@gpu(duration=180)``). Generators stay generators
    (``spaces.GPU`` streams their updates).
    """

    def wrap(f: Callable) -> Callable:
        DECORATED.append(f"{f.__module__}.{f.__qualname__}")
        if not zero_gpu():
            return f
        seconds = duration if duration is not None else gpu_duration()
        wrapped = _spaces().GPU(duration=seconds)(f)
        if wrapped is not f:
            functools.update_wrapper(wrapped, f, updated=())
            wrapped.__zero_gpu__ = True
        return wrapped

    return wrap(func) if func is not None else wrap
