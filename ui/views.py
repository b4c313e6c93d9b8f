"""Views of the process rather than of samples: the forward process on a held-out digit, the
schedule plot (with the timesteps a sampler visits), the trajectory explorer, and classifier-FID
against NFE from the evaluation tables the project ships.

Figures are built with ``matplotlib.figure.Figure`` directly, never with pyplot: pyplot keeps
every figure it made alive until it is closed, which leaked ~3 MB per request.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from data.images import enlarge, make_grid
from data.sources import mnist_digits
from schedulers.parametrization import alpha_bar_to_sigma, forward_marginal, ve_to_vp, vp_scales
from schedulers.registry import SAMPLERS, create_scheduler, get_spec
from schedulers.schedules import DiscreteVPSchedule

from .models import CACHE, ROOT
from .outputs import figure_image, labelled_grid, panel, to_display
from .requests import _number
from .trajectory import TRAJECTORIES, known_timesteps

DOCS = ROOT / "docs"
TABLES = (DOCS / "sampler-table.json", DOCS / "ncsn-table.json", DOCS / "latent-dit-table.json")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90)


def held_out_digits() -> torch.Tensor:
    """The 1,000 held-out MNIST digits at 32×32 in [-1, 1] (decoded once, see ``data.sources``)."""
    return mnist_digits("test")[0]


def forward_process(checkpoint, index, t, sigma, seed=0) -> tuple[Image.Image, Image.Image, str]:
    """A held-out digit noised by the VP forward process at label t and by the SMLD one at σ; for a
    latent checkpoint, noised in latent space and shown with what the decoder makes of it."""
    pipe = CACHE.get(checkpoint)
    digits = held_out_digits()
    index = _number(index, "digit index", 0, len(digits) - 1, integer=True)
    T = pipe.schedule.num_train_timesteps
    t = _number(t, "t", 0, T - 1, integer=True)
    sigma = _number(sigma, "σ", 1e-3, 1e3)
    x_0 = digits[index:index + 1]
    if getattr(pipe, "decoder", None) is not None:
        return _latent_forward_process(pipe, x_0, t, sigma, seed)
    if pipe.info is not None and getattr(pipe, "decoder", None) is None and pipe.info.sample_size != x_0.shape[-1]:
        x_0 = torch.nn.functional.interpolate(x_0, size=pipe.info.sample_size, mode="nearest")
    z = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(int(seed)))
    alpha_bar_t = pipe.schedule.alphas_cumprod[t]
    a_t, s_t = vp_scales(alpha_bar_t)
    x_t = forward_marginal(x_0, z, float(a_t), float(s_t))  # q(x_t | x_0)
    x_tilde = forward_marginal(x_0, z, 1.0, sigma)  # x̃ = x_0 + σ z
    note = (f"VP: ᾱ_t = {float(alpha_bar_t):.4g}, √ᾱ_t = {float(a_t):.3f}, σ_t = √((1-ᾱ)/ᾱ) = "
            f"{float(alpha_bar_to_sigma(alpha_bar_t)):.3g}.  "
            f"SMLD: σ = {sigma:g} (shown rescaled by 1/√(1+σ²) so the pixels stay in range).")
    vp_img = enlarge(make_grid(to_display(x_t, "state"), nrow=1, padding=0), 256)
    ve_img = enlarge(make_grid(to_display(ve_to_vp(x_tilde, sigma), "state"), nrow=1, padding=0), 256)
    return vp_img, ve_img, note


def _latent_forward_process(pipe, x_0: torch.Tensor, t: int, sigma: float, seed) -> tuple[Image.Image, Image.Image, str]:
    """The forward process of a latent checkpoint: the digit encoded, noised in latent space, decoded."""
    decoder = pipe.decoder
    channels, size = pipe.info.image_shape[0], pipe.info.image_shape[-1]  # the decoder's images (checkpoint.py)
    x_0 = torch.nn.functional.interpolate(x_0, size=size, mode="nearest") if x_0.shape[-1] != size else x_0
    x_0 = x_0.expand(-1, channels, -1, -1)  # a grey digit for an RGB autoencoder
    z_0 = decoder.encode(x_0)  # the posterior mean, times the scaling factor
    z = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(int(seed)))
    alpha_bar_t = pipe.schedule.alphas_cumprod[t]
    a_t, s_t = vp_scales(alpha_bar_t)
    z_t = forward_marginal(z_0, z, float(a_t), float(s_t))  # q(z_t | z_0), in latent space
    z_tilde = forward_marginal(z_0, z, 1.0, sigma)  # z̃ = z_0 + σ z
    decoded = to_display(torch.cat([z_t, z_tilde]), "image", pipe.to_images)  # one batched decode

    def pair(latent, image):  # the latent in false colour | what the decoder makes of it
        latent = torch.nn.functional.interpolate(to_display(latent, "state"), size=image.shape[-2:], mode="nearest")
        image = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
        return enlarge(make_grid(torch.cat([latent, image]), nrow=2, padding=1), 512)

    c, h, w = z_0.shape[1:]
    note = (f"Latent checkpoint: the digit is encoded (z₀ = {decoder.scaling_factor:.4g} · E(x₀), {c}×{h}×{w}) and "
            f"noised in latent space. Each pair: the latent in false colour (left, one colour per channel) and what the "
            f"decoder makes of it (right). VP: ᾱ_t = {float(alpha_bar_t):.4g}, √ᾱ_t = {float(a_t):.3f}, "
            f"σ_t = {float(alpha_bar_to_sigma(alpha_bar_t)):.3g}.  SMLD: σ = {sigma:g}, decoded as it is (the decoder "
            "never saw latents this large: this is what a VE sampler's state looks like to it).")
    return pair(z_t, decoded[:1]), pair(z_tilde, decoded[1:]), note


def sampler_timesteps(checkpoint, sampler: Optional[str], steps=None, params: Optional[dict] = None) -> list:
    """The timestep labels a sampler visits on this checkpoint (one per network evaluation)."""
    if not sampler or sampler not in SAMPLERS:
        return []
    base = CACHE.get(checkpoint).sampler_config
    try:
        scheduler, _ = create_scheduler(sampler, base, params)
        scheduler.set_timesteps(int(steps) if steps else get_spec(sampler).default_steps)
    except (ValueError, TypeError):
        return []
    return known_timesteps(scheduler) or []


def _mark_timesteps(ax, schedule: DiscreteVPSchedule, timesteps, label: str, current: Optional[float] = None):
    """Dots on the σ_t curve where a sampler evaluates the network, and a rug of them below it."""
    if not len(timesteps):
        return
    ts = np.asarray(timesteps, dtype=float)
    sig = schedule.t_to_sigma(torch.as_tensor(ts)).numpy()
    ax.plot(ts, sig, "o", ms=3.5, color="tab:red", alpha=0.6, label=f"{label}: {len(ts)} evaluations")
    lo = float(schedule.sigmas.min())
    ax.plot(ts, np.full_like(ts, lo), "|", ms=12, color="tab:red", alpha=0.5)
    if current is not None:
        ax.plot([current], [float(schedule.t_to_sigma(torch.tensor(current)))], "*", ms=16, color="black",
                label="this step")
    ax.legend(fontsize=8, loc="upper left")


def schedule_figure(checkpoint, sampler: Optional[str] = None, steps=None, params: Optional[dict] = None):
    """β_t, ᾱ_t and σ_t (log scale) of the loaded checkpoint's schedule; with ``sampler``, the
    timesteps it visits drawn on σ_t. A matplotlib ``Figure`` (not registered with pyplot)."""
    pipe = CACHE.get(checkpoint)
    s = pipe.schedule
    t = np.arange(s.num_train_timesteps)
    fig = _figure(11, 3.1)
    axes = fig.subplots(1, 3)
    axes[0].plot(t, s.betas.numpy())
    axes[0].set_title("β_t")
    axes[1].plot(t, s.alphas_cumprod.numpy())
    axes[1].set_title("ᾱ_t")
    axes[2].semilogy(t, s.sigmas.numpy())
    axes[2].set_title("σ_t = √((1-ᾱ_t)/ᾱ_t)")
    for ax in axes:
        ax.set_xlabel("timestep label t")
        ax.grid(alpha=0.3)
    if sampler:
        _mark_timesteps(axes[2], s, sampler_timesteps(checkpoint, sampler, steps, params), get_spec(sampler).title)
    fam = pipe.family
    if fam.kind == "ve":
        fig.suptitle(f"VE network (σ ∈ [{fam.sigma_min:g}, {fam.sigma_max:g}] in its pixels) seen through this VP schedule",
                     fontsize=9)
    fig.tight_layout()
    return fig


# ---- trajectory explorer ----

def trajectory_view(run_id, position) -> tuple[Image.Image, str, Image.Image]:
    """Entry ``position`` of a stored trajectory: x_t | x̂₀ | ε̂ side by side, a caption with the step
    index, t and σ_t, and the σ_t plot with every step of the run and this one marked."""
    traj = TRAJECTORIES.get(run_id)
    k = _number(position if position is not None else len(traj) - 1, "trajectory step", 0, len(traj) - 1, integer=True)
    if traj.latent:  # a latent checkpoint: the latents in false colour, x̂₀ also as the decoder draws it (this entry only)
        tiles = [("latent x_t (false colour)", panel(traj.x_t[k].float(), "state")),
                 ("latent x̂₀ (false colour)", panel(traj.x0_hat[k].float(), "state")),
                 ("decoded x̂₀", panel(traj.decoded_x0(k, CACHE.get(traj.checkpoint).to_images).float(), "image")),
                 ("latent ε̂ (ε̂/3, false colour)", panel(traj.eps_hat[k].float(), "noise"))]
    else:
        tiles = [("x_t (network input)", panel(traj.x_t[k].float(), "state")),
                 ("x̂₀ (denoised estimate)", panel(traj.x0_hat[k].float(), "image")),
                 ("ε̂ (shown as ε̂/3)", panel(traj.eps_hat[k].float(), "noise"))]
    image = labelled_grid(tiles, ncol=len(tiles), cell_height=160)
    caption = (f"**{traj.title}**, image #{traj.image_index}: step **{traj.step[k] + 1} of {traj.nfe}** · "
               f"t = {traj.t[k]:.4g} · σ_t = {traj.sigma[k]:.4g} · √ᾱ_t = {1 / math.sqrt(1 + traj.sigma[k] ** 2):.4f}"
               + (f"  \n(stored: {len(traj)} of {traj.nfe} steps, evenly spaced)" if len(traj) < traj.nfe else ""))
    schedule = DiscreteVPSchedule.from_config(traj.sampler_config)
    fig = _figure(6.5, 2.6)
    ax = fig.subplots()
    ts = np.arange(schedule.num_train_timesteps)
    ax.semilogy(ts, schedule.sigmas.numpy(), color="tab:blue", lw=1)
    _mark_timesteps(ax, schedule, traj.all_t, traj.title, current=traj.t[k])
    ax.set_xlabel("timestep label t")
    ax.set_ylabel("σ_t")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return image, caption, figure_image(fig)


def trajectory_length(run_id) -> int:
    return len(TRAJECTORIES.get(run_id))


# ---- quality against NFE ----

@lru_cache(maxsize=8)
def _load_table(path: str) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def table_for(checkpoint) -> Optional[dict]:
    """The shipped sampler × NFE table made on this checkpoint's folder, if any."""
    source = Path(CACHE.resolve(checkpoint))
    for path in TABLES:
        table = _load_table(str(path))
        if table and Path(table.get("meta", {}).get("checkpoint", "")).name == source.name:
            return table
    return None


