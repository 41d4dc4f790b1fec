"""The three decoding modes of NVIDIA's reference, with its semantics (spec §6).

* :func:`generate_mask_diffusion`: block diffusion, the product (16-token blocks, confidence
  unmasking, commit through the context tower).
* :func:`generate_mock_ar`: both towers, one token per step, no time conditioning (debug mode).
* :func:`generate_ar`: the context tower alone: the AR baseline on the same checkpoint.

Differences from NVIDIA's code, all deliberate and documented:

* batches are lists of prompts of any lengths; ``t`` is per request (Megatron's trained
  semantics), and every request's output is the same as alone;
* ``max_new_tokens`` need not be a multiple of the block: whole blocks are always denoised and
  :meth:`GenerationResult.output_ids` trims, as vLLM does (EOS/stop ids and ``max_tokens``);
* with temperature > 0 the Gumbel noise is a pure function of (seed, position, step), see
  :mod:`.unmask`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .model import TwoTowerReference
from .unmask import unmask_step

MASK_TOKEN_ID = 3  # from NVIDIA's inference.py; the config has no mask field
BLOCK_SIZE = 16  # the trained block; larger blocks collapse quality (paper Table 4)
STEPS_PER_BLOCK = 16
CONFIDENCE_THRESHOLD = 0.8  # the published operating point (NVIDIA's code default is 0.9)


@dataclass
class GenerationResult:
    """One request's output. ``tokens`` holds every generated token, untrimmed."""

    tokens: list[int]
    nfe: int  # denoiser forwards (diffusion, mock-AR) or context forwards (AR)
    block_steps: list[int] = field(default_factory=list)  # diffusion: denoiser forwards per block
    step_commits: list[list[int]] = field(default_factory=list)  # diffusion: commits per step
    # diffusion: per token, its log-probability at the step that committed it (unscaled
    # denoiser logits, [MASK] excluded): what the engine reports as the sample logprob.
    logprobs: list[float] = field(default_factory=list)

    def output_ids(self, max_tokens: int | None = None, stop_token_ids=()) -> list[int]:
        """What vLLM returns: cut after the first stop token (kept), then at ``max_tokens``."""
        out = []
        for tok in self.tokens:
            out.append(tok)
            if tok in stop_token_ids or len(out) == max_tokens:
                break
        return out


def _as_prompts(prompts) -> list[list[int]]:
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return prompts


