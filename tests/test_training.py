"""training/train.py: both objectives end in a checkpoint the pipeline samples; the loss falls;
a run killed with SIGKILL resumes onto the uninterrupted trajectory; bad data and non-finite
losses stop with a clear message; two processes under ``accelerate launch`` stay in sync."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import SamplerPipeline
from training import train
from training.train import TrainingError, find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(block_out_channels=[8, 16], layers_per_block=1, down_block_types=["DownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_unet.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def base_args(out, config, *extra):
    return ["--output_dir", str(out), "--model_config", config, "--resolution", "8", "--train_batch_size", "16",
            "--lr_warmup_steps", "0", "--learning_rate", "2e-3", "--save_images_steps", "0", "--report_to", "none",
            "--no_progress", *extra]


def losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("objective,extra", [
    ("ddpm", ["--prediction_type", "v_prediction"]),
    ("ncsn", ["--no-class_conditional"]),
])
def test_each_objective_gives_a_checkpoint_the_pipeline_samples(tmp_path, tiny_config, objective, extra):
    out = tmp_path / objective
    assert train.main(base_args(out, tiny_config, "--objective", objective, "--max_train_steps", "6",
                                "--checkpointing_steps", "3", *extra)) == 0
    model = out / "model"
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "training_args.json", "README.md"):
        assert (model / name).exists(), name
    pipe = SamplerPipeline.from_pretrained(str(model))
    assert pipe.info.family.kind == ("vp" if objective == "ddpm" else "ve")
    assert pipe.info.training_args["objective"] == objective
    labels = dict(class_labels=[1, 2], guidance_scale=2.0) if objective == "ddpm" else {}
    if objective == "ddpm":
        assert pipe.info.family.num_classes == 10 and pipe.info.family.null_class_label == 10
        assert pipe.info.family.prediction_type == "v_prediction"
    for sampler, steps in (("ddim", 4), ("langevin", 2)):
        images = pipe(sampler, steps, batch_size=2, seed=0, output_type="np", **labels).images
        assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    card = (model / "README.md").read_text()
    assert "accelerate launch training/train.py" in card and "final loss" in card


def test_loss_falls_over_a_hundred_steps(tmp_path, tiny_config):
    out = tmp_path / "fall"
    train.main(base_args(out, tiny_config, "--max_train_steps", "120", "--checkpointing_steps", "0", "--no-use_ema"))
    log = losses(out)
    first = np.mean([log[s] for s in range(1, 11)])
    last = np.mean([log[s] for s in range(111, 121)])
    assert last < 0.6 * first, (first, last)


def _run(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "training" / "train.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_trajectory(tmp_path, tiny_config):
    steps, every = 300, 40
    ref = tmp_path / "ref"
    p = _run(base_args(ref, tiny_config, "--max_train_steps", str(steps), "--checkpointing_steps", str(every)))
    assert p.wait(timeout=600) == 0, p.stdout.read()

    run = tmp_path / "killed"
    p = _run(base_args(run, tiny_config, "--max_train_steps", str(steps), "--checkpointing_steps", str(every)))
    deadline = time.time() + 300
    while time.time() < deadline:
        log = run / "train_log.jsonl"
        if log.exists() and log.read_text().count("\n") >= 130:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    reached = max(losses(run))
    latest = find_checkpoint(run, "latest")
    saved = int(latest.name.split("-")[1])
    assert reached - saved < every + 5  # at most the steps since the last checkpoint are lost (+ polling slack)

    p = _run(base_args(run, tiny_config, "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
                       "--resume_from_checkpoint", "latest"))
    output = p.communicate(timeout=600)[0]
    assert p.returncode == 0, output
    assert f"resumed from {latest}" in output
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(saved + 1, steps + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6), s
    from safetensors.torch import load_file

    wa = load_file(ref / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_latest_never_picks_a_half_written_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "checkpoint-10").mkdir(parents=True)
    (root / "checkpoint-10" / train.STATE_FILE).write_text("{}")
    (root / "checkpoint-20").mkdir()  # killed before its state file was written
    (root / ".tmp-checkpoint-30").mkdir()  # killed while writing
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(root / "checkpoint-20"))


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_config, monkeypatch):
    calls = {"n": 0}
    real = train.ddpm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(train, "ddpm_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7 .*learning rate.*checkpoint-5"):
        train.main(base_args(out, tiny_config, "--max_train_steps", "20", "--checkpointing_steps", "5"))
    assert find_checkpoint(out, "latest").name == "checkpoint-5"


def _folder(tmp_path, mode="L", n=4, classes=("a", "b")):
    root = tmp_path / f"images-{mode}"
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (10, 10, 3) if mode == "RGB" else (10, 10),
                                                              dtype=np.uint8), mode=mode).save(root / c / f"{i}.png")
    return root


def test_image_folder_with_labels_trains(tmp_path, tiny_config):
    root = _folder(tmp_path)
    out = tmp_path / "folder"
    assert train.main(base_args(out, tiny_config, "--train_data_dir", str(root), "--max_train_steps", "2",
                                "--checkpointing_steps", "0")) == 0
    args = json.loads((out / "model" / "training_args.json").read_text())
    assert args["class_names"] == ["a", "b"] and args["num_train_images"] == 8


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("empty", "contains no images"),
    ("unreadable", "cannot read image"),
    ("channels", "channel"),
])
def test_bad_data_is_refused_before_training(tmp_path, tiny_config, case, match):
    extra = []
    if case == "missing":
        folder = tmp_path / "nope"
    elif case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "unreadable":
        folder = _folder(tmp_path)
        (folder / "a" / "broken.png").write_bytes(b"not an image at all")
    else:
        folder = _folder(tmp_path, mode="RGB")
        extra = ["--channels", "1"]
    out = tmp_path / f"out-{case}"
    with pytest.raises(TrainingError, match=match):
        train.main(base_args(out, tiny_config, "--train_data_dir", str(folder), "--max_train_steps", "2", *extra))
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_only_rank0_writes(tmp_path, tiny_config):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out = tmp_path / "ddp"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "training" / "train.py"),
           *base_args(out, tiny_config, "--max_train_steps", "6", "--checkpointing_steps", "3")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digests = {line.split()[1].rstrip("]"): line.split()[-1] for line in (proc.stdout + proc.stderr).splitlines()
               if "weights sha256" in line}
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert "steps of 16×2×1 images" in proc.stdout
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # written once per step, by rank 0 only
    ckpt = out / "checkpoints" / "checkpoint-6"
    # rank 0 writes the state (model, optimizer, LR schedule, EMA); each rank adds only accelerate's own RNG state
    assert sorted(p.name for p in ckpt.iterdir()) == ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", train.STATE_FILE,
                                                      "model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                      "random_states_1.pkl"]
    assert (out / "model" / "model_index.json").exists()


@pytest.mark.parametrize("distribution", ["log_uniform", "vp_uniform"])
def test_sigma_sampling_stays_in_range(distribution):
    from training.losses import sample_sigmas

    s = sample_sigmas(20000, 0.01, 50.0, torch.Generator().manual_seed(0), None, distribution).double()
    assert float(s.min()) >= 0.01 * (1 - 1e-5) and float(s.max()) <= 50.0 * (1 + 1e-5)
    median = float(s.median())
    if distribution == "log_uniform":  # log σ uniform: the median is the geometric mean √(σ_min σ_max)
        assert median == pytest.approx((0.01 * 50) ** 0.5, rel=0.12)  # s.e. of log-median ≈ 8.5/(2√N) = 3 %
    else:  # DDPM's uniform labels put most draws at σ ≥ 1
        assert float((s >= 1).double().mean()) > 0.65
    levels = sample_sigmas(1000, 0.01, 50.0, torch.Generator().manual_seed(0), num_levels=10)
    assert len(levels.unique()) == 10


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_timestep_sampling_covers_every_label_with_the_promised_density(distribution):
    from training.losses import sample_timesteps

    T = 1000
    t = sample_timesteps(40000, T, torch.Generator().manual_seed(0), distribution)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    middle = float(((t >= T // 4) & (t < 3 * T // 4)).double().mean())
    # the middle half: 1/2 for uniform labels; P(|n| < logit(3/4)) for logit-normal with m = 0, s = 1
    expected = 0.5 if distribution == "uniform" else math.erf(math.log(3.0) / math.sqrt(2))  # 0.728
    assert middle == pytest.approx(expected, abs=0.01)  # s.e. ≈ 0.0025
    if distribution == "logit_normal":  # m shifts the draws: m = 1 puts the median at T·sigmoid(1) ≈ 731
        shifted = sample_timesteps(40000, T, torch.Generator().manual_seed(0), distribution, logit_mean=1.0)
        assert float(shifted.double().median()) == pytest.approx(T * torch.sigmoid(torch.tensor(1.0)).item(), abs=10)
        narrow = sample_timesteps(40000, T, torch.Generator().manual_seed(0), distribution, logit_std=0.5)
        share = float(((narrow >= T // 4) & (narrow < 3 * T // 4)).double().mean())
        assert share == pytest.approx(math.erf(math.log(3.0) / (0.5 * math.sqrt(2))), abs=0.01)  # s = 0.5: 0.972
    again = sample_timesteps(40000, T, torch.Generator().manual_seed(0), distribution)
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_timesteps(4, T, torch.Generator(), "cosine")


def test_logit_normal_training_draws_its_labels_and_records_the_setting(tmp_path, tiny_config, monkeypatch):
    from training import losses

    drawn = []
    real = losses.sample_timesteps

    def spy(*args, **kwargs):
        drawn.append(args[3:])
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "sample_timesteps", spy)
    out = tmp_path / "ln"
    assert train.main(base_args(out, tiny_config, "--max_train_steps", "3", "--checkpointing_steps", "3",
                                "--timestep_sampling", "logit_normal", "--logit_mean", "-0.5", "--logit_std", "0.7")) == 0
    assert drawn and all(d == ("logit_normal", -0.5, 0.7) for d in drawn), drawn  # every step's labels
    args = json.loads((out / "model" / "training_args.json").read_text())
    assert args["timestep_sampling"] == "logit_normal" and args["logit_mean"] == -0.5
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", str(tmp_path / "bad"), "--logit_std", "0"])
