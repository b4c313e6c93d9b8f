"""The Evaluate tab: a quick evaluation of the loaded checkpoint, every measure side by side.

Classifier-FID, KID and Inception Score of a small batch of unconditional samples (each beside real
digits at the same count), and the likelihood of a few held-out digits in bits/dim: the variational
bound (VP checkpoints, with its per-step terms as a figure) and the probability-flow ODE (both
families). Labelled "quick evaluation, N samples": the batches are small, so the figures are
indicative, not the README's. The work is ``evaluation.quick.quick_evaluate``; this module validates
the request, runs it in a worker thread that Cancel can stop, and renders the result.

- :func:`check_request`: every refusal, as :class:`~ui.errors.UserError` (a VE checkpoint asked for
  the bound is told why and offered the ODE; a conditional-only checkpoint has no unconditional
  samples or log p(x); too few samples for the Inception Score; limits on samples, digits, work).
- :func:`run_evaluation`: the evaluation itself, plain Python (the tests call it directly).
- :func:`evaluate_stream`: the same in a worker thread, yielding status ticks; closing the
  generator (Gradio's Cancel) stops the worker at its next network call.
- :func:`evaluate`: the Gradio handler (``gradio`` is imported only there).
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from schedulers.registry import SAMPLERS

from .errors import UserError
from .models import CACHE, DEFAULT_CHECKPOINT
from .spaces_gpu import gpu
from .requests import _number, make_request, work_budget

log = logging.getLogger("sampler_lab")

SAMPLES = (10, 256)  # quick: at least one image per class for the Inception Score, at most a few batches
DEFAULT_SAMPLES = 64
NLL_IMAGES = (1, 32)  # held-out digits for the likelihood
DEFAULT_NLL_IMAGES = 8
BOUND_STRIDE = 20  # the bound's terms: blocks growing to 20 steps, rescaled (an unbiased estimate of all T terms)
ODE_TOL = 1e-3  # rtol = atol of the quick ODE solve (the README's figures use 1e-5)
ODE_MAX_NFE = 2000  # evaluations one quick ODE solve may spend before it counts as not converging
NUM_CLASSES = 10  # the bundled classifier's

HELP_SAMPLES = (f"quick evaluation: {SAMPLES[0]}–{SAMPLES[1]} samples (FID/KID/IS of so few are biased and noisy; each is "
                "shown beside real digits at the same count)")
HELP_NLL = f"held-out digits scored by the bound and the ODE ({NLL_IMAGES[0]}–{NLL_IMAGES[1]})"
VE_OFFER = "untick \"Variational bound\" and keep \"ODE likelihood\" ticked (python -m evaluation.likelihood --method ode)."

EVALUATE_INPUTS = [("checkpoint", DEFAULT_CHECKPOINT), ("num_samples", DEFAULT_SAMPLES), ("sampler", "ddim"), ("steps", None),
                   ("bound", True), ("ode", True), ("nll_images", DEFAULT_NLL_IMAGES), ("seed", 0)]


@dataclass
class EvalRequest:
    """A validated request of the Evaluate tab."""

    checkpoint: str
    num_samples: int
    sampler: str
    steps: int
    nfe: int
    bound: bool
    ode: bool
    nll_images: int
    seed: int
    bound_stride: int = BOUND_STRIDE
    ode_tol: float = ODE_TOL
    ode_max_nfe: int = ODE_MAX_NFE

    @property
    def likelihood(self) -> tuple:
        return tuple(m for m, on in (("bound", self.bound), ("ode", self.ode)) if on)


@dataclass
class PanelResult:
    """What the tab shows: the Markdown table, its rows, the per-step figure (a PNG image; the matplotlib
    figure is closed once drawn) and the figures as numbers (None where not computed)."""

    markdown: str
    rows: list
    image: object  # PIL image of the bound's per-step terms, or None without a bound
    numbers: dict
    terms: Optional[np.ndarray] = None
    term_labels: Optional[np.ndarray] = None
    notes: list = field(default_factory=list)
    seconds: float = 0.0


def _flag(value, name: str) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off", ""):
            return False
        raise UserError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def check_request(checkpoint, num_samples=DEFAULT_SAMPLES, sampler="ddim", steps=None, bound=True, ode=True,
                  nll_images=DEFAULT_NLL_IMAGES, seed=0, *, bound_stride: int = BOUND_STRIDE, ode_tol: float = ODE_TOL,
                  ode_max_nfe: int = ODE_MAX_NFE) -> EvalRequest:
    """Validate an evaluation request on the server side; every refusal is a :class:`UserError` saying what to do."""
    from evaluation.likelihood import ve_bound_message

    pipe = CACHE.get(checkpoint)  # UserError for a checkpoint that cannot be loaded
    family = pipe.family
    num_samples = _number(DEFAULT_SAMPLES if num_samples is None else num_samples, "number of samples", -math.inf,
                          math.inf, integer=True)
    if num_samples < NUM_CLASSES:
        raise UserError(f"number of samples: the classifier Inception Score needs at least {NUM_CLASSES} images (one per "
                        f"class: a split of n images scores at most n), got {num_samples}; use {SAMPLES[0]}–{SAMPLES[1]}.")
    if num_samples > SAMPLES[1]:
        raise UserError(f"number of samples: this is a quick evaluation of at most {SAMPLES[1]} samples, got {num_samples}; "
                        "for more run python -m evaluation.evaluate (see the README).")
    bound, ode = _flag(bound, "bound"), _flag(ode, "ode")
    if family.is_conditional and family.null_class_label is None:
        raise UserError("this checkpoint is class-conditional without an unconditional branch (trained without label "
                        "dropout): unconditional samples, their FID/KID/IS and the unconditional log p(x) are not "
                        "available. Evaluate it class-conditionally from the command line: python -m "
                        "evaluation.evaluate --class_conditional, python -m evaluation.likelihood --class_conditional.")
    if bound and family.kind == "ve":
        raise UserError("Variational bound: " + ve_bound_message(family, VE_OFFER))
    c, h, w = pipe.sample_shape
    if (bound or ode) and (c != 1 or h != w):
        raise UserError(f"likelihood: the held-out digits are 1×R×R images and this checkpoint's network works on "
                        f"{c}×{h}×{w} (latents?); untick \"Variational bound\" and \"ODE likelihood\".")
    nll_images = _number(DEFAULT_NLL_IMAGES if nll_images is None else nll_images, "held-out digits", *NLL_IMAGES,
                         integer=True)
    req = make_request(checkpoint, sampler, steps, None, seed, 1, "unconditional")  # sampler, steps, seed; budget below
    if req.nfe * num_samples > work_budget():
        raise UserError(f"{req.nfe} network evaluations × {num_samples} samples = {req.nfe * num_samples:,} exceeds this "
                        f"server's budget of {work_budget():,}; lower the steps or the number of samples.")
    return EvalRequest(req.checkpoint, num_samples, req.sampler, req.steps, req.nfe, bound, ode, nll_images, req.seed,
                       int(bound_stride), float(ode_tol), int(ode_max_nfe))


def _numbers(q) -> dict:
    b, o = q.bound or {}, q.ode or {}
    return {"fid": q.fid, "fid_real": q.fid_real, "kid": q.kid, "kid_std": q.kid_std, "kid_real": q.kid_real,
            "precision": q.precision, "recall": q.recall, "inception_score": q.inception_score,
            "inception_score_std": q.inception_score_std, "inception_score_splits": q.inception_score_splits,
            "inception_score_real": q.inception_score_real, "nfe": q.nfe, "sampling_seconds": q.sampling_seconds,
            "bound_bpd": b.get("bits_per_dim"), "bound_ci95": b.get("ci95"), "bound_seconds": b.get("seconds"),
            "ode_bpd": o.get("bits_per_dim"), "ode_ci95": o.get("ci95"), "ode_nfe": o.get("mean_nfe"),
            "ode_seconds": o.get("seconds"), "seconds": q.seconds}


def render_figure(fig):
    """The figure as a PNG image, then closed (cleared, and closed in pyplot if pyplot holds it), so memory stays flat."""
    if fig is None:
        return None
    from .outputs import figure_image

    try:
        return figure_image(fig)
    finally:
        fig.clf()
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close(fig)


def run_evaluation(request: EvalRequest, progress: Optional[Callable[[float, str], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None) -> PanelResult:
    """Run a checked request: the quick evaluation, its table and its per-step figure.

    Raises:
        pipelines.SamplingCancelled: ``should_stop`` returned True.
        UserError: the evaluation could not run (the message says why).
    """
    from evaluation.quick import quick_evaluate
    from .sampling import apply_threads

    apply_threads()
    pipe = CACHE.get(request.checkpoint)
    try:
        q = quick_evaluate(pipe, num_samples=request.num_samples, sampler=request.sampler, steps=request.steps,
                           nll_images=request.nll_images, bound_stride=request.bound_stride, ode_images=request.nll_images,
                           ode_tol=request.ode_tol, seed=request.seed, likelihood=request.likelihood, progress=progress,
                           ode_max_nfe=request.ode_max_nfe, should_stop=should_stop)
    except ValueError as err:
        raise UserError(str(err)) from err
    image = render_figure(q.figure)
    q.figure = None  # the image is what is kept
    return PanelResult(q.markdown(), q.rows(), image, _numbers(q), q.terms, q.term_labels, list(q.notes), q.seconds)


def evaluate_checkpoint(checkpoint, num_samples=DEFAULT_SAMPLES, sampler="ddim", steps=None, bound=True, ode=True,
                        nll_images=DEFAULT_NLL_IMAGES, seed=0, progress=None, should_stop=None, **options) -> PanelResult:
    """Check and run in one call (``options``: ``bound_stride``, ``ode_tol``, ``ode_max_nfe``)."""
    request = check_request(checkpoint, num_samples, sampler, steps, bound, ode, nll_images, seed, **options)
    return run_evaluation(request, progress, should_stop)


@dataclass
class PanelUpdate:
    """One update of :func:`evaluate_stream`: ``kind`` is ``"tick"``, ``"done"``, ``"cancelled"`` or ``"error"``."""

    kind: str
    status: str
    progress: float = 0.0
    result: Optional[PanelResult] = None


def status_line(request: EvalRequest, result: PanelResult) -> str:
    warn = f"; {len(result.notes)} note(s) below" if result.notes else ""
    return (f"✅ Quick evaluation of {request.num_samples} samples ({SAMPLERS[request.sampler].title}, NFE {request.nfe}) "
            f"done in {result.seconds:.1f} s{warn}.")


@gpu  # the GPU call of a ZeroGPU Space (a no-op elsewhere)
def evaluate_stream(request: EvalRequest, cancel: Optional[threading.Event] = None,
                    interval: float = 0.5) -> Iterator[PanelUpdate]:
    """Run ``request`` in a worker thread, yielding a status update at least every ``interval`` seconds and the
    result last. Closing the generator early (Cancel) sets ``cancel``; the worker stops at its next network call."""
    from pipelines import SamplingCancelled

    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    stage = {"fraction": 0.0, "message": "starting"}

    def on_progress(fraction: float, message: str) -> None:
        stage.update(fraction=fraction, message=message)

    def work():
        try:
            events.put(("done", run_evaluation(request, on_progress, cancel.is_set)))
        except SamplingCancelled:
            events.put(("cancelled", None))
        except UserError as err:
            events.put(("error", str(err)))
        except Exception as err:  # keep the app alive whatever happens in the model
            log.exception("quick evaluation failed")
            events.put(("error", f"{type(err).__name__}: {err}"))

    start = time.perf_counter()
    worker = threading.Thread(target=work, daemon=True, name="evaluate")
    finished = False
    worker.start()
    try:
        while True:
            try:
                kind, payload = events.get(timeout=interval)
            except queue.Empty:
                yield PanelUpdate("tick", f"⏳ Quick evaluation, {request.num_samples} samples: {stage['message']} … "
                                  f"{time.perf_counter() - start:.0f} s", stage["fraction"])
                continue
            finished = True
            if kind == "done":
                yield PanelUpdate("done", status_line(request, payload), 1.0, payload)
            elif kind == "cancelled":
                yield PanelUpdate("cancelled", f"⏹️ Evaluation cancelled during: {stage['message']}.", stage["fraction"])
            else:
                yield PanelUpdate("error", f"⚠️ {payload}", stage["fraction"])
            return
    finally:
        cancel.set()  # a consumer that stops early stops the worker too
        worker.join(timeout=60)
        if not finished:
            log.info("evaluation stopped during %s; worker %s", stage["message"],
                     "still running" if worker.is_alive() else "ended")


def evaluate(checkpoint, num_samples, sampler, steps, bound, ode, nll_images, seed, progress=None):
    """Quick evaluation of the checkpoint: classifier-FID/KID/IS of ``num_samples`` unconditional samples and the
    likelihood of ``nll_images`` held-out digits in bits/dim (variational bound: VP only; probability-flow ODE).
    Outputs: status, table (Markdown), per-step bound terms (image)."""
    import gradio as gr

    try:
        request = check_request(checkpoint, num_samples, sampler, steps, bound, ode, nll_images, seed)
    except (UserError, ValueError, TypeError) as err:
        yield f"⚠️ {err}", gr.skip(), gr.skip()
        raise gr.Error(str(err)) from err
    for upd in evaluate_stream(request):
        if progress is not None:
            progress(upd.progress, desc=upd.status)
        if upd.kind == "tick":
            yield upd.status, gr.skip(), gr.skip()
        elif upd.kind == "done":
            yield upd.status, upd.result.markdown, upd.result.image
        else:
            yield upd.status, gr.skip(), gr.skip()
            if upd.kind == "error":
                raise gr.Error(upd.status.removeprefix("⚠️").strip())


BOUND_HELP = (f"VP (DDPM) checkpoints: the T-step bound on 8-bit pixels, its terms in blocks of up to {BOUND_STRIDE} steps "
              "(rescaled: an unbiased estimate), with the per-step plot")
BOUND_HELP_VE = "not for a VE (NCSN) checkpoint: it has no discrete chain; its likelihood is the ODE's"


def bound_available(checkpoint) -> tuple[bool, str]:
    """Whether the checkpoint has a discrete variational bound (VP: True), and the checkbox's help text."""
    try:
        kind = CACHE.get(checkpoint).family.kind
    except (UserError, ValueError):
        return True, BOUND_HELP
    return (False, BOUND_HELP_VE) if kind == "ve" else (True, BOUND_HELP)


def bound_checkbox(checkpoint):
    """Gradio update of the "Variational bound" box for the loaded checkpoint: unticked on a VE checkpoint."""
    import gradio as gr

    value, info = bound_available(checkpoint)
    return gr.update(value=value, info=info)
