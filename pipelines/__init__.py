"""One sampling pipeline for every sampler and every checkpoint family."""

from .checkpoint import CheckpointError, CheckpointInfo, inspect_checkpoint, save_checkpoint
from .device import DeviceError, resolve_device, resolve_dtype
from .sampling import (
    SampleOutput, SamplerPipeline, SamplingCancelled, SamplingDivergedError, SamplingOutOfMemoryError, make_grid,
)

__all__ = [
    "CheckpointError", "CheckpointInfo", "DeviceError", "SampleOutput", "SamplerPipeline", "SamplingCancelled",
    "SamplingDivergedError", "SamplingOutOfMemoryError", "inspect_checkpoint", "make_grid", "resolve_device",
    "resolve_dtype", "save_checkpoint",
]
