"""The app's Evaluate tab (ui/evaluation_panel.py) on the bundled checkpoints, with tiny settings: the
numbers are finite, the per-step figure is drawn and closed, refusals say why, and Cancel stops the work."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines import SamplingCancelled
from ui import evaluation_panel as ev
from ui.errors import UserError
from ui.models import BUNDLED

DDPM, NCSN = (str(next(p for p in BUNDLED.values() if p.name == name)) for name in ("mnist-ddpm-cond", "mnist-ncsn"))
TINY = dict(num_samples=20, steps=4, nll_images=2)


def finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def test_vp_checkpoint_gets_every_measure_and_the_per_step_figure():
    r = ev.evaluate_checkpoint(DDPM, **TINY)
    n = r.numbers
    assert finite(n["fid"], n["fid_real"], n["kid"], n["kid_std"], n["precision"], n["recall"], n["seconds"])
    assert finite(n["inception_score"], n["inception_score_std"]) and 1.0 <= n["inception_score"] <= 10.0
    assert n["inception_score_splits"] == 1 and n["nfe"] == 4
    assert finite(n["bound_bpd"], n["bound_ci95"], n["ode_bpd"], n["ode_ci95"]) and n["ode_nfe"] > 0
    assert 0.5 < n["bound_bpd"] < 8 and 0.5 < n["ode_bpd"] < 8  # bits/dim of 8-bit digits: at most 8 for any sane model
    assert n["bound_ci95"] >= 0 and n["ode_ci95"] >= 0
    assert isinstance(r.image, Image.Image) and r.image.width > 100
    assert r.terms.shape == r.term_labels.shape and r.terms.shape[0] > 10 and np.isfinite(r.terms).all()
    text = r.markdown
    assert "Quick evaluation, 20 samples" in text and "indicative only" in text
    for measure in ("classifier-FID", "classifier-KID", "classifier IS", "variational bound (bits/dim)",
                    "probability-flow ODE (bits/dim)", "NFE"):
        assert measure in text
    assert not r.notes


def test_ve_checkpoint_gets_is_fid_and_the_ode_likelihood():
    r = ev.evaluate_checkpoint(NCSN, bound=False, **TINY)
    n = r.numbers
    assert finite(n["fid"], n["kid"], n["inception_score"], n["ode_bpd"], n["ode_ci95"]) and n["ode_nfe"] > 0
    assert n["bound_bpd"] is None and r.image is None and r.terms is None
    assert "probability-flow ODE (bits/dim)" in r.markdown and "variational bound" not in r.markdown


def test_ve_checkpoint_asked_for_the_bound_is_told_why_and_offered_the_ode():
    with pytest.raises(UserError, match=r"Variational bound: .*VE \(NCSN\) checkpoint.*no such chain.*probability-flow "
                                        r"ODE's: untick \"Variational bound\" and keep \"ODE likelihood\" ticked"):
        ev.check_request(NCSN, bound=True, ode=False, **TINY)
    assert ev.bound_available(NCSN) == (False, ev.BOUND_HELP_VE) and ev.bound_available(DDPM)[0] is True


def test_too_few_samples_for_the_inception_score_and_other_limits_are_refused():
    with pytest.raises(UserError, match=r"Inception Score needs at least 10 images \(one per class.*got 5"):
        ev.check_request(DDPM, num_samples=5)
    with pytest.raises(UserError, match="quick evaluation of at most 256 samples, got 1000.*evaluation.evaluate"):
        ev.check_request(DDPM, num_samples=1000)
    with pytest.raises(UserError, match="held-out digits must be between 1 and 32, got 0"):
        ev.check_request(DDPM, nll_images=0)
    with pytest.raises(UserError, match="unknown sampler 'nope'"):
        ev.check_request(DDPM, sampler="nope")
    with pytest.raises(UserError, match="number of samples must be a whole number"):
        ev.check_request(DDPM, num_samples=12.5)
    with pytest.raises(UserError, match=r"1000 network evaluations × 200 samples = 200,000 exceeds this server's budget"):
        ev.check_request(DDPM, num_samples=200, sampler="ddpm", steps=1000)


def test_a_conditional_only_checkpoint_has_no_unconditional_metrics(tmp_path):
    from diffusers import DDPMScheduler

    from pipelines.checkpoint import save_checkpoint
    from schedulers.parametrization import ModelFamily
    from tests.conftest import tiny_unet

    path = tmp_path / "cond-only"
    save_checkpoint(path, tiny_unet(num_class_embeds=10), ModelFamily(kind="vp", num_class_embeds=10),
                    dict(DDPMScheduler().config))
    with pytest.raises(UserError, match=r"class-conditional without an unconditional branch.*FID/KID/IS and the "
                                        r"unconditional log p\(x\) are not available.*--class_conditional"):
        ev.check_request(str(path), **TINY)


def test_a_solver_that_does_not_converge_is_reported_with_its_tolerance_and_nfe():
    r = ev.evaluate_checkpoint(DDPM, bound=False, num_samples=10, steps=2, nll_images=1, ode_max_nfe=5)
    assert r.numbers["ode_bpd"] is None and finite(r.numbers["fid"], r.numbers["inception_score"])
    assert any("ODE likelihood failed" in n and "did not converge at rtol=0.001, atol=0.001: 5 network evaluations spent"
               in n for n in r.notes)
    assert "did not converge" in r.markdown


def test_the_stream_ends_with_the_result_and_cancel_stops_the_worker():
    request = ev.check_request(NCSN, bound=False, num_samples=10, steps=2, nll_images=1)
    updates = list(ev.evaluate_stream(request, interval=0.05))
    assert updates[-1].kind == "done" and updates[-1].status.startswith("✅ Quick evaluation of 10 samples")
    assert all(u.kind == "tick" for u in updates[:-1])

    cancel = threading.Event()
    stream = ev.evaluate_stream(ev.check_request(DDPM, num_samples=64, steps=50), cancel=cancel, interval=0.01)
    assert next(stream).kind == "tick"
    stream.close()  # what Gradio does on Cancel
    assert cancel.is_set()
    assert not [t for t in threading.enumerate() if t.name == "evaluate" and t.is_alive()]
    with pytest.raises(SamplingCancelled):
        ev.run_evaluation(request, should_stop=lambda: True)


def test_figures_are_closed_once_drawn():
    from evaluation.quick import terms_figure

    fig = terms_figure(np.array([0.9, 0.1, 0.01, 1e-5]), np.array([0, 1, 2, 1000]), "t")
    image = ev.render_figure(fig)
    assert isinstance(image, Image.Image) and fig.axes == []  # drawn, then cleared
    assert ev.render_figure(None) is None


def test_the_handler_refuses_with_the_message_for_clients():
    import gradio as gr

    stream = ev.evaluate(NCSN, 20, "ddim", 4, True, True, 2, 0)
    status, _, _ = next(stream)
    assert status.startswith("⚠️ Variational bound:") and "ODE" in status
    with pytest.raises(gr.Error, match="VE \\(NCSN\\) checkpoint"):
        next(stream)


def test_the_app_offers_the_evaluate_endpoint():
    import app

    endpoint = app.build().get_api_info()["named_endpoints"]["/evaluate"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == [name for name, _ in ev.EVALUATE_INPUTS] and len(endpoint["returns"]) == 3
