"""One device rule for the app, the pipeline, evaluation, training and the benchmarks.

    --device auto|cpu|cuda|mps      auto = CUDA if available, else Apple's MPS, else the CPU
    --dtype float32|float16|bfloat16  the network's precision; samplers always run in float32

The network may run in half precision; the sampler state x, every scheduler formula (σ down to
1e-3, ᾱ near 1) and the random draws stay in float32 on a CPU generator, so a seed gives the same
images on any device (up to the network's own rounding).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or precision this machine cannot run; the message names what to change."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """The device for ``name``: ``auto`` picks CUDA, else MPS, else CPU; an unavailable one is a clear error.

    ``SAMPLER_LAB_DEVICE`` overrides ``auto`` (e.g. to keep a GPU machine's app on the CPU).
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = os.environ.get("SAMPLER_LAB_DEVICE", "auto").strip().lower() or "auto"
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); "
                          "use --device auto or cpu, or install a CUDA build of PyTorch")
    if kind == "mps" and not _mps_available():
        raise DeviceError("--device mps: Apple's Metal backend is not available here; use --device auto or cpu")
    return torch.device(name)


def resolve_dtype(name: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The network's dtype on ``device``; half precision where the device cannot run it is refused."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = (name or "float32").strip().lower()
        if key not in DTYPES:
            raise DeviceError(f"--dtype must be one of float32, float16, bfloat16, got {name!r}")
        dtype = DTYPES[key]
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError("--dtype float16 on the CPU: many CPU kernels have no float16 version and the rest are slow; "
                          "use --dtype float32 (or bfloat16 on a CPU that supports it)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
                          "(it needs compute capability 8.0+); use --dtype float16 or float32")
    return dtype


def _device_name(device: torch.device) -> str:
    """'cuda (NVIDIA H200)'; just 'cuda' where the name cannot be read (e.g. outside a ZeroGPU call)."""
    name = device.type
    if device.type == "cuda":
        try:
            name += f" ({torch.cuda.get_device_name(device)})"
        except Exception:  # noqa: BLE001 - a name is a nicety, never a failure
            pass
    return name


def describe(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'cuda (NVIDIA H200), float16 network' — for benchmark headers."""
    name = _device_name(device)
    if device.type == "cpu":
        name += f" ({torch.get_num_threads()} threads)"
    precision = str(dtype).replace("torch.", "")
    return f"{name}, {precision} network"


def label(device: torch.device, dtype: Optional[torch.dtype] = torch.float32) -> str:
    """A short label for status lines: 'cpu', 'cuda (NVIDIA H200)', 'mps, bfloat16' (the dtype only when not float32)."""
    text = _device_name(torch.device(device))
    if dtype is not None and dtype != torch.float32:
        text += ", " + str(dtype).replace("torch.", "")
    return text


def add_device_arguments(parser, default: str = "auto"):
    """``--device`` and ``--dtype`` on a script's argparse parser (the one device rule)."""
    parser.add_argument("--device", default=default,
                        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps; "
                             "SAMPLER_LAB_DEVICE overrides auto")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="precision of the network (the samplers always run in float32)")
    return parser


def device_from_args(args) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from parsed ``--device``/``--dtype``; a device this machine lacks exits with the reason."""
    try:
        device = resolve_device(getattr(args, "device", "auto"))
        return device, resolve_dtype(getattr(args, "dtype", "float32"), device)
    except DeviceError as err:
        raise SystemExit(f"error: {err}") from None


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA's (or MPS's) out-of-memory errors."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def is_mps_unsupported(err: BaseException) -> bool:
    """True for PyTorch's "operator … is not currently implemented for the MPS device" errors."""
    return isinstance(err, (NotImplementedError, RuntimeError)) and "mps" in str(err).lower() and (
        "not currently implemented" in str(err).lower() or "not implemented" in str(err).lower())


MPS_UNSUPPORTED = ("an operation of this model is not implemented on Apple's MPS backend; start with "
                   "PYTORCH_ENABLE_MPS_FALLBACK=1 (it runs on the CPU) or with --device cpu")


def free_memory(device: torch.device) -> Optional[int]:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``) or, on Apple's MPS, what the Metal driver
    recommends minus what it holds; None on the CPU (its memory is not the limit this guards) or where
    it cannot be read (e.g. a ZeroGPU Space outside a GPU call)."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        if device.type == "mps":
            mps = torch.mps
            return max(0, int(mps.recommended_max_memory()) - int(mps.driver_allocated_memory()))
    except Exception:  # noqa: BLE001 - no reading: fall back to the fixed limits
        return None
    return None


def batch_limit(device: torch.device, bytes_per_image: Optional[int], cap: int, headroom: float = 0.8) -> int:
    """The largest batch to allow on ``device``: ``cap`` on the CPU (unchanged), else what ``headroom`` of the
    free memory holds at ``bytes_per_image`` (at least 1, at most ``cap``)."""
    free = free_memory(torch.device(device))
    if free is None or not bytes_per_image:
        return cap
    return max(1, min(cap, int(headroom * free // bytes_per_image)))


def fitting_batch(batch_size: int, device: torch.device, bytes_per_image: Optional[int] = None) -> int:
    """A batch size that should fit: from the free memory when the cost of an image is known, else half."""
    free = free_memory(device)
    if free is not None and bytes_per_image:
        return max(1, min(batch_size - 1, int(0.8 * free // bytes_per_image)))
    return max(1, batch_size // 2)


def out_of_memory_message(batch_size: int, device: torch.device, bytes_per_image: Optional[int] = None) -> str:
    """What to tell a user whose batch did not fit."""
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a simulated device, or a driver that already gave up
            pass
    fit = fitting_batch(batch_size, device, bytes_per_image)
    return (f"out of memory on {device.type}: a batch of {batch_size} did not fit; try a batch size of {fit} or less "
            "(or --dtype float16/bfloat16 for the network)")
