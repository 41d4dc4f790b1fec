"""The context tower: vLLM's own NemotronH, under NVIDIA's ``context_tower.`` prefix.

It is the frozen AR backbone, so it is reused as-is through NemotronH's layer-type table:
its attention layers own the paged KV cache and its Mamba layers own the Mamba state slots.
What changes for TwoTower is the weight naming (``context_tower.*``, ``context_lm_head``) and,
in diffusion mode, the Mamba state sizing (see :mod:`vllm_twotower._compat`).
"""

from __future__ import annotations

from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.nemotron_h import NemotronHModel
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix

# NVIDIA's names -> vLLM's NemotronH module names, within each tower.
TOWER_WEIGHTS_MAPPER_KWARGS = dict(
    orig_to_new_substr={"A_log": "A", "embeddings": "embed_tokens"},
    orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"),
        ".k_proj": (".qkv_proj", "k"),
        ".v_proj": (".qkv_proj", "v"),
    },
)

# Everything that belongs to the denoiser: skipped when only the context tower is built (AR).
DENOISER_PREFIXES = (
    "denoiser_tower.",
    "lm_head.",
    "t_embedder.",
    "t_block.",
    "scale_shift_tables.",
)


def ar_weights_mapper() -> WeightsMapper:
    return WeightsMapper(
        orig_to_new_prefix=dict.fromkeys(DENOISER_PREFIXES),
        **TOWER_WEIGHTS_MAPPER_KWARGS,
    )


def build_context_tower(vllm_config, prefix: str):
    """(tower, head, logits processor) with NVIDIA's names ``context_tower``/``context_lm_head``."""
    config = vllm_config.model_config.hf_config
    tower = NemotronHModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "context_tower"))
    head = ParallelLMHead(
        config.vocab_size,
        config.hidden_size,
        quant_config=vllm_config.quant_config,
        prefix=maybe_prefix(prefix, "context_lm_head"),
    )
    return tower, head, LogitsProcessor(config.vocab_size)
