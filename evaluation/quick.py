"""A quick evaluation of a loaded pipeline, for an app panel: a small batch, every measure, one figure.

    from evaluation import quick_evaluate
    q = quick_evaluate(pipe)                 # about a minute on two CPU cores for the bundled models
    q.markdown(); q.figure; q.terms           # the numbers with intervals, the per-step bound plot, its array

The figures are labelled as quick: classifier IS/FID/precision/recall of ``num_samples`` samples
(beside real digits at the same count), the variational bound on ``nll_images`` held-out digits
with every ``bound_stride``-th term (rescaled), and the probability-flow ODE likelihood of
``ode_images`` digits at loose tolerances. A measure that does not apply (the VP bound of a VE
checkpoint) or fails becomes a note; the others are still computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

_FEATURES = {}


@dataclass
class QuickEvaluation:
    """What :func:`quick_evaluate` measured (bits/dim figures with 95 % half-widths)."""

    num_samples: int
    sampler: str
    steps: int
    nfe: int
    fid: float
    fid_real: float  # real training vs held-out digits at the same count
    precision: float
    recall: float
    inception_score: Optional[float]
    inception_score_std: Optional[float]
    inception_score_real: Optional[float]
    kid: Optional[float] = None
    kid_std: Optional[float] = None
    kid_real: Optional[float] = None
    inception_score_splits: Optional[int] = None
    sampling_seconds: float = 0.0
    bound: Optional[dict] = None  # evaluation.likelihood.BoundResult.to_dict(per_image=False)
    ode: Optional[dict] = None  # evaluation.likelihood.ODEResult.to_dict(per_image=False)
    terms: Optional[np.ndarray] = None  # per-step bound terms, bits/dim, mean over images: L_0, L_t…, L_T
    term_labels: Optional[np.ndarray] = None
    figure: object = None  # matplotlib Figure of the terms (None without a bound)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list:
        """[measure, value, ±, real digits / how] for each figure (strings), in the order shown."""
        f = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
        out = [["classifier-FID", f(self.fid), "", f"{f(self.fid_real)} (real vs real, {self.num_samples} digits)"],
               ["classifier-KID", f(self.kid, ".4f"),
                "– (one subset: no spread)" if self.kid_std is not None and self.kid_std < 1e-9 else f(self.kid_std, ".4f"),
                f"{f(self.kid_real, '.4f')} (real vs real)"],
               ["precision / recall", f"{self.precision:.2f} / {self.recall:.2f}", "", "k = 3"]]
        if self.inception_score is not None:
            one = self.inception_score_splits == 1
            out.append(["classifier IS", f(self.inception_score),
                        "– (one split: no spread)" if one else f(self.inception_score_std),
                        f"{f(self.inception_score_real)} (real digits); {self.inception_score_splits} split(s), at most 10"])
        if self.bound is not None:
            b = self.bound
            out.append(["NLL, variational bound (bits/dim)", f(b["bits_per_dim"], ".3f"), f(b["ci95"], ".3f"),
                        f"{b['num_images']} held-out digits, stride {b['stride']} ({b['network_evaluations_per_image']} "
                        f"evaluations per digit), {b['seconds']:.1f} s"])
        if self.ode is not None:
            o = self.ode
            out.append(["NLL, probability-flow ODE (bits/dim)", f(o["bits_per_dim"], ".3f"), f(o["ci95"], ".3f"),
                        f"{o['num_images']} held-out digits, NFE {o['mean_nfe']:.0f} at rtol = atol = {o['rtol']:g}, "
                        f"{o['seconds']:.1f} s"])
        return out

    def markdown(self) -> str:
        """The numbers as a small Markdown table, labelled as a quick evaluation."""
        lines = [f"**Quick evaluation, {self.num_samples} samples** ({self.sampler}, {self.steps} steps, NFE {self.nfe}; "
                 f"sampling {self.sampling_seconds:.1f} s, {self.seconds:.1f} s in all). Small batches: indicative only, "
                 "not comparable with the README's tables; ± is the split spread (KID, IS) or a 95 % interval over digits "
                 "(bits/dim).", "", "| measure | value | ± | reference / how |", "|---|---:|---:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def terms_figure(terms: np.ndarray, labels: np.ndarray, title: str = ""):
    """The per-step terms of the bound (bits/dim per step, log axis): which steps carry the bound."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    kl_labels, kl = labels[1:-1], terms[1:-1]
    ax.plot(kl_labels, np.maximum(kl, 1e-12), marker="." if len(kl) <= 100 else None, lw=1, label="L_t (KL, per step)")
    ax.scatter([0], [max(terms[0], 1e-12)], color="C3", zorder=3, label=f"L_0 decoder ({terms[0]:.3f})")
    ax.scatter([labels[-1]], [max(terms[-1], 1e-12)], color="C2", zorder=3, label=f"L_T prior ({terms[-1]:.1e})")
    ax.set_yscale("log")
    ax.set_xlabel("timestep label t")
    ax.set_ylabel("bits/dim")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def quick_evaluate(pipe, *, num_samples: int = 100, sampler: str = "ddim", steps: int = 20, params: Optional[dict] = None,
                   nll_images: int = 16, bound_stride: int = 20, ode_images: int = 4, ode_tol: float = 1e-3,
                   seed: int = 0, class_conditional: bool = False, guidance_scale: float = 1.0,
                   likelihood: tuple = ("bound", "ode"), progress: Optional[Callable[[float, str], None]] = None,
                   ode_max_nfe: int = 20_000, should_stop: Optional[Callable[[], bool]] = None) -> QuickEvaluation:
    """Sample a small batch and measure it, and the checkpoint's likelihood of a few held-out digits.

    Args:
        pipe: a loaded :class:`~pipelines.SamplerPipeline`.
        num_samples, sampler, steps, params, seed, class_conditional, guidance_scale: the samples
            (as in ``python -m evaluation.evaluate``).
        nll_images: held-out digits for the variational bound (VP checkpoints).
        bound_stride: evaluate every this-many-th term of the bound, rescaled (1: all T).
        ode_images: held-out digits for the ODE likelihood.
        ode_tol: rtol = atol of the ODE solver (the benchmark's 1e-5 is slower).
        likelihood: which of ``"bound"``, ``"ode"`` to compute.
        progress: called as ``progress(fraction, message)`` between stages.
        ode_max_nfe: network evaluations the ODE solve may spend before it counts as not converging (a note).
        should_stop: polled between stages and inside each (every sampling step, bound batch and ODE
            evaluation); True raises :class:`~pipelines.SamplingCancelled`.

    Raises:
        ValueError: bad sampling arguments (e.g. no class labels for a conditional-only checkpoint).
        pipelines.SamplingCancelled: ``should_stop`` returned True.
    """
    from evaluation.evaluate import FeatureNet, reference, sample_images, statistics
    from evaluation.likelihood import (LikelihoodError, ODEConvergenceError, held_out_images, ode_likelihood,
                                       variational_bound)

    from pipelines import SamplingCancelled

    start = time.perf_counter()

    def say(fraction: float, message: str) -> None:
        if should_stop is not None and should_stop():
            raise SamplingCancelled(f"quick evaluation cancelled before: {message}")
        if progress is not None:
            progress(fraction, message)

    say(0.0, f"sampling {num_samples} images")
    images, labels, nfe, sampling_seconds = sample_images(
        pipe, sampler, steps, num_samples, batch_size=min(num_samples, 250), seed=seed, params=params,
        class_conditional=class_conditional, guidance_scale=guidance_scale, progress=False, should_stop=should_stop)
    say(0.3, "classifier statistics")
    if "features" not in _FEATURES:
        _FEATURES["features"] = FeatureNet()
    features = _FEATURES["features"]
    ref_feats, ref = reference(features, min(num_samples, 1000))
    feats, preds, probs = features(images, probabilities=True)
    report = statistics(feats, preds, ref_feats, labels, nfe, None, probs=probs)
    notes = list(report.extra.get("notes", []))
    result = QuickEvaluation(num_samples, sampler, steps, nfe, report.fid, ref.fid, report.precision, report.recall,
                             report.inception_score, report.inception_score_std, ref.inception_score, report.kid,
                             report.kid_std, ref.kid, report.inception_score_splits, sampling_seconds, notes=notes)
    digits = None
    if likelihood:
        try:
            digits, _ = held_out_images(pipe, max(nll_images, ode_images))
        except LikelihoodError as err:
            notes.append(f"likelihood skipped: {err}")
    if digits is not None and "bound" in likelihood:
        say(0.5, f"variational bound on {nll_images} digits")
        try:
            b = variational_bound(pipe, digits[:nll_images], stride=bound_stride, seed=seed, should_stop=should_stop)
            result.bound = b.to_dict(per_image=False)
            result.terms, result.term_labels = b.terms, b.term_labels
            result.figure = terms_figure(b.terms, b.term_labels, f"variational bound {b.bits_per_dim:.3f} ± {b.ci95:.3f} "
                                         f"bits/dim: terms per step ({nll_images} digits, stride {bound_stride}; quick)")
        except LikelihoodError as err:
            notes.append(f"bound skipped: {err}")
    if digits is not None and "ode" in likelihood:
        say(0.7, f"ODE likelihood of {ode_images} digits")
        try:
            o = ode_likelihood(pipe, digits[:ode_images], rtol=ode_tol, atol=ode_tol, seed=seed, max_nfe=ode_max_nfe,
                               should_stop=should_stop)
            result.ode = o.to_dict(per_image=False)
        except ODEConvergenceError as err:
            notes.append(f"ODE likelihood failed: {err}")
        except LikelihoodError as err:
            notes.append(f"ODE likelihood skipped: {err}")
    result.seconds = time.perf_counter() - start
    say(1.0, "done")
    return result
