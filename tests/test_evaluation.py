"""Evaluation: metrics on cases with known answers, the shipped classifier, the bundled
checkpoints under every sampler, and the evaluate / table commands end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from evaluation.classifier import DEFAULT_PATH, accuracy, load_classifier
from evaluation.evaluate import main as evaluate_main
from evaluation.evaluate import real_digits
from evaluation.metrics import class_histogram, frechet_distance, kernel_distance, precision_recall
from evaluation.table import ROWS, run
from pipelines import SamplerPipeline
from pipelines.checkpoint import save_checkpoint
from schedulers import SAMPLERS
from schedulers.parametrization import ModelFamily
from tests.conftest import tiny_unet
from ui.service import BUNDLED

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def test_a_set_against_itself():
    x = torch.randn(500, 16, generator=G(0), dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6
    assert precision_recall(x, x) == (1.0, 1.0)
    kid, kid_std = kernel_distance(x, x)  # unbiased MMD² over random subsets: zero within its spread
    assert abs(kid) < 3 * kid_std
    y = torch.randn(500, 16, generator=G(1), dtype=torch.float64) + 1.0
    kid_far, std_far = kernel_distance(x, y)
    assert kid_far > 10 * std_far


def test_two_gaussians_give_the_analytic_frechet_distance():
    """N(μ₁, diag s₁²) vs N(μ₂, diag s₂²): ‖μ₁ − μ₂‖² + Σ_d (s₁ − s₂)²."""
    d, n = 4, 40000
    mu1, mu2 = torch.zeros(d), torch.tensor([1.0, -0.5, 0.0, 2.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 0.2])
    a = mu1 + s1 * torch.randn(n, d, generator=G(1))
    b = mu2 + s2 * torch.randn(n, d, generator=G(2))
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_precision_and_recall_see_missing_modes_and_outliers():
    real = torch.cat([torch.randn(300, 2, generator=G(3)), torch.randn(300, 2, generator=G(4)) + 20])
    half = torch.randn(300, 2, generator=G(5))  # covers one of the two real modes
    precision, recall = precision_recall(real, half)
    assert precision > 0.9 and 0.4 < recall < 0.6
    far = torch.randn(300, 2, generator=G(6)) + 100
    assert precision_recall(real, far) == (0.0, 0.0)


def test_class_histogram():
    assert class_histogram(torch.tensor([0, 0, 1, 9])) == [0.5, 0.25] + [0.0] * 7 + [0.25]


def test_the_shipped_classifier_classifies_held_out_digits():
    model = load_classifier()
    x, y = real_digits("test", 1000)
    acc = accuracy(model, x, y)
    assert acc >= 0.97
    reported = json.loads((DEFAULT_PATH / "metrics.json").read_text())["held_out_accuracy"]
    assert acc == pytest.approx(reported, abs=1e-6)
    noise = torch.rand(200, 1, 32, 32, generator=G(0)) * 2 - 1
    assert accuracy(model, noise, torch.zeros(200, dtype=torch.long)) < 0.9  # not a constant "0" answer


@pytest.mark.slow
@pytest.mark.parametrize("label", list(BUNDLED))
def test_bundled_checkpoints_sample_under_every_sampler(label):
    pipe = SamplerPipeline.from_pretrained(str(BUNDLED[label]))
    assert (pipe.info.image_shape if pipe.info.is_latent else (1, pipe.info.sample_size, pipe.info.sample_size)) == (1, 32, 32)
    card = (BUNDLED[label] / "README.md").read_text()
    assert "accelerate launch training/train.py" in card and "training time" in card and "final loss" in card
    weights = pipe.info.unet_path / "diffusion_pytorch_model.safetensors"  # unet/ or transformer/, as the loader found it
    # small enough for git and a Space: under 20 MiB (the largest, the latent UNet, is 17.7 MiB; the Hub
    # stores files over 10 MB with LFS, which a Space's git push of either latent model needs anyway)
    assert weights.stat().st_size < 20 * 2**20
    for name in SAMPLERS:
        kwargs = dict(class_labels=[3, 7], guidance_scale=3.0) if pipe.family.is_conditional else {}
        steps = SAMPLERS[name].min_steps + 1
        images = pipe(name, steps, batch_size=2, seed=0, output_type="np", **kwargs).images
        assert images.shape == (2, 32, 32, 1) and math.isfinite(float(images.sum()))


@pytest.fixture(scope="module")
def tiny_cond(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "cond"
    save_checkpoint(path, tiny_unet(num_class_embeds=11), ModelFamily(kind="vp", num_class_embeds=11, null_class_label=10),
                    dict(DDPMScheduler().config))
    return str(path)


def test_evaluate_command_end_to_end(tiny_cond, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert evaluate_main(["--checkpoint", tiny_cond, "--sampler", "ddim", "--steps", "3", "--num_samples", "40",
                          "--batch_size", "16", "--class_conditional", "--guidance_scale", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FID" in text and "real vs real" in text and "accuracy on requested digits" in text
    report = json.loads(out.read_text())
    assert report["report"]["num_samples"] == 40 and report["real_vs_real"]["num_samples"] == 40
    assert report["report"]["fid"] > report["real_vs_real"]["fid"]  # an untrained network is worse than real digits
    assert "IS " in text and report["report"]["inception_score_splits"] == 1  # 40 samples: one split of ≥ 10
    assert 1.0 <= report["report"]["inception_score"] <= 10.0 and report["real_vs_real"]["inception_score"] is not None
    if "inception_is" not in report["report"]["extra"]:  # no Inception weights here: one note, no crash
        assert any(n.startswith("torchmetrics Inception IS/FID skipped") for n in report["report"]["extra"]["notes"])


def test_evaluate_adds_the_likelihood_of_held_out_digits(tiny_cond, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert evaluate_main(["--checkpoint", tiny_cond, "--sampler", "ddim", "--steps", "2", "--num_samples", "10",
                          "--batch_size", "10", "--nll", "both", "--nll_images", "2", "--nll_stride", "100",
                          "--nll_rtol", "1e-2", "--no_inception", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NLL bound" in text and "NLL ODE" in text and "bits/dim" in text
    nll = json.loads(out.read_text())["report"]["extra"]["nll"]
    assert nll["bound"]["num_images"] == 2 and nll["ode"]["num_images"] == 2 and "per_image_bpd" not in nll["ode"]
    assert len(nll["bound"]["terms_bpd"]) == nll["bound"]["network_evaluations_per_image"] + 1


def test_inception_score_splits_too_many_for_the_samples_is_a_clear_error(tiny_cond):
    with pytest.raises(ValueError, match="needs at least 100 images"):
        evaluate_main(["--checkpoint", tiny_cond, "--sampler", "ddim", "--steps", "2", "--num_samples", "20",
                       "--batch_size", "20", "--is_splits", "10", "--no_inception"])


def test_table_writes_markdown_csv_plot_and_resumes(tiny_cond, tmp_path):
    out = tmp_path / "table"
    rows = [r for r in ROWS if r[1] in ("ddim", "langevin")]
    first = run(tiny_cond, 20, out, nfes=(5, 12), rows=rows, batch_size=20)
    assert set(first["cells"]) == {f"{r[0]}|{n}" for r in rows for n in (5, 12)}
    for suffix in (".md", ".csv", ".png", ".json"):
        assert out.with_suffix(suffix).exists()
    md = out.with_suffix(".md").read_text()
    assert "DDIM η=1" in md and "real vs real" in md
    before = out.with_suffix(".json").read_text()
    run(tiny_cond, 20, out, nfes=(5, 12), rows=rows, batch_size=20)  # everything is cached: nothing recomputed
    assert json.loads(out.with_suffix(".json").read_text())["cells"] == json.loads(before)["cells"]


def test_table_remakes_cells_made_with_other_sampler_defaults(tiny_cond, tmp_path, monkeypatch):
    """A cell is reused only if it was made with the same resolved sampler setting: when a sampler's
    registry defaults change, a resumed table remakes its cells instead of showing stale figures."""
    from schedulers import registry

    out = tmp_path / "table"
    rows = [r for r in ROWS if r[1] == "langevin"][:1]
    first = run(tiny_cond, 20, out, nfes=(6,), rows=rows, batch_size=20)
    cell = first["cells"][f"{rows[0][0]}|6"]
    assert cell["setting"]["params"]["delta"] == registry.get_spec("langevin").defaults()["delta"]
    spec = registry.get_spec("langevin")
    changed = dict(spec.defaults(), delta=spec.defaults()["delta"] / 2)
    monkeypatch.setattr(type(spec), "defaults", lambda self: dict(changed) if self.name == "langevin" else
                        {p.name: p.default for p in self.params})
    second = run(tiny_cond, 20, out, nfes=(6,), rows=rows, batch_size=20)
    remade = second["cells"][f"{rows[0][0]}|6"]
    assert remade["setting"]["params"]["delta"] == changed["delta"] and remade["fid"] != cell["fid"]


def test_table_is_and_nll_columns_resume_tables_made_before_them(tiny_cond, tmp_path):
    """A table whose cells predate IS resumes unchanged for FID; asking for IS recomputes just those cells."""
    out = tmp_path / "table"
    rows = [r for r in ROWS if r[1] == "ddim"][:1]
    run(tiny_cond, 20, out, nfes=(3,), rows=rows, batch_size=20)
    store = out.with_suffix(".json")
    old = json.loads(store.read_text())
    for cell in old["cells"].values():  # the cells as tables made before IS stored them
        for key in ("inception_score", "inception_score_std", "inception_score_splits"):
            cell.pop(key)
    store.write_text(json.dumps(old))
    assert run(tiny_cond, 20, out, nfes=(3,), rows=rows, batch_size=20)["cells"] == old["cells"]  # nothing recomputed
    assert "IS" not in out.with_suffix(".md").read_text()
    new = run(tiny_cond, 20, out, nfes=(3,), rows=rows, batch_size=20, metrics=("fid", "is"), nll="bound",
              nll_options={"num_images": 2, "stride": 100})
    cell = new["cells"][f"{rows[0][0]}|3"]
    assert cell["inception_score"] is not None and cell["fid"] == pytest.approx(old["cells"][f"{rows[0][0]}|3"]["fid"])
    assert new["meta"] == old["meta"] and new["likelihood"]["bound"]["stride"] == 100
    md = out.with_suffix(".md").read_text()
    assert "FID " in md and " · IS " in md and "NLL, variational bound" in md and "bits/dim" in md
    header = out.with_suffix(".csv").read_text().splitlines()[0]
    assert header == "sampler,FID NFE≈3,IS NFE≈3"


def test_the_committed_tables_still_load_and_render(tmp_path):
    from evaluation.table import write_outputs

    for name in ("sampler-table", "ncsn-table"):
        results = json.loads((Path(__file__).resolve().parents[1] / "docs" / f"{name}.json").read_text())
        assert set(results["meta"]) <= {"checkpoint", "weights_sha256", "num_samples", "seed", "class_conditional",
                                        "guidance_scale"}  # the key a resumed run compares: nothing added
        write_outputs(results, tmp_path / name, nfes=(10, 20, 50, 100), metrics=("fid", "is"))
        md = (tmp_path / f"{name}.md").read_text()
        assert "FID " in md and "IS –" in md  # cells from before IS show a dash, not an error


def test_table_refuses_to_resume_on_other_weights(tiny_cond, tmp_path):
    """A checkpoint retrained in place keeps its path; its cached cells must not be reused."""
    folder = tmp_path / "ck"
    shutil.copytree(tiny_cond, folder)
    out = tmp_path / "table"
    rows = [r for r in ROWS if r[1] == "ddim"][:1]
    run(str(folder), 20, out, nfes=(5,), rows=rows, batch_size=20)
    unet = UNet2DModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.1)
    unet.save_pretrained(folder / "unet")
    with pytest.raises(SystemExit, match="other weights"):
        run(str(folder), 20, out, nfes=(5,), rows=rows, batch_size=20)


@pytest.mark.slow
def test_two_processes_share_the_generation(tiny_cond, tmp_path):
    """Under ``accelerate launch`` each process samples its own batches; rank 0 gathers them all."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    args = ["-m", "evaluation.evaluate", "--checkpoint", tiny_cond, "--sampler", "ddim", "--steps", "3", "--num_samples", "40",
            "--batch_size", "8", "--class_conditional"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.json"
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", *args, "--json", str(two)],
                          cwd=root, env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("real vs real at the same n") == 1  # only rank 0 reports
    one = tmp_path / "one.json"
    assert evaluate_main([*args[2:], "--json", str(one)]) == 0
    a, b = json.loads(one.read_text())["report"], json.loads(two.read_text())["report"]
    assert b["num_samples"] == 40 and b["histogram"] == a["histogram"] and b["accuracy"] == a["accuracy"]
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-2)


def test_sampler_grid_command(tiny_cond, tmp_path):
    from PIL import Image

    from evaluation.sampler_grid import main as grid_main

    out = tmp_path / "grid.png"
    assert grid_main(["--checkpoint", tiny_cond, "--out", str(out), "--samplers", "ddim,pf_ode", "--num_images", "4"]) == 0
    img = Image.open(out)
    assert img.width > img.height > 100  # two labelled rows of four enlarged images
