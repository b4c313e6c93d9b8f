"""The sampler registry: name → scheduler class, its defaults, its parameters, a description.

The app builds its dropdown, tooltips and "Advanced" controls from it; the pipeline, the tests,
the benchmark and the evaluation table iterate over it. diffusers' ``.compatibles`` never lists
custom classes, so this list is explicit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from diffusers import DDIMScheduler, DDPMScheduler

from .scheduling_annealed_langevin import AnnealedLangevinScheduler
from .scheduling_dpmsolver_clipped import ClippedDPMSolverMultistepScheduler
from .scheduling_probability_flow import ProbabilityFlowScheduler
from .scheduling_vp_sde import VPSDEScheduler


@dataclass(frozen=True)
class Param:
    """One user-facing sampler parameter.

    Attributes:
        name: the config key (``where="config"``) or ``step`` keyword (``where="step"``).
        kind: ``"float"``, ``"int"``, ``"bool"`` or ``"choice"``.
        default: the registry default; ``None`` means "derived from the checkpoint".
        minimum, maximum: inclusive bounds for numbers.
        choices: allowed values for ``"choice"``.
        label: the symbol shown in the UI.
        help: one line for a tooltip.
    """

    name: str
    kind: str
    default: Any
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple = ()
    where: str = "config"
    label: str = ""
    help: str = ""

    def validate(self, value, sampler: str):
        """Return ``value`` coerced to the parameter's type, or raise ValueError naming it."""
        name = f"{sampler}: parameter {self.name!r}"
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{name} needs a value")
        if self.kind == "bool":
            if not isinstance(value, (bool, int)) or value not in (0, 1, True, False):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            return bool(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{name} must be one of {list(self.choices)}, got {value!r}")
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if self.kind == "int":
            if number != int(number):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            number = int(number)
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise ValueError(f"{name} must be between {self.minimum:g} and {self.maximum:g}, got {value!r}")
        return number


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    Attributes:
        name: registry key.
        title: display name.
        scheduler_cls: the diffusers-contract scheduler class.
        description: one line (the app's tooltip).
        default_steps: the default ``num_inference_steps``.
        steps_label: what ``num_inference_steps`` counts for this sampler.
        config: fixed config overrides applied on top of the checkpoint's schedule.
        params: user-facing parameters.
        divergence_hint: what to lower when the sample turns non-finite.
    """

    name: str
    title: str
    scheduler_cls: type
    description: str
    default_steps: int
    steps_label: str = "steps"
    config: dict = field(default_factory=dict)
    params: tuple = ()
    divergence_hint: str = "use more steps"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}


_CLIP = Param("clip_sample", "bool", True, label="clip x̂₀",
              help="clip the denoised estimate x̂₀ to [-1, 1] at every step (images)")
_T_EPS = Param("sampling_eps", "float", 1e-3, 1e-5, 0.1, label="t_ε", help="integration stops at t_ε instead of 0")
_SNR = Param("snr", "float", 0.16, 0.001, 1.0, label="r (SNR)", help="corrector signal-to-noise ratio")


def _corrector_steps(default: int) -> Param:
    return Param("corrector_steps", "int", default, 0, 10, label="corrector steps",
                 help="Langevin corrector steps per predictor step (predictor–corrector)")


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "ddpm", "DDPM (ancestral)", DDPMScheduler,
            "Ho et al. 2020, Algorithm 2: stochastic ancestral sampling with σ_t² = β̃_t; built for all 1000 steps.",
            default_steps=1000,
            config={"variance_type": "fixed_small", "timestep_spacing": "linspace"},
            params=(_CLIP,),
        ),
        SamplerSpec(
            "ddim", "DDIM", DDIMScheduler,
            "Song, Meng & Ermon 2021: the same network on a subsequence of timesteps; η = 0 is deterministic, "
            "η = 1 matches DDPM.",
            default_steps=50,
            config={"timestep_spacing": "leading", "set_alpha_to_one": True},
            params=(Param("eta", "float", 0.0, 0.0, 1.0, where="step", label="η",
                          help="stochasticity: 0 = deterministic DDIM, 1 = DDPM-like"), _CLIP,
                    Param("use_clipped_model_output", "bool", True, where="step", label="ε from clipped x̂₀",
                          help="recompute ε̂ from the clipped x̂₀ so the step stays consistent (keeps a small model "
                               "from carrying its noise errors to the end)")),
        ),
        SamplerSpec(
            "dpmsolver++", "DPM-Solver++ (2M)", ClippedDPMSolverMultistepScheduler,
            "Lu et al. 2022: second-order multistep solver of the probability-flow ODE in log-SNR time; good images "
            "in 15–25 steps (diffusers' implementation, for comparison).",
            default_steps=25,
            config={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True, "sample_max_value": 1.0},
            params=(Param("solver_order", "int", 2, 1, 3, label="order", help="order of the multistep solver"),
                    Param("thresholding", "bool", True, label="clip x̂₀",
                          help="threshold the data prediction x̂₀ to [-1, 1] (images)")),
        ),
        SamplerSpec(
            "langevin", "Annealed Langevin (SMLD/NCSN)", AnnealedLangevinScheduler,
            "Song & Ermon 2019, Algorithm 1: K Langevin steps x ← x + α_i s + √(2α_i) z at each of L geometric noise "
            "levels, α_i = ε σ_i²/σ_L², then a Tweedie denoising step (NCSNv2).",
            default_steps=100, steps_label="noise levels L",
            params=(
                Param("steps_per_level", "int", 3, 1, 100, label="K", help="Langevin steps per noise level"),
                Param("epsilon", "float", 5e-5, 1e-8, 1e-3, label="ε",
                      help="step size at the smallest σ; α_i = ε σ_i²/σ_L² (too large diverges)"),
                Param("sigma_max", "float", None, 1e-3, 1e4, label="σ_1", help="largest noise level (default: from the checkpoint, ≤ 80)"),
                Param("sigma_min", "float", None, 1e-4, 10.0, label="σ_L", help="smallest noise level (default: the checkpoint's)"),
                Param("final_denoise", "bool", True, label="final denoise", help="end with x + σ_L² s (NCSNv2)"),
            ),
            divergence_hint="lower the Langevin step size ε (epsilon)",
        ),
        SamplerSpec(
            "vp_sde", "VP-SDE Euler–Maruyama", VPSDEScheduler,
            "Song et al. 2021: Euler–Maruyama on the reverse-time VP-SDE from t = 1 to t_ε, noise removed on the last step.",
            default_steps=1000,
            params=(_T_EPS, _corrector_steps(0), _SNR),
            divergence_hint="use more steps, or lower the corrector SNR",
        ),
        SamplerSpec(
            "pc", "Predictor–corrector (EM + Langevin)", VPSDEScheduler,
            "Song et al. 2021, Algorithm 2 with the Euler–Maruyama predictor: one Langevin corrector step "
            "(SNR-based step size) before every predictor step.",
            default_steps=500, config={"corrector_steps": 1},
            params=(_T_EPS, _corrector_steps(1), _SNR),
            divergence_hint="lower the corrector SNR (snr)",
        ),
        SamplerSpec(
            "pf_ode", "Probability-flow ODE", ProbabilityFlowScheduler,
            "Song et al. 2021: the deterministic ODE dx = [f − ½g² s] dt with the SDE's marginals, solved with Heun "
            "(2 evaluations a step) or Euler.",
            default_steps=100,
            params=(Param("solver", "choice", "heun", choices=("heun", "euler"), label="solver",
                          help="Heun (2nd order, 2 NFE/step) or Euler"), _T_EPS, _CLIP,
                    Param("final_denoise", "bool", True, label="final denoise",
                          help="end with Tweedie's x̂₀ at t_ε (one more evaluation)")),
        ),
    )
}


def get_spec(name: str) -> SamplerSpec:
    """The registered sampler ``name``; ValueError listing the choices otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def resolve_params(name: str, params: Optional[dict] = None) -> dict:
    """Registry defaults updated with ``params``, validated; rejects parameters that do not apply."""
    spec = get_spec(name)
    values = spec.defaults()
    for key, value in (params or {}).items():
        if key not in values:
            names = ", ".join(values) or "none"
            raise ValueError(f"parameter {key!r} does not apply to sampler {name!r} (its parameters: {names})")
        values[key] = value
    return {key: spec.param(key).validate(value, name) for key, value in values.items()}


def create_scheduler(name: str, base_config: Optional[dict] = None, params: Optional[dict] = None):
    """A fresh scheduler for ``name`` and the keyword arguments its ``step`` needs.

    Args:
        name: a registry key.
        base_config: the checkpoint's DDPM schedule (``num_train_timesteps``, ``beta_*``,
            ``trained_betas``); the network is seen as ε-prediction (see ``EpsilonNetwork``)
            unless ``base_config`` says otherwise.
        params: user values for the sampler's parameters (see ``SAMPLERS[name].params``).

    Returns:
        ``(scheduler, step_kwargs)``.
    """
    spec = get_spec(name)
    values = resolve_params(name, params)
    accepted = set(inspect.signature(spec.scheduler_cls.__init__).parameters) - {"self"}
    config = {"prediction_type": "epsilon", **(base_config or {}), **spec.config}
    step_kwargs = {}
    for key, value in values.items():
        if spec.param(key).where == "step":
            step_kwargs[key] = value
        elif value is not None:
            config[key] = value
    config = {k: v for k, v in config.items() if k in accepted}
    return spec.scheduler_cls(**config), step_kwargs


def nfe_of(name: str, num_inference_steps: int, params: Optional[dict] = None, base_config: Optional[dict] = None) -> int:
    """Network evaluations a sampling run will make: ``len(scheduler.timesteps)``."""
    scheduler, _ = create_scheduler(name, base_config, params)
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)


def steps_for_nfe(name: str, nfe: int, params: Optional[dict] = None, base_config: Optional[dict] = None) -> int:
    """The ``num_inference_steps`` whose NFE is closest to ``nfe`` (for tables at equal cost)."""
    best, best_gap = None, None
    lo = 2 if name == "langevin" else 1
    for steps in range(lo, max(lo, nfe) + 1):
        try:
            n = nfe_of(name, steps, params, base_config)
        except ValueError:
            continue
        gap = abs(n - nfe)
        if best_gap is None or gap < best_gap:
            best, best_gap = steps, gap
        if n >= nfe:
            break
    if best is None:
        raise ValueError(f"sampler {name!r} cannot run with about {nfe} network evaluations")
    return best
