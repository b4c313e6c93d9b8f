"""One sampling pipeline for every sampler and every checkpoint family."""

from .checkpoint import CheckpointError, CheckpointInfo, inspect_checkpoint, save_checkpoint
from .sampling import SampleOutput, SamplerPipeline, SamplingCancelled, SamplingDivergedError, make_grid

__all__ = [
    "CheckpointError", "CheckpointInfo", "SampleOutput", "SamplerPipeline", "SamplingCancelled",
    "SamplingDivergedError", "inspect_checkpoint", "make_grid", "save_checkpoint",
]
