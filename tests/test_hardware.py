"""Hardware on a CPU-only machine: the one device rule on every script (simulated CUDA/MPS), the device in
the app's status line and checkpoint description, batch limits from free device memory, a simulated
CUDA out-of-memory error in the app (message with a batch that fits, the next request served), and the
ZeroGPU decorator with a stand-in ``spaces`` module."""

from __future__ import annotations

import inspect
import pickle
import sys
import types

import pytest
import torch
from diffusers import DDPMScheduler

import pipelines.device as device_mod
from pipelines import DeviceError
from pipelines.checkpoint import save_checkpoint
from pipelines.device import add_device_arguments, batch_limit, device_from_args, free_memory, label
from schedulers.parametrization import ModelFamily
from schedulers.registry import LIMITS
from tests.conftest import tiny_unet
from ui import models, service, spaces_gpu
from ui.service import UserError


@pytest.fixture
def gpu_machine(monkeypatch):
    """A machine that says it has a CUDA GPU (and no MPS); nothing is ever moved there."""
    monkeypatch.delenv("SAMPLER_LAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Simulated")
    monkeypatch.setattr("pipelines.device._mps_available", lambda: False)


@pytest.fixture
def cpu_machine(monkeypatch):
    monkeypatch.delenv("SAMPLER_LAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pipelines.device._mps_available", lambda: False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hw") / "uncond"
    save_checkpoint(path, tiny_unet(), ModelFamily(kind="vp"), dict(DDPMScheduler().config))
    return str(path)


# ---- the device rule on every command line ----

def test_app_flags_follow_the_device_rule(gpu_machine, monkeypatch, capsys):
    import app

    args = app.parse_args([])
    assert args.device == torch.device("cuda") and args.dtype == torch.float32  # auto = CUDA first
    args = app.parse_args(["--device", "cuda", "--dtype", "fp16"])
    assert args.device == torch.device("cuda") and args.dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pipelines.device._mps_available", lambda: True)
    assert app.parse_args([]).device == torch.device("mps")  # then Apple's MPS
    assert app.parse_args(["--device", "cpu"]).device == torch.device("cpu")
    with pytest.raises(SystemExit):
        app.parse_args(["--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.parse_args(["--device", "cpu", "--dtype", "float16"])
    assert "float16 on the CPU" in capsys.readouterr().err


def test_app_on_a_zerogpu_space_means_cuda(gpu_machine, monkeypatch):
    import app

    monkeypatch.setitem(sys.modules, "spaces", types.ModuleType("spaces"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert app.parse_args([]).device == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # spaces did not expose a GPU: the CPU, not a crash
    assert app.parse_args([]).device == torch.device("cpu")


@pytest.mark.parametrize("module", ["evaluation.evaluate", "evaluation.table", "evaluation.likelihood",
                                    "benchmarks.bench_likelihood"])
def test_scripts_refuse_a_missing_device_before_loading_anything(module, cpu_machine, tmp_path):
    main = __import__(module, fromlist=["main"]).main
    argv = ["--checkpoint", str(tmp_path / "not-loaded")] if module.startswith("evaluation") else []
    with pytest.raises(SystemExit, match="--device cuda: this PyTorch sees no CUDA GPU"):
        main(argv + ["--device", "cuda"])
    with pytest.raises(SystemExit, match="--device mps"):
        main(argv + ["--device", "mps"])


@pytest.mark.parametrize("module", ["benchmarks.bench_samplers", "benchmarks.bench_app", "benchmarks.bench_training"])
def test_benchmarks_take_the_device_flag(module, cpu_machine, monkeypatch):
    main = __import__(module, fromlist=["main"]).main
    monkeypatch.setattr(sys, "argv", [module, "--device", "cuda"])
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main()


def test_training_takes_the_device_flag(cpu_machine, tmp_path, capsys):
    from training.train import parse_args

    assert parse_args(["--output_dir", str(tmp_path)]).device == "auto"
    assert parse_args(["--output_dir", str(tmp_path), "--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path), "--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_device_arguments_helper(gpu_machine):
    import argparse

    parser = add_device_arguments(argparse.ArgumentParser())
    assert device_from_args(parser.parse_args([])) == (torch.device("cuda"), torch.float32)
    assert device_from_args(parser.parse_args(["--dtype", "bf16", "--device", "cpu"])) == (torch.device("cpu"),
                                                                                          torch.bfloat16)
    with pytest.raises(SystemExit, match="--device must be one of"):
        device_from_args(parser.parse_args(["--device", "tpu"]))


# ---- where it ran: status line and checkpoint description ----

def test_status_line_names_the_device_and_a_reduced_precision(ckpt, gpu_machine):
    req = service.make_request(ckpt, "ddim", 5, None, 0, 4)
    line = service.status_line(req, 5, 1.0, None, label(torch.device("cuda"), torch.float16))
    assert line.endswith("· cuda (NVIDIA Simulated), float16") and "NFE 5" in line
    assert "2 decoder calls (batched)" in service.status_line(req, 5, 1.0, 2, "cpu")  # the other argument is kept
    assert label(torch.device("cpu")) == "cpu" and label(torch.device("mps"), torch.bfloat16) == "mps, bfloat16"


def test_a_run_reports_where_it_ran(ckpt):
    final = service.generate_blocking(service.make_request(ckpt, "ddim", 4, None, 0, 2))
    assert final.kind == "done" and final.status.endswith("· cpu")
    assert "runs on cpu" in service.describe(ckpt)


def test_cache_loads_on_its_device_in_its_dtype(ckpt, monkeypatch):
    cache = models.ModelCache(device="cpu", dtype="bfloat16")
    pipe = cache.get(ckpt)
    assert pipe.network_dtype == torch.bfloat16 and pipe.device.type == "cpu"
    monkeypatch.setattr(models, "CACHE", cache)
    assert "runs on cpu, bfloat16" in models.describe(ckpt)
    cache.configure("cpu", None)  # another precision: pipelines loaded before are dropped
    assert len(cache) == 0 and cache.get(ckpt).network_dtype == torch.float32
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        cache.configure("cpu", "float16")


def test_a_checkpoint_too_large_for_the_device_is_a_clear_message(ckpt, monkeypatch):
    def too_large(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(models.SamplerPipeline, "from_pretrained", too_large)
    with pytest.raises(UserError, match="does not fit in the free memory.*--dtype float16"):
        models.ModelCache().get(ckpt)


# ---- batch limits from free memory ----

def test_free_memory_reads_cuda_and_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 2**30, 80 * 2**30))
    assert free_memory(torch.device("cuda")) == 5 * 2**30
    assert free_memory(torch.device("cpu")) is None
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * 2**30, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * 2**30, raising=False)
    assert free_memory(torch.device("mps")) == 12 * 2**30

    def unreadable(device=None):
        raise RuntimeError("no CUDA context (ZeroGPU outside a GPU call)")

    monkeypatch.setattr(torch.cuda, "mem_get_info", unreadable)
    assert free_memory(torch.device("cuda")) is None and batch_limit(torch.device("cuda"), 1000, 64) == 64


def test_batch_limit_follows_free_memory_and_keeps_the_cpu_limit(ckpt, monkeypatch):
    pipe = service.CACHE.get(ckpt)
    assert models.batch_limit(ckpt) == LIMITS.app_max_batch  # CPU: unchanged
    service.make_request(ckpt, "ddim", 5, None, 0, LIMITS.app_max_batch)
    per_image = pipe.bytes_per_image()
    assert pipe.bytes_per_image(guided=True) > per_image > 0
    monkeypatch.setattr(device_mod, "free_memory", lambda device: 10 * per_image)  # a GPU with room for 10
    assert models.batch_limit(ckpt) == 8  # 80 % of it
    with pytest.raises(UserError, match=r"batch size: 16 images do not fit .* Use a batch size of 8 or less"):
        service.make_request(ckpt, "ddim", 5, None, 0, 16)
    assert service.make_request(ckpt, "ddim", 5, None, 0, 8).batch_size == 8
    monkeypatch.setattr(device_mod, "free_memory", lambda device: 1000 * 2**30)
    assert models.batch_limit(ckpt) == LIMITS.app_max_batch  # never above the app's own limit


def test_the_estimate_grows_with_resolution_and_precision():
    from diffusers import UNet2DModel

    from pipelines.sampling import estimate_bytes_per_image

    small = tiny_unet()
    big = UNet2DModel(**{**small.config, "sample_size": 64})
    assert estimate_bytes_per_image(big, (1, 64, 64)) > 10 * estimate_bytes_per_image(small, (1, 8, 8))
    assert estimate_bytes_per_image(small.to(torch.bfloat16), (1, 8, 8)) < estimate_bytes_per_image(tiny_unet(), (1, 8, 8))


# ---- a simulated CUDA out-of-memory error in the app ----

def _fail_above(pipe, fits: int, monkeypatch):
    real = pipe.unet.forward

    def forward(sample, timestep, *args, **kwargs):
        if sample.shape[0] > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
        return real(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", forward)


def test_the_app_survives_out_of_memory_and_serves_the_next_request(ckpt, monkeypatch):
    from ui import handlers as h

    pipe = service.CACHE.get(ckpt)
    _fail_above(pipe, 4, monkeypatch)
    failed = service.generate_blocking(service.make_request(ckpt, "ddim", 5, None, 0, 16))
    assert failed.kind == "error" and "a batch of 16 did not fit; try a batch size of 8 or less" in failed.status
    # with the device's free memory known, the message names a batch that fits that memory
    req = service.make_request(ckpt, "ddim", 5, None, 0, 16)
    monkeypatch.setattr(device_mod, "free_memory", lambda device: 5 * pipe.bytes_per_image())
    failed = service.generate_blocking(req)
    assert "try a batch size of 4 or less" in failed.status
    monkeypatch.setattr(device_mod, "free_memory", lambda device: None)
    done = service.generate_blocking(service.make_request(ckpt, "ddim", 5, None, 0, 4))  # the next request is served
    assert done.kind == "done" and len(done.images) == 4
    # through the Gradio handler: a clear error, then the app keeps answering
    with pytest.raises(Exception, match="try a batch size of 8 or less"):
        list(h.generate(ckpt, "ddim", 5, 0, 16, None, None, 0))
    outputs = list(h.generate(ckpt, "ddim", 5, 0, 4, None, None, 0))
    assert outputs[-1][2].startswith("✅")
    # compare too
    cmp = service.compare_blocking(ckpt, ["ddim"], "5", 0, 8, None, None, mode="steps")
    assert cmp.kind == "error" and "try a batch size of 4 or less" in cmp.status
    assert service.compare_blocking(ckpt, ["ddim"], "5", 0, 4, None, None, mode="steps").kind == "done"


def test_out_of_memory_outside_the_loop_is_reported_the_same_way(ckpt, monkeypatch):
    pipe = service.CACHE.get(ckpt)

    def decode(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory while decoding")

    monkeypatch.setattr(pipe, "to_images", decode)
    failed = service.generate_blocking(service.make_request(ckpt, "ddim", 3, None, 0, 6), trajectory_image=None)
    assert failed.kind == "error" and "try a batch size of 3 or less" in failed.status


# ---- ZeroGPU ----

class FakeSpaces(types.ModuleType):
    """Stands in for the ``spaces`` package: ``GPU(duration=…)(f)`` records the call and, like ZeroGPU's
    worker process, passes arguments and every result through pickle."""

    def __init__(self):
        super().__init__("spaces")
        self.calls, self.durations = [], []

    def GPU(self, func=None, *, duration=None):  # noqa: N802 - the package's name
        def wrap(f):
            self.durations.append(duration)

            if inspect.isgeneratorfunction(f):
                def wrapped(*args, **kwargs):
                    self.calls.append(f.__name__)
                    args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                    for item in f(*args, **kwargs):
                        yield pickle.loads(pickle.dumps(item))
            else:
                def wrapped(*args, **kwargs):
                    self.calls.append(f.__name__)
                    args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                    return pickle.loads(pickle.dumps(f(*args, **kwargs)))
            return wrapped

        return wrap(func) if func is not None else wrap


def test_gpu_decorator_is_a_no_op_off_zerogpu(monkeypatch):
    def f():
        return 1

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces())
    assert spaces_gpu.gpu(f) is f and not spaces_gpu.zero_gpu()  # spaces installed, not a ZeroGPU Space
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # a ZeroGPU variable but no spaces package
    assert spaces_gpu.gpu(f) is f
    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces())
    monkeypatch.setenv("SPACES_ZERO_GPU", "0")
    assert spaces_gpu.gpu(f) is f


def test_gpu_decorator_wraps_on_zerogpu(monkeypatch):
    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("SAMPLER_LAB_GPU_DURATION", "90")

    def square(x):
        return x * x

    def count(n):
        yield from range(n)

    wrapped = spaces_gpu.gpu(square)
    assert wrapped is not square and wrapped(3) == 9 and fake.calls == ["square"] and fake.durations == [90]
    assert wrapped.__zero_gpu__ and wrapped.__wrapped__ is square
    assert list(spaces_gpu.gpu(duration=30)(count)(3)) == [0, 1, 2] and fake.durations[-1] == 30


def test_the_sampling_entry_points_carry_the_decorator():
    import ui.evaluation_panel  # noqa: F401
    import ui.handlers  # noqa: F401

    for name in ("ui.sampling.run_on_device", "ui.sampling.compare", "ui.evaluation_panel.evaluate_stream",
                 "ui.handlers._live_quality"):
        assert name in spaces_gpu.DECORATED


def test_generation_works_through_a_zerogpu_worker(ckpt, monkeypatch):
    """Arguments and updates cross a process boundary on ZeroGPU: they must pickle, and the trajectory
    must be stored in the server's process (not in the worker's)."""
    from ui import sampling

    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setattr(sampling, "run_on_device", spaces_gpu.gpu(inspect.unwrap(sampling.run_on_device)))
    monkeypatch.setattr(sampling, "compare", spaces_gpu.gpu(inspect.unwrap(sampling.compare)))
    final = list(sampling.generate(service.make_request(ckpt, "ddim", 6, None, 0, 2), previews=2))[-1]
    assert fake.calls == ["run_on_device"] and final.kind == "done"
    assert final.run_id is not None and len(service.TRAJECTORIES.get(final.run_id)) > 0
    done = list(sampling.compare(ckpt, ["ddim"], "4", 0, 2, None, None, mode="steps"))[-1]
    assert fake.calls[-1] == "compare" and done.kind == "done"


def test_an_mps_only_failure_names_the_fix(ckpt, monkeypatch):
    pipe = service.CACHE.get(ckpt)

    def forward(*args, **kwargs):
        raise NotImplementedError("The operator 'aten::upsample_bicubic2d.out' is not currently implemented for the "
                                  "MPS device.")

    monkeypatch.setattr(pipe.unet, "forward", forward)
    failed = service.generate_blocking(service.make_request(ckpt, "ddim", 3, None, 0, 2))
    assert failed.kind == "error" and "PYTORCH_ENABLE_MPS_FALLBACK=1" in failed.status and "--device cpu" in failed.status
