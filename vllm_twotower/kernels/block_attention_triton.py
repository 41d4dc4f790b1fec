"""Block attention as one fused Triton kernel (plus a small split-merge kernel).

Twin of :func:`vllm_twotower.kernels.block_attention_ref.block_attention_reference`: same
arguments, same result within rounding. Runs on CUDA, and on CPU only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported; tests do that).

Design (flash-decoding with GQA packing):

* One program per (request, KV head, context split[, row chunk]). The 16 canvas queries times
  the ``G = Hq // Hkv`` query heads that share the KV head form one ``[16 * G, D]`` tile, so
  each K/V element fetched from the cache feeds ``16 * G`` rows of a tensor-core dot. Row ``m``
  is canvas token ``m // G``, query head ``kv_head * G + m % G``. Past 128 rows (G = 16 gives
  256) the tile is cut into row chunks on another grid axis: a 256 x D fp32 accumulator would
  not fit in registers.
* Context tiles hold ``BLOCK_N`` tokens and look up each token's cache block in the block
  table, so the cache block size need not be a power of two nor match the tile, and all four
  cache strides are honoured (the CPU backend's K is stored transposed). Softmax is online
  (running max, running sum, fp32 accumulator, exp2 with the scale folded into log2 units).
* The canvas's 16 K/V are one extra tile, taken by the last split only.
* Long contexts are cut into ``num_splits`` slices, each request's own context evenly, so all
  splits of a request do equal work whatever its length. ``num_splits`` depends only on shapes
  (batch, heads, block-table width), never on ``context_lens`` values: no host sync, and it is
  fixed for a CUDA graph. Splits write unnormalised partials ``(acc, max, sum)`` that
  ``_merge_splits`` combines; a split with no tokens writes ``(0, -inf, 0)``, which the merge
  weighs as zero. With one split the kernel normalises and writes ``out`` itself.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

CANVAS = 16  # query rows per request: one diffusion block
MAX_ROWS = 128  # packed rows per program; more would spill the fp32 accumulator
MIN_SPLIT_TOKENS = 256  # never split a context finer than this (merge cost, idle programs)
# Tests and benchmarks set this to force splits of at most this many context tokens.
SPLIT_TOKENS: int | None = None
_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr):
    if FP32_OPERANDS:  # Triton's interpreter multiplies bf16 bit patterns as integers
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attend_tile(
    q, k, v, valid, m_i, l_i, acc, qk_scale,
    PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of the packed queries over one tile of keys/values."""
    s = _dot(q, tl.trans(k), PRECISION, FP32_OPERANDS) * qk_scale  # log2 units
    s = tl.where(valid[None, :], s, float("-inf"))
    # Every tile holds at least one valid key, so m_new is finite and exp2 never sees -inf+inf.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, FP32_OPERANDS)
    return m_new, l_i, acc


