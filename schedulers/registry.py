"""The sampler registry: name → scheduler class, its defaults, its parameters, its limits, a description.

The app builds its dropdown, tooltips, "Advanced" controls and slider ranges from it; the
pipeline, the app's server-side validation, the tests, the benchmarks and the evaluation table
iterate over it and read every limit from it (``SamplerSpec.steps_range``, ``Param.bounds`` and
:data:`LIMITS`). No code outside this module asks which sampler it is running.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from diffusers import DDIMScheduler, DDPMScheduler

from .schedules import TIME_GRIDS, DiscreteVPSchedule
from .scheduling_adaptive_sde import AdaptiveSDEScheduler
from .scheduling_annealed_langevin import DEFAULT_DELTA, DEFAULT_STEPS_PER_LEVEL, AnnealedLangevinScheduler
from .scheduling_dpmsolver_clipped import ClippedDPMSolverMultistepScheduler
from .scheduling_edm import EDMStochasticScheduler
from .scheduling_ipndm import IPNDMScheduler
from .scheduling_probability_flow import ProbabilityFlowScheduler
from .scheduling_sde_multistep import SDEMultistepScheduler
from .scheduling_vp_sde import PREDICTORS, VPSDEScheduler


@dataclass(frozen=True)
class Limits:
    """Limits that hold for every sampler and checkpoint (sampler-specific ones are on :class:`SamplerSpec`).

    Attributes:
        max_nfe: network evaluations one sampling run may make.
        max_batch: images one pipeline call may draw.
        max_guidance: largest classifier-free guidance weight w accepted.
        app_max_batch: images one request to the app may ask for (its gallery shows them all).
    """

    max_nfe: int = 20_000
    max_batch: int = 10_000
    max_guidance: float = 20.0
    app_max_batch: int = 64


LIMITS = Limits()
LANGEVIN_DEFAULT_LEVELS = 333  # L: L·K + 1 = 1000 NFE (measured with DEFAULT_DELTA and DEFAULT_STEPS_PER_LEVEL: docs/samplers.md)
EDM_DEFAULT_STEPS = 50  # N Heun steps: 2N − 1 = 99 NFE
IPNDM_DEFAULT_STEPS = 20
SDE_MULTISTEP_DEFAULT_STEPS = 20
ADAPTIVE_DEFAULT_BUDGET, ADAPTIVE_DEFAULT_RTOL = 1000, 0.05


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
        sigma_bounded: a noise level σ: it must also lie in the checkpoint's σ range.
        image_range: clips x̂₀ to the image range [−1, 1]: off by default, and refused, on a checkpoint
            whose ``base_config`` says ``clip_denoised: False`` (a latent network's x̂₀ is no image).
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
    sigma_bounded: bool = False
    image_range: bool = False

    def bounds(self, base_config: Optional[dict] = None) -> tuple:
        """(minimum, maximum) for this checkpoint: σ parameters are clamped to its σ range."""
        lo, hi = self.minimum, self.maximum
        if self.sigma_bounded and base_config:
            schedule = DiscreteVPSchedule.from_config(base_config)
            lo = max(lo, schedule.sigma_min) if lo is not None else schedule.sigma_min
            hi = min(hi, schedule.sigma_max) if hi is not None else schedule.sigma_max
        return lo, hi

    def validate(self, value, sampler: str, base_config: Optional[dict] = None):
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
        lo, hi = self.bounds(base_config)
        # σ bounds come from float64 schedules: allow for the rounding of a value shown to the user
        slack = 1e-6 if self.sigma_bounded else 0.0
        if (lo is not None and number < lo * (1 - slack)) or (hi is not None and number > hi * (1 + slack)):
            if lo is None or hi is None:
                raise ValueError(f"{name} must be {'at least ' + format(lo, '.4g') if hi is None else 'at most ' + format(hi, '.4g')}, "
                                 f"got {value!r}")
            raise ValueError(f"{name} must be between {lo:.4g} and {hi:.4g}, got {value!r}")
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
        min_steps: the smallest ``num_inference_steps``.
        at_most_T: a discrete-time sampler that visits distinct training timesteps, so it takes at
            most T = ``num_train_timesteps`` of the checkpoint's schedule.
        variants: (label, params) rows under which the evaluation table and the benchmarks run
            this sampler; empty means one row with the defaults.
        presets: ``(label, steps, params)`` settings the app offers for this sampler: a fast
            setting (about 20 NFE or fewer; label starting ``"fast"``) and the paper's setting
            (label starting ``"paper"``, naming the paper). ``steps`` is a ``num_inference_steps``
            (what ``steps_label`` counts), ``params`` the parameters that differ from the
            defaults; every preset passes ``check_steps`` and ``resolve_params`` on the default
            DDPM schedule (tested).
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
    min_steps: int = 1
    at_most_T: bool = False
    variants: tuple = ()
    presets: tuple = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def table_rows(self) -> list:
        """[(label, params)]: the rows this sampler contributes to tables and benchmarks."""
        return [(label, dict(params)) for label, params in self.variants] or [(self.title, {})]

    def steps_range(self, base_config: Optional[dict] = None, params: Optional[dict] = None) -> tuple[int, int]:
        """(smallest, largest) ``num_inference_steps`` on a checkpoint with these parameters.

        The largest is T for a discrete-time sampler, and in every case the largest step count
        whose NFE stays within ``LIMITS.max_nfe`` (NFE is affine in the step count for every sampler).
        """
        hi = LIMITS.max_nfe
        if self.at_most_T:
            hi = min(hi, DiscreteVPSchedule.from_config(base_config or {}).num_train_timesteps)
        lo = self.min_steps
        n_lo, n_next = nfe_of(self.name, lo, params, base_config), nfe_of(self.name, lo + 1, params, base_config)
        per_step = n_next - n_lo
        if per_step > 0:
            hi = min(hi, lo + (LIMITS.max_nfe - n_lo) // per_step)
        return lo, max(lo, hi)

    def check_steps(self, steps, base_config: Optional[dict] = None, params: Optional[dict] = None) -> int:
        """``steps`` as an int, or ValueError naming the limit that it breaks."""
        what = f"{self.title}: num_inference_steps" + (f" ({self.steps_label})" if self.steps_label != "steps" else "")
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps):
            raise ValueError(f"{what} must be a whole number, got {steps!r}")
        lo, hi = self.steps_range(base_config, params)
        if not lo <= steps <= hi:
            why = ""
            if self.at_most_T and hi == DiscreteVPSchedule.from_config(base_config or {}).num_train_timesteps:
                why = f" (the checkpoint's T = {hi} training timesteps)"
            elif hi < LIMITS.max_nfe:
                why = f" (at most {LIMITS.max_nfe:,} network evaluations)"
            raise ValueError(f"{what} must be between {lo} and {hi}{why}, got {int(steps)}")
        return int(steps)


_CLIP = Param("clip_sample", "bool", True, image_range=True, label="clip x̂₀",
              help="clip the denoised estimate x̂₀ to [-1, 1] at every step (images)")
_T_EPS = Param("sampling_eps", "float", 1e-3, 1e-5, 0.1, label="t_ε", help="integration stops at t_ε instead of 0")
_SNR = Param("snr", "float", 0.16, 0.001, 1.0, label="r (SNR)", help="corrector signal-to-noise ratio")


def _time_grid(default: str) -> Param:
    return Param("time_grid", "choice", default, choices=TIME_GRIDS, label="time grid",
                 help="where the steps lie: uniform in t (textbook SDE samplers), log_snr (equal steps in log-SNR; "
                      "Langevin's geometric levels) or karras (EDM's ρ = 7 spacing); the NFE does not change")


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
            params=(_CLIP,), at_most_T=True, variants=(("DDPM", {}),),
            presets=(("fast: 20 steps", 20, {}),
                     ("paper: Ho et al. 2020, Algorithm 2: all 1000 steps", 1000, {})),
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
            at_most_T=True, variants=(("DDIM η=0", {"eta": 0.0}), ("DDIM η=1", {"eta": 1.0})),
            presets=(("fast: 20 steps, η = 0", 20, {"eta": 0.0}),
                     ("paper: Song, Meng & Ermon 2021, Table 1: 100 steps, η = 0", 100, {"eta": 0.0})),
        ),
        SamplerSpec(
            "dpmsolver++", "DPM-Solver++ (2M)", ClippedDPMSolverMultistepScheduler,
            "Lu et al. 2022: second-order multistep solver of the probability-flow ODE in log-SNR time; good images "
            "in 15–25 steps (diffusers' implementation, for comparison).",
            default_steps=25,
            config={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True, "sample_max_value": 1.0},
            params=(Param("solver_order", "int", 2, 1, 3, label="order", help="order of the multistep solver"),
                    Param("thresholding", "bool", True, image_range=True, label="clip x̂₀",
                          help="threshold the data prediction x̂₀ to [-1, 1] (images)")),
            at_most_T=True,
            presets=(("fast: 10 steps", 10, {}),
                     ("paper: Lu et al. 2022b: 20 steps of 2M (guided sampling)", 20, {"solver_order": 2})),
        ),
        SamplerSpec(
            "langevin", "Annealed Langevin (SMLD/NCSN)", AnnealedLangevinScheduler,
            "Song & Ermon 2019, Algorithm 1: K Langevin steps x ← x + α_i s + √(2α_i) z at each of L noise levels "
            "(geometric by default), α_i = δ σ_i² (the paper's ε = δ σ_L²), noise of variance α_i(2 − δ) so each step keeps "
            "the level's spread (2α_i, the paper's, with noise correction off), then a Tweedie denoising step (NCSNv2).",
            default_steps=LANGEVIN_DEFAULT_LEVELS, steps_label="noise levels L",
            params=(
                Param("steps_per_level", "int", DEFAULT_STEPS_PER_LEVEL, 1, 100, label="K", help="Langevin steps per noise level"),
                Param("delta", "float", DEFAULT_DELTA, 1e-4, 1.0, label="δ (step / σ_i²)",
                      help="Langevin step relative to the level: α_i = δ σ_i²; works on every checkpoint. Larger mixes "
                           "faster but widens each mode by about δ/4"),
                Param("step_size", "float", None, 1e-10, 1e-2, label="step size ε",
                      help="the paper's absolute step size at the smallest σ (ε = δ σ_L²); when set it overrides δ "
                           "(ε ≥ 2σ_L² diverges)"),
                Param("sigma_max", "float", None, label="σ_1", sigma_bounded=True,
                      help="largest noise level (default: from the checkpoint, ≤ 80)"),
                Param("sigma_min", "float", None, label="σ_L", sigma_bounded=True,
                      help="smallest noise level (default: the checkpoint's)"),
                Param("final_denoise", "bool", True, label="final denoise", help="end with x + σ_L² s (NCSNv2)"),
                _time_grid("log_snr"),
                Param("noise_correction", "bool", True, label="noise correction",
                      help="Langevin noise of variance α_i(2 − δ) instead of 2α_i, so each step keeps the level's own "
                           "spread exactly (off: the paper's Algorithm 1, which over-disperses by about δ/2)"),
            ),
            divergence_hint="lower the Langevin step size δ (delta), or ε (step_size) if you set it",
            min_steps=2, variants=(("Annealed Langevin", {}),
                                   ("Annealed Langevin, δ = 0.5", {"delta": 0.5}),
                                   ("Annealed Langevin, Karras grid", {"time_grid": "karras"}),
                                   ("Annealed Langevin, K = 1, δ = 1", {"steps_per_level": 1, "delta": 1.0}),),
            # fast: measured on both bundled models, δ = 0.5 gives digits at 100 NFE where δ ≤ 0.2 leaves noise
            presets=(("fast: 33 levels, K = 3, δ = 0.5 (100 NFE)", 33, {"steps_per_level": 3, "delta": 0.5}),
                     ("paper: NCSNv2 (Song & Ermon 2020), CIFAR-10: L = 232, K = 5, δ = 0.062 (1161 NFE)", 232,
                      {"steps_per_level": 5, "delta": 0.062, "noise_correction": False})),
        ),
        SamplerSpec(
            "vp_sde", "VP-SDE Euler–Maruyama", VPSDEScheduler,
            "Song et al. 2021: Euler–Maruyama on the reverse-time VP-SDE from t = 1 to t_ε, noise removed on the last step.",
            default_steps=1000,
            params=(_T_EPS, _corrector_steps(0), _SNR, _time_grid("uniform")),
            divergence_hint="use more steps, or lower the corrector SNR",
            variants=(("VP-SDE Euler–Maruyama", {}),
                      ("VP-SDE Euler–Maruyama, log-SNR grid", {"time_grid": "log_snr"}),
                      ("VP-SDE Euler–Maruyama, Karras grid", {"time_grid": "karras"}),),
            # fast: Euler–Maruyama needs ~50 steps whatever the grid; measured classifier-FID 2.55 / 1.82 / 2.73
            # (DDPM / NCSN / latent DiT) uniform, 3.41 / 2.08 / 2.52 log-SNR, 61.3 / 6.87 / 2.96 log-SNR at 20 steps
            presets=(("fast: 50 uniform steps", 50, {"time_grid": "uniform"}),
                     ("paper: Song et al. 2021: 1000 uniform steps", 1000, {"time_grid": "uniform"})),
        ),
        SamplerSpec(
            "pc", "Predictor–corrector (predictor + Langevin corrector)", VPSDEScheduler,
            "Song et al. 2021, Algorithm 2 with the Euler–Maruyama predictor: one Langevin corrector step "
            "(SNR-based step size) before every predictor step.",
            default_steps=500, config={"corrector_steps": 1},
            params=(_T_EPS, _corrector_steps(1), _SNR, _time_grid("uniform"),
                    Param("predictor", "choice", "euler_maruyama", choices=PREDICTORS, label="predictor",
                          help="euler_maruyama: Song et al.'s Algorithm 2; ancestral: the forward process's posterior "
                               "between grid times, exact for a correct x̂₀ however coarse the grid (usable at 20 NFE)")),
            divergence_hint="lower the corrector SNR (snr)",
            variants=(("Predictor–corrector", {}),
                      ("Predictor–corrector, log-SNR grid", {"time_grid": "log_snr"}),
                      ("Predictor–corrector, Karras grid", {"time_grid": "karras"}),
                      ("Predictor–corrector (ancestral), log-SNR grid", {"predictor": "ancestral", "time_grid": "log_snr"}),
                      ("Predictor–corrector (ancestral), Karras grid", {"predictor": "ancestral", "time_grid": "karras"}),),
            # fast: measured classifier-FID 2.87 / 2.28 / 3.44 (DDPM / NCSN / latent DiT) at 20 NFE; Euler–Maruyama
            # predictor on the same grid 1,221 / 323 / 4.50
            presets=(("fast: 10 steps, ancestral predictor, log-SNR grid (20 NFE)", 10,
                      {"time_grid": "log_snr", "predictor": "ancestral"}),
                     ("paper: Song et al. 2021, App. G: 1000 steps, C = 1, r = 0.16 (2000 NFE)", 1000,
                      {"corrector_steps": 1, "snr": 0.16, "time_grid": "uniform"})),
        ),
        SamplerSpec(
            "pf_ode", "Probability-flow ODE", ProbabilityFlowScheduler,
            "Song et al. 2021: the deterministic ODE dx = [f − ½g² s] dt with the SDE's marginals, solved with Heun "
            "(2 evaluations a step) or Euler.",
            default_steps=100,
            params=(Param("solver", "choice", "heun", choices=("heun", "euler"), label="solver",
                          help="Heun (2nd order, 2 NFE/step) or Euler"), _T_EPS, _CLIP,
                    Param("final_denoise", "bool", True, label="final denoise",
                          help="end with Tweedie's x̂₀ at t_ε (one more evaluation)"), _time_grid("uniform"),
                    Param("variable", "choice", "t", choices=("t", "sigma"), label="step in",
                          help="t: Song et al.'s steps in t on the VP state; sigma: the same ODE stepped in σ on the "
                               "VE state (EDM), far more accurate per step")),
            variants=(("Probability-flow ODE (Heun)", {}),
                      ("Probability-flow ODE (Heun), log-SNR grid", {"time_grid": "log_snr"}),
                      ("Probability-flow ODE (Heun), Karras grid", {"time_grid": "karras"}),
                      ("Probability-flow ODE (Heun in σ), log-SNR grid", {"time_grid": "log_snr", "variable": "sigma"}),),
            # fast: measured on the bundled DDPM model, classifier-FID 1.81 at 19 NFE in σ against 20.1 in t
            presets=(("fast: 9 Heun steps in σ on the log-SNR grid (19 NFE)", 9,
                      {"solver": "heun", "time_grid": "log_snr", "variable": "sigma"}),
                     ("paper: Song et al. 2021's discretisation: 1000 Euler steps, uniform", 1000,
                      {"solver": "euler", "time_grid": "uniform"})),
        ),
        SamplerSpec(
            "edm", "EDM stochastic (Heun + churn)", EDMStochasticScheduler,
            "Karras et al. 2022, Algorithm 2: Heun steps on the σ-ODE with noise added before each step "
            "(S_churn, S_tmin, S_tmax, S_noise), Karras σ grid; 2N − 1 evaluations.",
            default_steps=EDM_DEFAULT_STEPS, steps_label="Heun steps N",
            params=(Param("s_churn", "float", 30.0, 0.0, 1000.0, label="S_churn",
                          help="total churn over the N steps (0 = deterministic Heun, Algorithm 1)"),
                    Param("s_tmin", "float", 0.01, 0.0, 1000.0, label="S_tmin", help="churn only at σ ≥ S_tmin"),
                    Param("s_tmax", "float", 1.0, 0.0, 1000.0, label="S_tmax", help="churn only at σ ≤ S_tmax"),
                    Param("s_noise", "float", 1.007, 0.5, 1.5, label="S_noise",
                          help="standard deviation of the churn noise (slightly above 1 offsets over-denoising)"),
                    _time_grid("karras"), _CLIP),
            divergence_hint="use more steps, or lower S_churn",
            presets=(("fast: 10 deterministic Heun steps (19 NFE; Algorithm 1)", 10, {"s_churn": 0.0}),
                     ("paper: Karras et al. 2022, Table 5, ImageNet-64: 256 steps, S_churn 80, S_tmin 0.05, S_tmax 50, "
                      "S_noise 1.003 (511 NFE)", 256,
                      {"s_churn": 80.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003, "time_grid": "karras"})),
        ),
        SamplerSpec(
            "ipndm", "iPNDM (Adams–Bashforth multistep)", IPNDMScheduler,
            "Zhang & Chen 2023: Adams–Bashforth multistep on the probability-flow ODE in σ, one evaluation per "
            "step, lower orders to start; the most accurate sampler here at 10–20 NFE on exact scores (measured).",
            default_steps=IPNDM_DEFAULT_STEPS,
            params=(Param("max_order", "int", IPNDMScheduler.DEFAULT_ORDER, 1, 4, label="order",
                          help="largest Adams–Bashforth order (1 = Euler, i.e. deterministic DDIM; 3 measured best)"),
                    _time_grid(IPNDMScheduler.DEFAULT_GRID), _CLIP),
            presets=(("fast: 10 steps", 10, {}),
                     ("paper: Zhang & Chen 2023: iPNDM of order 4, 20 steps", 20, {"max_order": 4})),
        ),
        SamplerSpec(
            "sde_multistep", "SDE multistep (DPM-Solver++(2M) SDE)", SDEMultistepScheduler,
            "Lu et al. 2022b: the reverse SDE solved exactly for a frozen denoiser (η = 1, order 1: DDPM's ancestral "
            "step), with the denoiser extrapolated from the last step (order 2); one evaluation per step, fresh noise "
            "every step. The best sampler here at 10–20 NFE on the bundled models (measured).",
            default_steps=SDE_MULTISTEP_DEFAULT_STEPS,
            params=(Param("eta", "float", SDEMultistepScheduler.DEFAULT_ETA, 0.0, 1.0, label="η",
                          help="stochasticity: 0 = the probability-flow ODE (DPM-Solver++(2M)), 1 = the reverse SDE"),
                    Param("denoiser_order", "int", SDEMultistepScheduler.DEFAULT_ORDER, 1, 2, label="order",
                          help="1 = frozen denoiser (DDPM's ancestral step at η = 1), 2 = extrapolated from the last step"),
                    _time_grid(SDEMultistepScheduler.DEFAULT_GRID), _CLIP),
            variants=(("SDE multistep", {}), ("SDE multistep, Karras grid", {"time_grid": "karras"})),
            presets=(("fast: 10 steps on the Karras grid", 10, {"time_grid": "karras"}),
                     ("paper: Lu et al. 2022b: SDE-DPM-Solver++(2M), 20 steps", 20, {"eta": 1.0, "denoiser_order": 2})),
        ),
        SamplerSpec(
            "adaptive_sde", "Adaptive reverse SDE (Gotta Go Fast)", AdaptiveSDEScheduler,
            "Jolicoeur-Martineau et al. 2021: Euler–Maruyama vs improved Euler on the reverse VP-SDE, step size "
            "from the error estimate; set a tolerance, the solver reports its NFE (steps = a budget, at most).",
            default_steps=ADAPTIVE_DEFAULT_BUDGET, steps_label="NFE budget (at most)",
            params=(Param("rtol", "float", ADAPTIVE_DEFAULT_RTOL, 1e-4, 1.0, label="ε_rel",
                          help="relative tolerance: smaller is more accurate and spends more evaluations"),
                    Param("atol", "float", 0.0078, 1e-6, 1.0, label="ε_abs",
                          help="absolute tolerance (0.0078: one 8-bit level of a [-1, 1] image)"),
                    _T_EPS,
                    Param("final_denoise", "bool", True, label="final denoise",
                          help="end with Tweedie's x̂₀ at t_ε (one more evaluation)"),
                    _CLIP),
            divergence_hint="lower the tolerance (rtol)", min_steps=3,
            presets=(("fast: ε_rel = 0.1, at most 1000 NFE", 1000, {"rtol": 0.1}),
                     ("paper: Jolicoeur-Martineau et al. 2021: ε_rel = 0.01, ε_abs = 0.0078", 2000,
                      {"rtol": 0.01, "atol": 0.0078})),
        ),
    )
}


def get_spec(name: str) -> SamplerSpec:
    """The registered sampler ``name``; ValueError listing the choices otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def resolve_params(name: str, params: Optional[dict] = None, base_config: Optional[dict] = None) -> dict:
    """Registry defaults updated with ``params``, validated (σ parameters against ``base_config``'s σ range);
    rejects parameters that do not apply."""
    spec = get_spec(name)
    values = spec.defaults()
    images = (base_config or {}).get("clip_denoised", True)  # False for latent checkpoints
    if not images:
        values.update({p.name: False for p in spec.params if p.image_range})
    for key, value in (params or {}).items():
        if key not in values:
            names = ", ".join(values) or "none"
            raise ValueError(f"parameter {key!r} does not apply to sampler {name!r} (its parameters: {names})")
        if not images and spec.param(key).image_range and value:
            raise ValueError(f"{name}: parameter {key!r} clips x̂₀ to the image range [-1, 1], which does not apply to "
                             "a latent checkpoint (its x̂₀ is a latent)")
        values[key] = value
    return {key: spec.param(key).validate(value, name, base_config) for key, value in values.items()}


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
    values = resolve_params(name, params, base_config)
    accepted = set(inspect.signature(spec.scheduler_cls.__init__).parameters) - {"self"}
    config = {"prediction_type": "epsilon", **(base_config or {}), **spec.config}
    config = {k: v for k, v in config.items() if k in accepted}  # schedule keys this class has no use for
    step_kwargs = {}
    for key, value in values.items():
        if spec.param(key).where == "step":
            step_kwargs[key] = value
        elif key not in accepted:  # a registry entry out of step with its class: never drop a user's value
            raise TypeError(f"{spec.scheduler_cls.__name__} takes no config parameter {key!r} (registry entry {name!r})")
        elif value is not None:
            config[key] = value
    return spec.scheduler_cls(**config), step_kwargs


def nfe_of(name: str, num_inference_steps: int, params: Optional[dict] = None, base_config: Optional[dict] = None) -> int:
    """Network evaluations a sampling run will make: ``len(scheduler.timesteps)`` (no range check here:
    see :meth:`SamplerSpec.check_steps`)."""
    scheduler, _ = create_scheduler(name, base_config, params)
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)


def steps_for_nfe(name: str, nfe: int, params: Optional[dict] = None, base_config: Optional[dict] = None) -> int:
    """The ``num_inference_steps`` whose NFE is closest to ``nfe`` (for tables at equal cost)."""
    best, best_gap = None, None
    lo, hi = get_spec(name).steps_range(base_config, params)
    for steps in range(lo, min(hi, max(lo, nfe)) + 1):
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
