"""The device rule, half-precision networks with float32 samplers, and the out-of-memory message (on the CPU)."""

from __future__ import annotations

import pytest
import torch

from pipelines import DeviceError, SamplerPipeline, SamplingOutOfMemoryError, resolve_device, resolve_dtype
from pipelines.device import describe, is_out_of_memory
from schedulers.parametrization import ModelFamily
from tests.conftest import tiny_unet


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("SAMPLER_LAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pipelines.device._mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr("pipelines.device._mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    monkeypatch.setenv("SAMPLER_LAB_DEVICE", "cpu")  # a deployment can pin auto to the CPU
    assert resolve_device("auto") == torch.device("cpu")


def test_unavailable_or_unknown_devices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pipelines.device._mps_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU.*--device auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="Metal"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="--device must be one of"):
        resolve_device("tpu")
    assert resolve_device("CPU") == torch.device("cpu")


def test_dtype_rule():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32 and resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype(None, cpu) is torch.float32
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(DeviceError, match="--dtype must be one of"):
        resolve_dtype("int8", cpu)
    assert resolve_dtype("float16", torch.device("cuda")) is torch.float16  # no GPU needed to decide that
    assert "float32 network" in describe(cpu)


def _pipe(dtype=torch.float32):
    unet = tiny_unet().to(dtype)
    return SamplerPipeline(unet, ModelFamily(kind="vp"), sample_shape=(1, 8, 8))


def test_a_bfloat16_network_drives_float32_samplers():
    ref = _pipe()("ddim", 10, batch_size=2, seed=3, output_type="pt", scheduler_params={"clip_sample": False}).images
    half = _pipe(torch.bfloat16)("ddim", 10, batch_size=2, seed=3, output_type="pt",
                                 scheduler_params={"clip_sample": False}).images
    assert half.dtype == torch.float32 and torch.isfinite(half).all()  # the sampler state stays float32
    assert (half - ref).abs().max() < 0.1 * ref.abs().max()  # same seed, same images up to the network's rounding


def test_from_pretrained_takes_device_and_dtype_names(ddpm_checkpoint):
    pipe = SamplerPipeline.from_pretrained(str(ddpm_checkpoint), device="auto" if not torch.cuda.is_available() else "cpu",
                                           torch_dtype="bfloat16")
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16 and pipe.device.type == "cpu"
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        SamplerPipeline.from_pretrained(str(ddpm_checkpoint), device="cpu", torch_dtype="float16")


class OutOfMemoryNet(torch.nn.Module):
    """Fails like a GPU whose memory is full once the batch is larger than ``fits``."""

    def __init__(self, fits: int):
        super().__init__()
        self.fits = fits
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, class_labels=None):
        if sample.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return type("Out", (), {"sample": sample * 0})()


def test_out_of_memory_becomes_a_message_with_a_batch_that_fits():
    pipe = SamplerPipeline(OutOfMemoryNet(fits=4), ModelFamily(kind="vp"), sample_shape=(1, 8, 8))
    with pytest.raises(SamplingOutOfMemoryError, match=r"batch of 16 did not fit; try a batch size of 8 or less"):
        pipe("ddim", 3, batch_size=16, seed=0)
    assert pipe("ddim", 3, batch_size=4, seed=0).nfe == 3  # the pipeline keeps working
    assert is_out_of_memory(RuntimeError("MPS backend out of memory")) and not is_out_of_memory(RuntimeError("shape"))
