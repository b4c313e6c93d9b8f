"""A toy 2-D world with an exact score: every registered sampler, no network, instant on a CPU.

The data is a mixture of three 2-D Gaussians; ``pipelines.analytic.GaussianMixtureNet`` gives
E[ε | x_t] in closed form behind a UNet's call signature, so the same ``SamplerPipeline`` and the
same registry (step ranges, parameters, NFE) drive it as they drive the image models. What is
left is each sampler's own error: annealed Langevin's wrong mode weights with few levels, DDIM's
shrunken modes with few steps. Particles are drawn over the exact density of the noised data
p_t(x) = Σ_k w_k N(x; a_t μ_k, (a_t² s_k² + s_t²) I) at the step they are shown.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from PIL import Image

from pipelines import SamplerPipeline, SamplingDivergedError
from pipelines.analytic import GaussianMixtureNet
from schedulers.parametrization import vp_scales
from schedulers.registry import SAMPLERS, get_spec, nfe_of, resolve_params

from .errors import UserError
from .outputs import figure_image
from .sampling import apply_threads
from .trajectory import known_timesteps
from .requests import _number, clean_params, default_steps, steps_for_budget

WEIGHTS = (0.2, 0.5, 0.3)
MEANS = ((-0.55, -0.45), (0.45, 0.5), (0.55, -0.55))
STDS = (0.08, 0.15, 0.1)
MAX_PARTICLES = 4000
TOY_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
EXTENT = 2.6


@lru_cache(maxsize=1)
def toy_pipeline() -> SamplerPipeline:
    """The exact-score mixture as a VP ε-network, in a pipeline whose samples are 2-D points ``[B, 2, 1, 1]``."""
    net = GaussianMixtureNet(WEIGHTS, MEANS, STDS, family="vp")
    return SamplerPipeline(net, net.model_family(), dict(TOY_CONFIG), sample_shape=(2, 1, 1))


def density(points: np.ndarray, a: float, s: float) -> np.ndarray:
    """p_t at ``points`` ``[N, 2]`` for x_t = a x₀ + s ε."""
    out = np.zeros(len(points))
    for w, mu, sd in zip(WEIGHTS, MEANS, STDS):
        v = a * a * sd * sd + s * s
        d2 = ((points - a * np.asarray(mu)) ** 2).sum(1)
        out += w * np.exp(-d2 / (2 * v)) / (2 * math.pi * v)
    return out


def _draw(ax, xy: np.ndarray, a: float, s: float, title: str):
    extent = EXTENT if s > 0.3 else 1.2  # noisy states spread out; the data lies in [-1, 1]²
    grid = np.linspace(-extent, extent, 160)
    gx, gy = np.meshgrid(grid, grid)
    p = density(np.stack([gx.ravel(), gy.ravel()], 1), a, s).reshape(gx.shape)
    ax.imshow(np.log(p + 1e-6), extent=(-extent, extent, -extent, extent), origin="lower", cmap="Blues",
              vmin=np.log(p.max()) - 8, vmax=np.log(p.max()))
    ax.scatter(xy[:, 0], xy[:, 1], s=2, c="tab:red", alpha=0.5, linewidths=0)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


class _Snapshots:
    """Pipeline callback keeping all particles, as the network sees them (VP states), at chosen steps."""

    def __init__(self, scheduler, x_init: torch.Tensor, keep: set):
        self.scheduler = scheduler
        self.timesteps = known_timesteps(scheduler) or []
        self.state = x_init
        self.keep = keep
        self.shots: list = []  # (step, t, points [N, 2])

    def __call__(self, i, n, x_prev, x0_hat):
        state, self.state = self.state, x_prev
        if i in self.keep and i < len(self.timesteps):
            x_t = self.scheduler.scale_model_input(state, torch.tensor(self.timesteps[i]))
            self.shots.append((i, self.timesteps[i], x_t.reshape(len(x_t), 2).double().numpy()))


def run_toy(sampler: str, steps=None, params: Optional[dict] = None, particles: int = 2000, seed: int = 0,
            snapshots: int = 4) -> tuple[Image.Image, str, list]:
    """Sample the toy mixture with ``sampler``: particles over the exact density at ``snapshots`` steps
    (the first is the initial noise, the last the result), a caption, and mode statistics rows
    ``[mode, true weight, sampled weight, true std, sampled std]``."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    spec = get_spec(sampler)
    apply_threads()
    pipe = toy_pipeline()
    particles = _number(particles, "particles", 10, MAX_PARTICLES, integer=True)
    seed = _number(seed, "seed", 0, 2**63 - 1, integer=True)
    clean = clean_params(sampler, params)
    try:
        resolve_params(sampler, clean, pipe.sampler_config)
        if steps is None:
            steps = default_steps(sampler, pipe.sampler_config, clean)
        steps = spec.check_steps(_number(steps, f"steps ({spec.steps_label})", -math.inf, math.inf, integer=True),
                                 pipe.sampler_config, clean)
        scheduler, _, _ = pipe.prepare(sampler, steps, clean)
    except ValueError as err:
        raise UserError(str(err)) from err
    n = len(known_timesteps(scheduler) or ())
    keep = sorted({0, *(round(j * n / (snapshots - 1)) for j in range(1, snapshots - 1))} - {n})
    g = torch.Generator("cpu").manual_seed(int(seed))
    x_init = torch.randn((particles, 2, 1, 1), generator=g) * scheduler.init_noise_sigma
    shots = _Snapshots(scheduler, x_init, set(keep))
    try:
        out = pipe(sampler, steps, clean, batch_size=particles, seed=seed, output_type="pt", callback=shots)
    except SamplingDivergedError as err:
        raise UserError(str(err)) from err
    final = out.images.reshape(particles, 2).double()
    fig = _figure(len(shots.shots) + 1)
    axes = np.atleast_1d(fig.subplots(1, len(shots.shots) + 1))
    schedule = pipe.schedule
    for ax, (i, t, xy) in zip(axes, shots.shots):
        a, s = (float(v) for v in vp_scales(schedule.alpha_bar_at(t)))
        _draw(ax, xy, a, s, f"step {i + 1} of {n}: t = {t:.0f}, σ_t = {s / a:.3g}")
    _draw(axes[-1], final.numpy(), 1.0, 0.0, f"result (NFE {out.nfe})")
    fig.suptitle(f"{spec.title}, {steps} {spec.steps_label}: particles (red) over the exact density of x_t (blue)",
                 fontsize=10)
    fig.tight_layout()
    stats = pipe.unet.statistics(final)
    rows = []
    for k, (w, sd) in enumerate(zip(WEIGHTS, STDS)):
        rows.append([k + 1, w, round(float(stats["weights"][k]), 3), sd, round(float(stats["stds"][k]), 3)])
    weight_err = max(abs(r[2] - r[1]) for r in rows)
    width = [r[4] / r[3] for r in rows if not math.isnan(r[4])]
    caption = (f"**{spec.title}**, {steps} {spec.steps_label} = NFE {out.nfe}, {particles} particles, "
               f"{out.seconds:.2f} s. Largest mode-weight error **{weight_err:.3f}**; mode widths "
               f"{min(width):.2f}–{max(width):.2f}× the true ones (1 is exact)." if width else "")
    return figure_image(fig), caption, rows


