"""The denoiser tower: NemotronH's layers with NVIDIA's names, owning no cache.

The denoiser's weights have exactly the context tower's names and shapes, so it is built as a
second ``NemotronHModel`` (same layer-type table, same TP sharding and weight loaders, vLLM's
FusedMoE for its experts). What differs is who owns state: its attention layer *i* reads the
context tower's layer-*i* KV cache and its Mamba layer *i* the context layer-*i* state, so its
own ``Attention`` and ``MambaMixer2`` modules must not get a cache. They are taken out of
vLLM's layer registry (see :func:`vllm_twotower._compat.disown_cache_layers`) and only their
projections are used; the forward is in :mod:`.two_tower` (adaLN order per layer type).

Time conditioning (``t_embedder``, ``t_block``, ``scale_shift_tables``, top-level names in the
checkpoint) is tiny and replicated on every TP rank; it reuses the reference's modules.
"""

from __future__ import annotations

from vllm.model_executor.models.nemotron_h import NemotronHModel
from vllm.model_executor.models.utils import maybe_prefix

from .._compat import disown_cache_layers


def build_denoiser_tower(vllm_config, prefix: str) -> NemotronHModel:
    tower = NemotronHModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "denoiser_tower"))
    disown_cache_layers(vllm_config, tower)
    return tower
