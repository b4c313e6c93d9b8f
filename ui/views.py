"""Views of the process rather than of samples: the forward process on a held-out digit, the schedule plot."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from data.images import enlarge, make_grid
from data.sources import mnist_digits
from schedulers.parametrization import alpha_bar_to_sigma, forward_marginal, ve_to_vp, vp_scales

from .models import CACHE
from .requests import _number


def held_out_digits() -> torch.Tensor:
    """The 1,000 held-out MNIST digits at 32×32 in [-1, 1] (decoded once, see ``data.sources``)."""
    return mnist_digits("test")[0]


def forward_process(checkpoint, index, t, sigma, seed=0) -> tuple[Image.Image, Image.Image, str]:
    """A held-out digit noised by the VP forward process at label t and by the SMLD one at σ."""
    pipe = CACHE.get(checkpoint)
    digits = held_out_digits()
    index = _number(index, "digit index", 0, len(digits) - 1, integer=True)
    T = pipe.schedule.num_train_timesteps
    t = _number(t, "t", 0, T - 1, integer=True)
    sigma = _number(sigma, "σ", 1e-3, 1e3)
    x_0 = digits[index:index + 1]
    if pipe.info is not None and pipe.info.sample_size != x_0.shape[-1]:
        x_0 = torch.nn.functional.interpolate(x_0, size=pipe.info.sample_size, mode="nearest")
    if x_0.shape[1] != pipe.sample_shape[0]:
        x_0 = x_0.expand(-1, pipe.sample_shape[0], -1, -1)
    z = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(int(seed)))
    alpha_bar_t = pipe.schedule.alphas_cumprod[t]
    a_t, s_t = vp_scales(alpha_bar_t)
    x_t = forward_marginal(x_0, z, float(a_t), float(s_t))  # q(x_t | x_0)
    x_tilde = forward_marginal(x_0, z, 1.0, sigma)  # x̃ = x_0 + σ z
    note = (f"VP: ᾱ_t = {float(alpha_bar_t):.4g}, √ᾱ_t = {float(a_t):.3f}, σ_t = √((1-ᾱ)/ᾱ) = "
            f"{float(alpha_bar_to_sigma(alpha_bar_t)):.3g}.  "
            f"SMLD: σ = {sigma:g} (shown rescaled by 1/√(1+σ²) so the pixels stay in range).")
    vp_img = enlarge(make_grid(x_t, nrow=1, padding=0), 256)
    ve_img = enlarge(make_grid(ve_to_vp(x_tilde, sigma), nrow=1, padding=0), 256)
    return vp_img, ve_img, note


def schedule_figure(checkpoint):
    """β_t, ᾱ_t and σ_t (log scale) of the loaded checkpoint's schedule, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = CACHE.get(checkpoint)
    s = pipe.schedule
    t = np.arange(s.num_train_timesteps)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))
    axes[0].plot(t, s.betas.numpy())
    axes[0].set_title("β_t")
    axes[1].plot(t, s.alphas_cumprod.numpy())
    axes[1].set_title("ᾱ_t")
    axes[2].semilogy(t, s.sigmas.numpy())
    axes[2].set_title("σ_t = √((1-ᾱ_t)/ᾱ_t)")
    for ax in axes:
        ax.set_xlabel("timestep label t")
        ax.grid(alpha=0.3)
    fam = pipe.family
    if fam.kind == "ve":
        fig.suptitle(f"VE network (σ ∈ [{fam.sigma_min:g}, {fam.sigma_max:g}] in its pixels) seen through this VP schedule",
                     fontsize=9)
    fig.tight_layout()
    return fig
