"""What the server must return, computed by the reference (a module: test files import it)."""

from __future__ import annotations

import math
import random

import torch

from vllm_twotower.reference import generate_mask_diffusion

STOP_IDS = {2, 11}  # the tiny tokenizer's EOS (11) and generation_config's [2, 11]


def prompts(n: int, seed: int = 0, lengths=(1, 5, 17, 40, 90)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(20, 512) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def diffusion(reference, prompt, max_tokens, threshold=0.8, steps=16, temperature=0.0, seed=0):
    """(token ids, per-token commit-step logprobs) as vLLM returns them (cut at EOS/max)."""
    (r,) = generate_mask_diffusion(
        reference,
        [prompt],
        16 * math.ceil(max_tokens / 16),
        steps_per_block=steps,
        confidence_threshold=threshold,
        temperature=temperature,
        seed=seed,
    )
    ids = r.output_ids(max_tokens, STOP_IDS)
    return ids, r.logprobs[: len(ids)]


def prompt_logprobs(reference, prompt) -> list[float]:
    """log p(prompt[i] | prompt[:i]) from the context tower, for i >= 1."""
    logits = reference.extend_context(reference.new_cache(), torch.tensor(prompt))
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
