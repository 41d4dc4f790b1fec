"""One confidence-unmasking step: the commit rule of ``generate_mask_diffusion`` (spec §6.1).

This is the oracle the engine's sampler and the fused kernel are tested against, so it is
vectorised over rows and every per-request knob is a per-row tensor.

Rule, per row, with ``n`` masked positions at step ``s`` of ``T``:

* logits of the mask token are blocked; ``pred`` = argmax (lowest id on ties) or, when
  temperature > 0, Gumbel-max over the temperature-scaled log-probs;
* ``conf`` = the *unscaled* probability of ``pred`` (also when sampling);
* commit ``k = min(n, max(#(conf > γ) or 1, ceil(n / (T - s))))`` positions, the most confident
  (ties: lowest position); the last step (``s = T - 1``) commits all ``n``;
* committed positions never change; the others go back to ``[MASK]``.

Decision (spec UNKNOWN): NVIDIA's reference breaks confidence ties with an unstable sort; we
break them by the lowest position, which any implementation can reproduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_LOGIT = -1e12  # what the reference writes into the mask token's logit

_U32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x < 2**32``, exact (no int64 overflow on any device)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _U32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche of the key bits."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(
    seed: torch.Tensor, positions: torch.Tensor, step: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): a pure function of (seed, position, step, token id).

    ``seed [B]``, ``positions [B, L]`` (absolute token positions), ``step [B]`` (denoising step
    within the block) -> float32 ``[B, L, vocab]``. Integer hashing gives the same bits on
    every device and for every batching or preemption, so the engine reproduces the
    reference's samples exactly (a stateful ``torch.Generator`` could not).
    """
    seed = seed.to(torch.int64)
    h = _fmix32((seed & _U32) ^ 0x9E3779B9)
    h = _fmix32(h ^ ((seed >> 32) & _U32))[:, None]
    h = _fmix32(h ^ (positions.to(torch.int64) & _U32))
    h = _fmix32(h ^ (step.to(torch.int64)[:, None] & _U32))[..., None]
    vocab_ids = torch.arange(vocab, dtype=torch.int64, device=positions.device)
    h = _fmix32(h ^ vocab_ids)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed, positions, step, vocab) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seed, positions, step, vocab)))


@dataclass
class UnmaskResult:
    canvas: torch.Tensor  # [B, L] the new canvas
    commit: torch.Tensor  # [B, L] bool: positions committed by this step
    pred: torch.Tensor  # [B, L] chosen token per position (meaningful where masked)
    conf: torch.Tensor  # [B, L] its unscaled probability
    logprob: torch.Tensor  # [B, L] its unscaled log-probability


def unmask_step(
    logits: torch.Tensor,  # [B, L, V] fp32
    canvas: torch.Tensor,  # [B, L] int64
    step: torch.Tensor,  # [B] int64, 0-based step within the block
    steps_per_block: torch.Tensor,  # [B] int64, T
    threshold: torch.Tensor,  # [B] float, γ
    temperature: torch.Tensor,  # [B] float, 0 = greedy
    seed: torch.Tensor,  # [B] int64 (used only where temperature > 0)
    positions: torch.Tensor,  # [B, L] int64, absolute positions of the canvas tokens
    mask_token_id: int,
) -> UnmaskResult:
    masked = canvas == mask_token_id
    logits = logits.float().clone()
    logits[..., mask_token_id] = MASK_LOGIT
    logp = torch.log_softmax(logits, dim=-1)
    pred = logp.argmax(-1)
    sampled = temperature > 0
    if bool(sampled.any()):
        temp = torch.where(sampled, temperature, torch.ones_like(temperature)).float()
        scaled = torch.log_softmax(logits / temp[:, None, None], dim=-1)
        noisy = scaled + gumbel_noise(seed, positions, step, logits.shape[-1])
        pred = torch.where(sampled[:, None], noisy.argmax(-1), pred)
    chosen_logp = logp.gather(-1, pred[..., None])[..., 0]
    conf = chosen_logp.exp()

    n = masked.sum(-1)
    remaining = (steps_per_block - step).clamp(min=1)
    above = (masked & (conf > threshold[:, None])).sum(-1)
    k = torch.maximum(above, torch.ones_like(above))
    k = torch.maximum(k, torch.div(n + remaining - 1, remaining, rounding_mode="floor"))
    k = torch.where(step >= steps_per_block - 1, n, torch.minimum(k, n))

    # Rank masked positions by confidence, descending; the stable sort keeps the lowest
    # position first among equal confidences.
    key = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    commit = masked & (rank < k[:, None])
    return UnmaskResult(torch.where(commit, pred, canvas), commit, pred, conf, chosen_logp)
