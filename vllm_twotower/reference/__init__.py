"""Pure-PyTorch reference of Nemotron-Labs-TwoTower: the project's executable specification.

Never imports vLLM and runs on CPU. The vLLM model, the kernels and the sampler are tested
against it. Entry points: :func:`load_reference` and the three ``generate_*`` modes.
"""

from .arch import TwoTowerArch
from .decode import (
    BLOCK_SIZE,
    CONFIDENCE_THRESHOLD,
    MASK_TOKEN_ID,
    STEPS_PER_BLOCK,
    GenerationResult,
    generate_ar,
    generate_mask_diffusion,
    generate_mock_ar,
)
from .loading import load_reference, read_state_dict
from .model import ContextCache, TwoTowerReference
from .unmask import UnmaskResult, unmask_step

__all__ = [
    "BLOCK_SIZE",
    "CONFIDENCE_THRESHOLD",
    "MASK_TOKEN_ID",
    "STEPS_PER_BLOCK",
    "ContextCache",
    "GenerationResult",
    "TwoTowerArch",
    "TwoTowerReference",
    "UnmaskResult",
    "generate_ar",
    "generate_mask_diffusion",
    "generate_mock_ar",
    "load_reference",
    "read_state_dict",
    "unmask_step",
]
