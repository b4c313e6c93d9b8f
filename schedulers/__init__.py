"""Samplers that follow diffusers' scheduler contract, and the registry that lists them with
diffusers' own DDPM, DDIM and DPM-Solver++ (see ``registry.SAMPLERS``)."""

from .parametrization import EpsilonNetwork, ModelFamily
from .registry import SAMPLERS, Param, SamplerSpec, create_scheduler, get_spec, nfe_of, steps_for_nfe
from .scheduling_adaptive_sde import AdaptiveSDEScheduler
from .scheduling_annealed_langevin import AnnealedLangevinScheduler
from .scheduling_edm import EDMStochasticScheduler
from .scheduling_ipndm import IPNDMScheduler
from .scheduling_probability_flow import ProbabilityFlowScheduler
from .scheduling_sde_multistep import SDEMultistepScheduler
from .scheduling_vp_sde import VPSDEScheduler

__all__ = [
    "AdaptiveSDEScheduler", "AnnealedLangevinScheduler", "EDMStochasticScheduler", "EpsilonNetwork", "IPNDMScheduler",
    "ModelFamily", "Param", "ProbabilityFlowScheduler", "SAMPLERS", "SamplerSpec", "SDEMultistepScheduler", "VPSDEScheduler", "create_scheduler",
    "get_spec", "nfe_of", "steps_for_nfe",
]
