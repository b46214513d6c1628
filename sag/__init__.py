"""Self-Attention Guidance (Hong et al., ICCV 2023) for the OpenAI ADM / IDDPM U-Nets.

Equation numbers and notation refer to arXiv 2210.00939v4 (ICCV 2023 version).
"""
from .blur import gaussian_blur, gaussian_kernel_1d
from .guidance import GuidanceError, SAGConfig, SAGStep, blur_guidance, classifier_grad, run_model, sag_step
from .cfg import CFGConfig, CFGStep, CFGWith, cfg_eps
from .mask import attention_received, salient_mask
from .perturbed import PAGConfig, PAGStep, SEGConfig, SEGStep, default_pag_sites
from .sampling import NonFiniteError, StepInfo, guided_step, sample
from .schedule import Scheduled
from .seeding import SampleNoise

__all__ = [
    "CFGConfig", "CFGStep", "CFGWith", "PAGConfig", "PAGStep", "SEGConfig", "SEGStep", "cfg_eps", "default_pag_sites",
    "GuidanceError", "NonFiniteError", "SAGConfig", "SAGStep", "SampleNoise", "Scheduled", "StepInfo", "attention_received",
    "blur_guidance", "classifier_grad", "gaussian_blur", "gaussian_kernel_1d", "guided_step", "run_model",
    "sag_step", "salient_mask", "sample",
]
