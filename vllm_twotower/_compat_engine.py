"""Where vLLM 0.32's engine internals are bent for TwoTower (to merge into _compat.py).

Written for vLLM 0.32.x; each function says what it changes and why.
"""

from __future__ import annotations

from dataclasses import replace

from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2


def disown_cache_layers(vllm_config, tower) -> None:
    """Take ``tower``'s attention and Mamba modules out of vLLM's layer registry.

    vLLM 0.32 allocates a KV cache / Mamba state for every ``Attention``/``MambaBase`` in
    ``compilation_config.static_forward_context``. The denoiser reads the context tower's
    caches instead, so its own modules (kept for their projections) must own none.
    """
    registry = vllm_config.compilation_config.static_forward_context
    for module in tower.modules():
        if isinstance(module, (Attention, MambaMixer2)):
            registry.pop(module.prefix if isinstance(module, MambaMixer2) else module.layer_name)


class _NoSpecSlotsMambaMixer2(MambaMixer2):
    """MambaMixer2 whose state has no speculative slots (diffusion mode only).

    vLLM 0.32 treats a diffusion canvas as 16 speculative tokens, which would give every
    context Mamba layer 1 + 16 state slots per request and a conv state 16 columns wider.
    TwoTower's context tower only ever advances on committed blocks: one slot suffices.
    """

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        return None if spec is None else replace(spec, num_speculative_blocks=0)


def drop_spec_slots(tower) -> None:
    """Give ``tower``'s Mamba mixers a single state slot per request (see above)."""
    for module in tower.modules():
        if type(module) is MambaMixer2:
            module.__class__ = _NoSpecSlotsMambaMixer2  # adds no state, overrides one method
            module.num_spec = 0


ARCHITECTURE = "NemotronHTwoTowerForCausalLM"


def install_config_hook() -> None:
    """Register TwoTower's config hook for its architecture (``MODELS_CONFIG_MAP`` is a plain
    dict in vLLM 0.32; DiffusionGemma's hook lives there too)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config_hook import TwoTowerConfigHook

    MODELS_CONFIG_MAP[ARCHITECTURE] = TwoTowerConfigHook


def install_request_validation() -> None:
    """Let TwoTower requests use ``temperature`` and ``seed`` with their usual meaning.

    vLLM 0.32 rejects ``temperature != 1`` and ``seed`` for *every* diffusion model in
    ``SamplingParams._validate_diffusion`` (DiffusionGemma has a fixed temperature schedule),
    before any model code runs. TwoTower samples each canvas position exactly like the
    reference (greedy at 0, Gumbel-max with a per-request seed above 0), so for this
    architecture only the check is replaced by :func:`validate_twotower_request`; every other
    model keeps vLLM's.
    """
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_diffusion
    if getattr(original, "_twotower", False):
        return

    def _validate_diffusion(self, model_config):
        if model_config.is_diffusion and model_config.architecture == ARCHITECTURE:
            validate_twotower_request(self)
        else:
            original(self, model_config)

    _validate_diffusion._twotower = True
    SamplingParams._validate_diffusion = _validate_diffusion


def validate_twotower_request(params) -> None:
    """Reject what diffusion decoding cannot honour, naming the field (HTTP 400 upstream)."""
    from vllm.exceptions import VLLMValidationError

    from .config import parse_decode_params

    unsupported = {
        "min_p": params.min_p > 1e-6,
        "min_tokens": params.min_tokens > 0,
        "logit_bias": bool(params.logit_bias),
        "bad_words": bool(params.bad_words),
        "allowed_token_ids": bool(params.allowed_token_ids),
    }
    for name, bad in unsupported.items():
        if bad:
            raise VLLMValidationError(
                f"{name} is not supported by TwoTower diffusion decoding", parameter=name
            )
    try:
        parse_decode_params(params.extra_args)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter="vllm_xargs") from exc


def install_cpu_moe() -> None:
    """Offer :class:`~vllm_twotower.model.cpu_moe.CpuRelu2Experts` first to vLLM's CPU MoE
    backend selection (``oracle.unquantized.backend_to_kernel_cls``, vLLM 0.32).

    vLLM's CPU experts reject non-gated relu² (NemotronH's experts), which would leave the
    model without any backend. Ours declines every other activation, so gated MoE models
    still get vLLM's kernels; non-CPU platforms are untouched.
    """
    from vllm.model_executor.layers.fused_moe.oracle import unquantized
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or getattr(unquantized.backend_to_kernel_cls, "_tt", 0):
        return
    original = unquantized.backend_to_kernel_cls

    def backend_to_kernel_cls(backend):
        classes = original(backend)
        if backend == unquantized.UnquantizedMoeBackend.CPU:
            from .model.cpu_moe import CpuRelu2Experts

            classes = [CpuRelu2Experts, *classes]
        return classes

    backend_to_kernel_cls._tt = 1
    unquantized.backend_to_kernel_cls = backend_to_kernel_cls

    # FusedMoEConfig.__post_init__ ends by refusing non-gated experts off CUDA/XPU/ROCm
    # (the check is its last statement in 0.32): skip that refusal for relu² only, which
    # CpuRelu2Experts now serves.
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

    post_init = FusedMoEConfig.__post_init__

    def __post_init__(self):
        try:
            post_init(self)
        except NotImplementedError as exc:
            if self.activation != MoEActivation.RELU2_NO_MUL or "is_act_and_mul" not in str(exc):
                raise

    FusedMoEConfig.__post_init__ = __post_init__