def _eos_ids(model: TwoTowerReference, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return model.arch.eos_token_id
    return (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)


@torch.no_grad()
def generate_mask_diffusion(
    model: TwoTowerReference,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    block_size: int = BLOCK_SIZE,
    steps_per_block: int = STEPS_PER_BLOCK,
    mask_token_id: int = MASK_TOKEN_ID,
    temperature: float = 0.0,
    confidence_threshold: float = CONFIDENCE_THRESHOLD,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
) -> list[GenerationResult]:
    """Block diffusion: denoise 16-token canvases that start all ``[MASK]``; commit; repeat.

    Per block: the context cache is read-only; each step runs the denoiser on the rows that
    still hold masks (t = their masked fraction) and applies :func:`unmask_step`; when a
    canvas is full its 16 tokens are run causally through the context tower (the commit,
    not counted in NFE). A request stops after the block that contains an EOS id.
    """
    prompts = _as_prompts(prompts)
    eos = set(_eos_ids(model, eos_token_id))
    caches = [model.new_cache() for _ in prompts]
    for cache, prompt in zip(caches, prompts, strict=True):
        model.extend_context(cache, torch.tensor(prompt))
    results = [GenerationResult([], 0) for _ in prompts]
    active = list(range(len(prompts)))
    for block in range(math.ceil(max_new_tokens / block_size)):
        canvas = torch.full((len(active), block_size), mask_token_id, dtype=torch.long)
        offsets = torch.tensor([caches[r].length for r in active])
        positions = offsets[:, None] + torch.arange(block_size)
        forwards = [0] * len(active)
        commit_logprobs = torch.zeros(len(active), block_size)
        for step in range(steps_per_block):
            live = (canvas == mask_token_id).any(-1).nonzero()[:, 0]
            if len(live) == 0:
                break
            rows = canvas[live]
            t = (rows == mask_token_id).float().mean(-1)
            logits = model.denoise(rows, t, [caches[active[i]] for i in live.tolist()])
            m = len(live)
            res = unmask_step(
                logits,
                rows,
                step=torch.full((m,), step),
                steps_per_block=torch.full((m,), steps_per_block),
                threshold=torch.full((m,), float(confidence_threshold)),
                temperature=torch.full((m,), float(temperature)),
                seed=torch.full((m,), seed, dtype=torch.long),
                positions=positions[live],
                mask_token_id=mask_token_id,
            )
            canvas[live] = res.canvas
            commit_logprobs[live] = torch.where(res.commit, res.logprob, commit_logprobs[live])
            for j, i in enumerate(live.tolist()):
                forwards[i] += 1
                results[active[i]].step_commits.append(int(res.commit[j].sum()))
        finished_block = block == math.ceil(max_new_tokens / block_size) - 1
        still = []
        for i, r in enumerate(active):
            toks = canvas[i].tolist()
            results[r].tokens += toks
            results[r].logprobs += commit_logprobs[i].tolist()
            results[r].nfe += forwards[i]
            results[r].block_steps.append(forwards[i])
            if not eos.intersection(toks) and not finished_block:
                model.extend_context(caches[r], canvas[i])  # the commit
                still.append(r)
        active = still
        if not active:
            break
    return results


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate_ar(
    model: TwoTowerReference,
    prompts,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_token_id=None,
    seed: int = 0,
) -> list[GenerationResult]:
    """Context tower + ``context_lm_head`` only: NemotronH autoregressive decoding.

    NFE counts context forwards that produced a token (the prefill produces the first).
    Stops after an EOS id (kept).
    """
    eos = set(_eos_ids(model, eos_token_id))
    gen = torch.Generator().manual_seed(seed)
    results = []
    for prompt in _as_prompts(prompts):
        cache = model.new_cache()
        logits = model.extend_context(cache, torch.tensor(prompt))[-1]
        out = []
        while True:
            out.append(_pick(logits, temperature, gen))
            if out[-1] in eos or len(out) == max_new_tokens:
                break
            logits = model.extend_context(cache, torch.tensor(out[-1:]))[-1]
        results.append(GenerationResult(out, nfe=len(out)))
    return results


@torch.no_grad()
def generate_mock_ar(
    model: TwoTowerReference,
    prompts,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_token_id=None,
    seed: int = 0,
) -> list[GenerationResult]:
    """Both towers, one token per denoiser forward (NVIDIA's debug mode, spec §6.3).

    The denoiser runs the *last* token as a 1-token causal decode on a copy of the context
    cache taken before that token (attention K/V without its entry, Mamba state before it),
    with no time conditioning, and predicts the next token with ``lm_head``.
    """
    eos = set(_eos_ids(model, eos_token_id))
    gen = torch.Generator().manual_seed(seed)
    results = []
    for prompt in _as_prompts(prompts):
        cache = model.new_cache()
        model.extend_context(cache, torch.tensor(prompt[:-1]))
        before_last, last = cache.clone(), prompt[-1]
        model.extend_context(cache, torch.tensor([last]))
        out = []
        while True:
            logits = model.denoise(torch.tensor([[last]]), None, [before_last])[0, -1]
            out.append(_pick(logits, temperature, gen))
            if out[-1] in eos or len(out) == max_new_tokens:
                break
            before_last, last = cache.clone(), out[-1]
            model.extend_context(cache, torch.tensor([last]))
        results.append(GenerationResult(out, nfe=len(out)))
    return results