@triton.jit
def _block_attention_splits(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, table_ptr, ctx_ptr, out_ptr, part_ptr, stat_ptr,
    qk_scale, block_size, num_splits, num_q_heads, num_tokens,
    sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
    skc_b, skc_t, skc_h, skc_d, svc_b, svc_t, svc_h, svc_d,
    table_stride, so_t, so_h, so_d,
    CANVAS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr,
):  # fmt: skip
    req = tl.program_id(0)
    kv_head = tl.program_id(1) // CHUNKS
    split = tl.program_id(2)

    rows = (tl.program_id(1) % CHUNKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < CANVAS * GROUP
    tok = req * CANVAS + rows // GROUP  # query row in [num_reqs * 16]
    q_head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, HEAD_DIM)
    q_off = tok[:, None] * sq_t + q_head[:, None] * sq_h + d[None, :] * sq_d
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # This split's slice of the context, a whole number of tiles; empty past the context.
    ctx_len = tl.load(ctx_ptr + req)
    per_split = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx_len)
    kc_ptr += kv_head * skc_h
    vc_ptr += kv_head * svc_h
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ok = t < end  # masked tokens read neither the block table nor the cache
        blk = tl.load(table_ptr + req * table_stride + t // block_size, mask=ok, other=0)
        blk = blk.to(tl.int64)
        slot = t % block_size
        k_off = blk[:, None] * skc_b + slot[:, None] * skc_t + d[None, :] * skc_d
        v_off = blk[:, None] * svc_b + slot[:, None] * svc_t + d[None, :] * svc_d
        k = tl.load(kc_ptr + k_off, mask=ok[:, None], other=0.0)
        v = tl.load(vc_ptr + v_off, mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, ok, m_i, l_i, acc, qk_scale, PRECISION, FP32_OPERANDS)

    if split == num_splits - 1:  # the canvas tile, exactly once per (request, KV head)
        c = req * CANVAS + tl.arange(0, CANVAS)
        k = tl.load(k_ptr + c[:, None] * sk_t + kv_head * sk_h + d[None, :] * sk_d)
        v = tl.load(v_ptr + c[:, None] * sv_t + kv_head * sv_h + d[None, :] * sv_d)
        every = tl.arange(0, CANVAS) < CANVAS
        m_i, l_i, acc = _attend_tile(
            q, k, v, every, m_i, l_i, acc, qk_scale, PRECISION, FP32_OPERANDS
        )

    if DIRECT:
        o_off = tok[:, None] * so_t + q_head[:, None] * so_h + d[None, :] * so_d
        o = acc / l_i[:, None]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partials: acc [num_tokens, Hq, splits, D]; stats [2, num_tokens, Hq, splits]
        idx = (tok * num_q_heads + q_head) * num_splits + split
        tl.store(part_ptr + idx[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(stat_ptr + idx, m_i, mask=row_ok)
        tl.store(stat_ptr + num_tokens * num_q_heads * num_splits + idx, l_i, mask=row_ok)


@triton.jit
def _merge_splits(
    part_ptr, stat_ptr, out_ptr, num_splits, num_q_heads, num_tokens, so_t, so_h, so_d,
    CANVAS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s for one (request, query head)."""
    tok = tl.program_id(0) * CANVAS + tl.arange(0, CANVAS)
    q_head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    idx = (tok * num_q_heads + q_head) * num_splits
    sums_ptr = stat_ptr + num_tokens * num_q_heads * num_splits
    m = tl.full([CANVAS], float("-inf"), tl.float32)
    for s in range(num_splits):  # finite: the canvas split always contributes
        m = tl.maximum(m, tl.load(stat_ptr + idx + s))
    l_sum = tl.zeros([CANVAS], tl.float32)
    acc = tl.zeros([CANVAS, HEAD_DIM], tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(stat_ptr + idx + s) - m)  # 0 for empty splits (m_s = -inf)
        l_sum += w * tl.load(sums_ptr + idx + s)
        acc += w[:, None] * tl.load(part_ptr + (idx + s)[:, None] * HEAD_DIM + d[None, :])
    o_off = tok[:, None] * so_t + q_head * so_h + d[None, :] * so_d
    tl.store(out_ptr + o_off, (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty))


def block_attention_triton(
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
    """See :func:`vllm_twotower.kernels.block_attention_ref.block_attention_reference`.

    Needs ``D`` a power of two >= 16 (tile shapes of ``tl.dot``) and the caches in the
    query's dtype (no fp8 cache).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    _check(query, key, value, key_cache, value_cache, block_table, context_lens)
    num_reqs = num_tokens // CANVAS
    out = torch.empty_like(query) if out is None else out
    if num_reqs == 0:
        return out

    group = num_q_heads // num_kv_heads
    block_m = min(triton.next_power_of_2(CANVAS * group), MAX_ROWS)
    chunks = triton.cdiv(CANVAS * group, block_m)
    block_size = key_cache.shape[1]
    fp32 = query.dtype == torch.float32
    interpret = triton.knobs.runtime.interpret  # CPU tests: no tensor cores to feed
    block_n = 32 if fp32 else 64  # fp32 operands take twice the shared memory
    max_context = block_table.shape[1] * block_size  # shape bound: no sync on context_lens
    splits = _num_splits(num_reqs * num_kv_heads * chunks, max_context, query.device)

    if splits == 1:
        part = stats = out  # unused: the kernel writes `out` directly
    else:
        part = query.new_empty(num_tokens, num_q_heads, splits, head_dim, dtype=torch.float32)
        stats = query.new_empty(2, num_tokens, num_q_heads, splits, dtype=torch.float32)
    _block_attention_splits[(num_reqs, num_kv_heads * chunks, splits)](
        query, key, value, key_cache, value_cache, block_table, context_lens, out, part, stats,
        scale * _LOG2E, block_size, splits, num_q_heads, num_tokens,
        *query.stride(), *key.stride(), *value.stride(),
        *key_cache.stride(), *value_cache.stride(),
        block_table.stride(0), *out.stride(),
        CANVAS=CANVAS, GROUP=group, HEAD_DIM=head_dim, CHUNKS=chunks,
        BLOCK_M=block_m, BLOCK_N=block_n,
        DIRECT=splits == 1, PRECISION="ieee" if fp32 or interpret else "tf32",
        FP32_OPERANDS=interpret,
        num_warps=8 if block_m > 64 else 4,
    )  # fmt: skip
    if splits > 1:
        _merge_splits[(num_reqs, num_q_heads)](
            part, stats, out, splits, num_q_heads, num_tokens, *out.stride(),
            CANVAS=CANVAS, HEAD_DIM=head_dim, num_warps=4,
        )  # fmt: skip
    return out


def _num_splits(programs_per_split: int, max_context: int, device: torch.device) -> int:
    """Context splits: enough programs for about two waves on the GPU, each split >= 256
    tokens. On CPU (the interpreter, tests) one split unless SPLIT_TOKENS forces more."""
    if SPLIT_TOKENS is not None:
        return max(1, triton.cdiv(max_context, SPLIT_TOKENS))
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(2 * _sm_count(device.index), programs_per_split)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))


@functools.lru_cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index or 0).multi_processor_count


def _check(query, key, value, key_cache, value_cache, block_table, context_lens) -> None:
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {head_dim}")
    if num_tokens % CANVAS:
        raise ValueError(f"query rows ({num_tokens}) must be whole canvases of {CANVAS}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    if key.shape != value.shape or key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"canvas K/V {tuple(key.shape)} do not match query {query.shape}")
    if key_cache.shape != value_cache.shape or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache views {tuple(key_cache.shape)} must be [blocks, bs, Hkv, D]")
    if len({t.dtype for t in (query, key, value, key_cache, value_cache)}) != 1:
        raise ValueError("query, canvas K/V and caches must share one dtype")
    if block_table.shape[0] < num_tokens // CANVAS or context_lens.shape[0] < num_tokens // CANVAS:
        raise ValueError("block_table and context_lens need a row per request")
