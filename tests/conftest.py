"""Shared fixtures: tiny randomly initialised networks saved in the layouts of published checkpoints."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)


def tiny_unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**{**TINY_UNET, **overrides}).eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: a second thread saves little there, and on
    a busy machine its spin-waits cost far more (the weak-order test of test_convergence_order.py took
    61 s with two, 9 s with one). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def classify():
    """The project's MNIST classifier as ``images in [-1, 1] → predicted digits`` (tests of bundled models)."""
    from evaluation.evaluate import FeatureNet

    features = FeatureNet()
    return lambda images: features(images)[1]


@pytest.fixture(scope="session")
def ddpm_checkpoint(tmp_path_factory):
    """A google/ddpm-*-style folder: DDPMPipeline with an ε-prediction UNet and a DDPMScheduler."""
    path = tmp_path_factory.mktemp("ckpt") / "ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ncsnpp_checkpoint(tmp_path_factory):
    """A google/ncsnpp-*-style folder: ScoreSdeVePipeline with a Fourier-embedding UNet fed σ (pixels in [0, 1])."""
    path = tmp_path_factory.mktemp("ckpt") / "ncsnpp"
    unet = tiny_unet(time_embedding_type="fourier")
    ScoreSdeVePipeline(unet=unet, scheduler=ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vp_unet():
    return tiny_unet()