def _figure(panels: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(2.7 * panels, 3.0), dpi=80)


def toy_all(budget: int = 20, particles: int = 1000, seed: int = 0) -> tuple[Image.Image, list]:
    """Every registered sampler's result at one NFE budget (converted to its steps), side by side, with the
    largest mode-weight error and width ratio of each."""
    apply_threads()
    pipe = toy_pipeline()
    budget = _number(budget, "NFE budget", 1, 2000, integer=True)
    particles = _number(particles, "particles", 10, MAX_PARTICLES, integer=True)
    names = list(SAMPLERS)
    fig = _figure(len(names))
    fig.set_size_inches(2.4 * len(names), 2.9)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    rows = []
    for ax, name in zip(axes, names):
        steps = steps_for_budget(name, budget, pipe.sampler_config)
        try:
            out = pipe(name, steps, None, batch_size=particles, seed=seed, output_type="pt")
        except SamplingDivergedError:
            ax.set_title(f"{get_spec(name).title}: diverged", fontsize=8)
            rows.append([get_spec(name).title, steps, nfe_of(name, steps, None, pipe.sampler_config), None, None])
            continue
        final = out.images.reshape(particles, 2).double()
        stats = pipe.unet.statistics(final)
        err = float((stats["weights"] - torch.tensor(WEIGHTS, dtype=torch.float64)).abs().max())
        ratios = stats["stds"] / torch.tensor(STDS, dtype=torch.float64)
        rows.append([get_spec(name).title, steps, out.nfe, round(err, 3), round(float(ratios.nanmean()), 2)])
        _draw(ax, final.numpy(), 1.0, 0.0, f"{get_spec(name).title}\n{steps} {get_spec(name).steps_label}, NFE {out.nfe}")
        ax.title.set_fontsize(7)
    fig.tight_layout()
    return figure_image(fig), rows
