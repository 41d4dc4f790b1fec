"""Fused confidence unmasking in Triton; twin of :func:`vllm_twotower.reference.unmask.unmask_step`.

Same arguments, same :class:`UnmaskResult`, and never a softmax or any ``[B, L, V]`` float
temporary. Two launches:

1. ``_row_kernel``, one program per canvas position (row), streams the vocab in tiles of
   ``BLOCK_V``: an online max / sum-of-exp of the logits (the log-softmax normaliser), the
   running argmax (lowest id on ties) and, for sampled rows, the same statistics of
   ``logits / T``. A second vocab pass then runs only where needed: for sampled rows it takes
   the Gumbel-max of ``log_softmax(logits / T) + gumbel`` with the reference's counter-hash
   noise (bit-exact: same MurmurHash3 fmix32 chain and the same ``(h >> 8 + 0.5) / 2**24``);
   for greedy rows only when the two largest logits round to the same log-prob (see below).
   The mask token's logit is replaced by ``MASK_LOGIT`` on load, exactly as the reference does.
2. ``_commit_kernel``, one program per request over its ``L`` (16) positions: the commit rule
   (strict threshold, at least one, at least ``ceil(n / (T - s))``, all on the last step) and
   the rank by (conf desc, position asc) from a pairwise ``L x L`` comparison.

Arithmetic follows the reference op for op: ``log_softmax`` is ``(x - max) - log(sum)``,
``x / T`` is IEEE division (``div_rn``), and on GPU the logs of the noise, the final ``log(sum)``
and ``conf = exp(logprob)`` use libdevice (``logf``/``expf``, as torch's CUDA kernels do); the
interpreter uses numpy. What cannot match bit for bit is the sum of exponentials (different
summation order, fast ``exp`` on GPU): ``logprob``/``conf`` differ from the reference by a few
ulp, and a token can differ only where two candidates are within an ulp or so of each other:

* greedy: the reference takes the argmax of the *log-probs*, where two distinct logits within
  half an ulp of ``log(sum)`` collapse to one value and the lowest id wins. The kernel tracks the
  top two logits and, when they collapse, redoes the argmax on the reference's log-probs, so it
  matches whenever its ``log(sum)`` equals torch's;
* sampled: the noisy scores inherit the difference in the scaled ``log(sum)``, so the argmax
  can flip only where the best two noisy scores are within about an ulp of each other (rare).

Also: libdevice on NVIDIA is built flush-to-zero, so a ``conf`` below ~1e-38 reads 0.

Inputs: ``logits`` ``[B, L, V]`` or ``[B * L, V]`` of any float dtype and any row strides;
``threshold`` is compared in float64 when given as float64 (as torch promotes), else float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..reference.unmask import MASK_LOGIT, UnmaskResult

# Output allocator; tests replace it with one that poisons (NaN / garbage) to catch skipped writes.
_empty = torch.empty

_MAX_BLOCK_V = 4096  # vocab tile: 16 fp32 per thread at 8 warps


@triton.jit
def _fmix32(h):
    # MurmurHash3's finaliser on uint32 (multiplications wrap mod 2**32, shifts are logical).
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _load_tile(base, offs, stride_v, V, mask_id, MASK_LOGIT: tl.constexpr):
    x = tl.load(base + offs.to(tl.int64) * stride_v, mask=offs < V, other=float("-inf"))
    return tl.where(offs == mask_id, MASK_LOGIT, x.to(tl.float32))


@triton.jit
def _row_kernel(
    logits_ptr, stride_b, stride_l, stride_v,
    temp_ptr, seed_ptr, step_ptr, pos_ptr,
    pred_ptr, conf_ptr, logprob_ptr,
    L, V, mask_id,
    MASK_LOGIT: tl.constexpr, BLOCK_V: tl.constexpr, PRECISE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = row // L
    base = logits_ptr + b.to(tl.int64) * stride_b + (row - b * L).to(tl.int64) * stride_l
    t_raw = tl.load(temp_ptr + b)
    sampled = t_raw > 0
    t = tl.where(sampled, t_raw.to(tl.float32), 1.0)
    ar = tl.arange(0, BLOCK_V)

    # Running max starts at the mask token's logit: it is part of every row, so this is exact
    # and keeps exp(m_old - m_new) finite when a whole tile is -inf.
    m = tl.full((), MASK_LOGIT, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    ms = tl.math.div_rn(m, t)  # scaled statistics (sampled rows only)
    ss = tl.full((), 0.0, tl.float32)
    m1 = tl.full((), float("-inf"), tl.float32)  # top two logits and the first one's id
    m2 = tl.full((), float("-inf"), tl.float32)
    i1 = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        x = _load_tile(base, start + ar, stride_v, V, mask_id, MASK_LOGIT)
        tmax, targ = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        m_new = tl.maximum(m, tmax)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        if sampled:
            xs = tl.math.div_rn(x, t)
            ms_new = tl.maximum(ms, tl.max(xs, 0))
            ss = ss * tl.exp(ms - ms_new) + tl.sum(tl.exp(xs - ms_new), 0)
            ms = ms_new
        else:
            t2 = tl.max(tl.where(ar == targ, float("-inf"), x), 0)
            better = tmax > m1  # strict: an earlier tile keeps ties (lowest id)
            m2 = tl.where(better, tl.maximum(m1, t2), tl.maximum(m2, tmax))
            i1 = tl.where(better, start + targ, i1)
            m1 = tl.maximum(m1, tmax)
    ls = _log(s, PRECISE)

    pred = i1
    # Greedy rows whose top two logits give the same log-prob (reference rounding) redo the
    # argmax on the log-probs; sampled rows always take the Gumbel-max pass.
    if sampled | (((m2 - m) - ls) == ((m1 - m) - ls)):
        ms = tl.where(sampled, ms, m)
        lss = _log(tl.where(sampled, ss, s), PRECISE)
        seed = tl.load(seed_ptr + b).to(tl.int64)  # int32 seeds: hi word = sign, as in torch
        h = _fmix32(seed.to(tl.uint32) ^ 0x9E3779B9)
        h = _fmix32(h ^ (seed >> 32).to(tl.uint32))
        h = _fmix32(h ^ tl.load(pos_ptr + row).to(tl.uint32))
        h = _fmix32(h ^ tl.load(step_ptr + b).to(tl.uint32))
        best = tl.full((), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + ar
            x = _load_tile(base, offs, stride_v, V, mask_id, MASK_LOGIT)
            score = (tl.math.div_rn(x, t) - ms) - lss
            hv = _fmix32(h ^ offs.to(tl.uint32))
            u = ((hv >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(sampled, score - _log(-_log(u, PRECISE), PRECISE), score)
            vmax, varg = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
            pred = tl.where(vmax > best, start + varg, pred)
            best = tl.maximum(best, vmax)

    xp = tl.load(base + pred.to(tl.int64) * stride_v).to(tl.float32)
    logprob = (tl.where(pred == mask_id, MASK_LOGIT, xp) - m) - ls
    tl.store(pred_ptr + row, pred.to(tl.int64))
    tl.store(logprob_ptr + row, logprob)
    tl.store(conf_ptr + row, _exp(logprob, PRECISE))


@triton.jit
def _commit_kernel(
    canvas_ptr, pred_ptr, conf_ptr, step_ptr, steps_ptr, thr_ptr,
    out_canvas_ptr, commit_ptr,
    L, mask_id,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    pos = tl.arange(0, BLOCK_L)
    inb = pos < L
    idx = b * L + pos
    canvas = tl.load(canvas_ptr + idx, mask=inb, other=0)
    pred = tl.load(pred_ptr + idx, mask=inb, other=0)
    conf = tl.load(conf_ptr + idx, mask=inb, other=0.0)
    masked = inb & (canvas == mask_id)
    step = tl.load(step_ptr + b)
    total = tl.load(steps_ptr + b)
    thr = tl.load(thr_ptr + b)

    n = tl.sum(masked.to(tl.int64), 0)
    above = tl.sum((masked & (conf.to(thr.dtype) > thr)).to(tl.int64), 0)
    remaining = tl.maximum(total - step, 1)
    k = tl.maximum(tl.maximum(above, 1), (n + remaining - 1) // remaining)
    k = tl.where(step >= total - 1, n, tl.minimum(k, n))

    # rank[i] = masked positions j ahead of i: higher conf, or equal conf and lower position.
    ci = conf[:, None]
    cj = conf[None, :]
    ahead = masked[None, :] & ((cj > ci) | ((cj == ci) & (pos[None, :] < pos[:, None])))
    rank = tl.sum(ahead.to(tl.int64), 1)
    commit = masked & (rank < k)
    tl.store(out_canvas_ptr + idx, tl.where(commit, pred, canvas), mask=inb)
    tl.store(commit_ptr + idx, commit.to(tl.uint8), mask=inb)


def confidence_unmask_triton(
    logits: torch.Tensor,  # [B, L, V] or [B * L, V], any float dtype, any row strides
    canvas: torch.Tensor,  # [B, L] int64
    step: torch.Tensor,  # [B] int64
    steps_per_block: torch.Tensor,  # [B] int64
    threshold: torch.Tensor,  # [B] float
    temperature: torch.Tensor,  # [B] float, 0 = greedy
    seed: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B, L] int64
    mask_token_id: int,
) -> UnmaskResult:
    B, L = canvas.shape
    V = logits.shape[-1]
    if logits.dim() == 2:
        if logits.shape[0] != B * L:
            raise ValueError(f"logits {tuple(logits.shape)} do not have B*L = {B * L} rows")
        stride_b, stride_l = L * logits.stride(0), logits.stride(0)
    elif logits.shape[:2] == (B, L):
        stride_b, stride_l = logits.stride(0), logits.stride(1)
    else:
        raise ValueError(f"logits {tuple(logits.shape)} do not match canvas {(B, L)}")
    dev = logits.device
    pred = _empty((B, L), dtype=torch.int64, device=dev)
    conf = _empty((B, L), dtype=torch.float32, device=dev)
    logprob = _empty((B, L), dtype=torch.float32, device=dev)
    new_canvas = _empty((B, L), dtype=torch.int64, device=dev)
    commit = _empty((B, L), dtype=torch.bool, device=dev)
    if B * L == 0:
        return UnmaskResult(new_canvas, commit, pred, conf, logprob)

    # The small per-request tensors are read with unit strides (no-ops when already so).
    canvas, positions = canvas.contiguous(), positions.contiguous()
    step, steps_per_block = step.contiguous(), steps_per_block.contiguous()
    temperature, seed = temperature.contiguous(), seed.contiguous()
    if threshold.dtype != torch.float64:  # torch compares fp32 conf with fp64 thresholds in fp64
        threshold = threshold.float()
    threshold = threshold.contiguous()

    precise = dev.type == "cuda" and not triton.knobs.runtime.interpret
    _row_kernel[(B * L,)](
        logits, stride_b, stride_l, logits.stride(-1),
        temperature, seed, step, positions,
        pred, conf, logprob,
        L, V, mask_token_id,
        MASK_LOGIT=MASK_LOGIT, BLOCK_V=min(_MAX_BLOCK_V, triton.next_power_of_2(V)),
        PRECISE=precise, num_warps=8,
    )  # fmt: skip
    _commit_kernel[(B,)](
        canvas, pred, conf, step, steps_per_block, threshold,
        new_canvas, commit.view(torch.uint8),
        L, mask_token_id,
        BLOCK_L=triton.next_power_of_2(L), num_warps=1,
    )  # fmt: skip
    return UnmaskResult(new_canvas, commit, pred, conf, logprob)