def _row_sampler() -> dict:
    """Table row label → (sampler name, its params), from the registry's ``table_rows``."""
    out = {}
    for name, spec in SAMPLERS.items():
        for label, params in spec.table_rows():
            out[label] = (name, params)
    return out


def quality_rows(table: dict) -> dict:
    """{row label: [(nfe, fid), ...]} from a table's cells, NFE ascending."""
    rows: dict = {}
    for key, cell in table.get("cells", {}).items():
        if "fid" not in cell or cell.get("nfe") is None:
            continue
        label = key.rsplit("|", 1)[0]
        rows.setdefault(label, []).append((int(cell["nfe"]), float(cell["fid"])))
    return {k: sorted(v) for k, v in rows.items()}


def _choice_row(rows: dict, sampler: str, params: Optional[dict]) -> Optional[str]:
    """The table row that stands for this sampler setting (the variant whose parameters match best)."""
    best, best_score = None, None
    for label, (name, row_params) in _row_sampler().items():
        if name != sampler or label not in rows:
            continue
        score = sum(1 for k, v in row_params.items() if (params or {}).get(k, get_spec(name).defaults().get(k)) == v)
        score -= sum(1 for k, v in row_params.items() if (params or {}).get(k, get_spec(name).defaults().get(k)) != v)
        if best_score is None or score > best_score:
            best, best_score = label, score
    return best


