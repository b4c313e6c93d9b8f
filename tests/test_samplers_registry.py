"""The registry's new entries: presets (``SamplerSpec.presets``), the samplers' limits and parameters,
and the documentation of every registered sampler in docs/samplers.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schedulers.registry import SAMPLERS, create_scheduler, nfe_of, resolve_params

DOCS = Path(__file__).resolve().parents[1] / "docs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_has_a_fast_and_a_paper_preset_that_the_registry_accepts(name):
    spec = SAMPLERS[name]
    labels = [label for label, _, _ in spec.presets]
    assert len(spec.presets) == 2 and labels[0].startswith("fast") and labels[1].startswith("paper"), labels
    for label, steps, params in spec.presets:
        assert isinstance(params, dict) and set(params) <= set(spec.defaults()), label
        assert spec.check_steps(steps, None, params) == steps
        values = resolve_params(name, params)
        scheduler, _ = create_scheduler(name, None, params)
        scheduler.set_timesteps(steps)
        assert values and len(scheduler.timesteps) == nfe_of(name, steps, params)
    fast_steps, fast_params = spec.presets[0][1], spec.presets[0][2]
    # annealed Langevin and Euler–Maruyama are not usable at 20 NFE on any grid (docs/samplers.md)
    most = {"langevin": 101, "vp_sde": 50}.get(name, 21)
    assert nfe_of(name, fast_steps, fast_params) <= most or name == "adaptive_sde"


def test_new_samplers_are_registered_with_their_limits():
    assert {"edm", "ipndm", "adaptive_sde"} <= set(SAMPLERS)
    assert nfe_of("edm", 10) == 19 and nfe_of("ipndm", 10) == 10 and nfe_of("adaptive_sde", 50) == 50
    assert SAMPLERS["edm"].steps_range() == (1, 10_000)  # 2N − 1 ≤ 20,000 evaluations
    assert SAMPLERS["adaptive_sde"].steps_range()[0] == 3
    with pytest.raises(ValueError, match="between 3 and"):
        SAMPLERS["adaptive_sde"].check_steps(2)
    for name in ("edm", "ipndm", "adaptive_sde"):  # x̂₀ clipping: the image-range parameter, off for latents
        assert SAMPLERS[name].param("clip_sample").image_range
        assert resolve_params(name, {}, {"clip_denoised": False})["clip_sample"] is False


def test_langevin_default_budget_is_at_most_1000_evaluations():
    spec = SAMPLERS["langevin"]
    assert nfe_of("langevin", spec.default_steps) <= 1000


def test_docs_describe_every_sampler_and_grid():
    samplers = (DOCS / "samplers.md").read_text()
    schedules = (DOCS / "schedules.md").read_text()
    for name in SAMPLERS:
        assert f"`{name}`" in samplers, name
    for grid in ("uniform", "log_snr", "karras"):
        assert f"`{grid}`" in schedules and f"`{grid}`" in samplers
    assert "## Time grids" in schedules