def quality_figure(checkpoint, sampler: Optional[str] = None, nfe: Optional[int] = None,
                   params: Optional[dict] = None) -> tuple[Optional[Image.Image], str]:
    """Classifier-FID against NFE per sampler from the shipped table of this checkpoint, the current
    choice marked (its FID read off its row, interpolated in log–log); and a caption."""
    table = table_for(checkpoint)
    if table is None:
        return None, ("No evaluation table ships for this checkpoint (the app has them for the bundled models: "
                      "`docs/sampler-table.json`, `docs/ncsn-table.json`, `docs/latent-dit-table.json`; make one with "
                      "`python -m evaluation.table`).")
    rows = quality_rows(table)
    fig = _figure(10, 4.4)
    ax = fig.subplots()
    for label, pts in rows.items():
        x, y = zip(*pts)
        ax.plot(x, y, "o-", ms=4, lw=1.3, label=label)
    real = (table.get("real_vs_real") or {}).get("fid")
    if real is not None:
        ax.axhline(real, color="gray", ls="--", lw=1, label=f"real vs real ({real:.2f})")
    caption = ""
    row = _choice_row(rows, sampler, params) if sampler else None
    if row is not None and nfe:
        pts = rows[row]
        xs, ys = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        inside = xs[0] <= math.log(nfe) <= xs[-1]
        y = float(np.exp(np.interp(math.log(nfe), xs, ys)))
        ax.plot([nfe], [y], "*", ms=20, color="black", zorder=5, label=f"your choice: {row}, NFE {nfe}")
        caption = (f"Your choice, **{row} at NFE {nfe}**: FID ≈ {y:.2f} "
                   + ("(interpolated between the table's measurements)" if inside else
                      "(outside the table's NFE range: the nearest measurement)") + ". ")
    elif sampler:
        caption = f"{get_spec(sampler).title} has no row in this table. "
    meta = table.get("meta", {})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("classifier-FID (lower is better)")
    ax.set_title(f"{Path(meta.get('checkpoint', '?')).name}: {meta.get('num_samples', '?')} samples per point, "
                 f"{'conditional' if meta.get('class_conditional') else 'unconditional'}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    caption += (f"From the shipped table (`python -m evaluation.table`, {meta.get('num_samples', '?')} samples a point: "
                "differences below about 0.5 are noise).")
    return figure_image(fig), caption


@lru_cache(maxsize=1)
def _features():
    from evaluation.evaluate import FeatureNet

    return FeatureNet()


def live_quality(checkpoint, sampler, steps=None, params=None, num_samples: int = 64, seed: int = 0) -> str:
    """A quick, noisy check: ``num_samples`` unconditional samples scored with the bundled classifier
    against as many held-out digits (classifier-FID at this sample size is biased upwards: compare it
    with the real-vs-real figure printed beside it, never with the table)."""
    from evaluation.evaluate import reference, statistics

    from .requests import make_request

    num_samples = int(_number(num_samples, "live samples", 8, 64, integer=True))
    req = make_request(checkpoint, sampler, steps, params, seed, num_samples, "unconditional", None)
    pipe = CACHE.get(checkpoint)
    out = pipe(req.sampler, req.steps, req.params, batch_size=num_samples, seed=req.seed, output_type="pt")
    features = _features()
    feats, preds = features(out.images.clamp(-1, 1))
    ref_feats, ref = reference(features, num_samples)
    report = statistics(feats, preds, ref_feats, None, out.nfe, out.seconds / num_samples)
    return (f"**Live check** ({num_samples} samples, labelled live: noisy, not comparable with the table): "
            f"{get_spec(sampler).title}, NFE {out.nfe}: classifier-FID **{report.fid:.2f}** "
            f"(real vs real at {num_samples}: {ref.fid:.2f}), precision {report.precision:.2f}, recall {report.recall:.2f}, "
            f"{out.seconds:.1f} s.")
