"""The three decoding modes end to end on the tiny checkpoint: determinism, NFE, EOS, batching."""

import pytest
import torch

from vllm_twotower.reference import (
    GenerationResult,
    generate_ar,
    generate_mask_diffusion,
    generate_mock_ar,
)

PROMPTS = [[5, 100, 200, 300, 17], list(range(20, 60)), [7]]


@pytest.mark.parametrize("mode", [generate_mask_diffusion, generate_mock_ar, generate_ar])
def test_greedy_is_deterministic_with_nfe(tiny_model, mode):
    a = mode(tiny_model, PROMPTS, max_new_tokens=32, eos_token_id=[])
    b = mode(tiny_model, PROMPTS, max_new_tokens=32, eos_token_id=[])
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.nfe for r in a] == [r.nfe for r in b]
    for r in a:
        assert len(r.tokens) == 32 and r.nfe >= 1
        assert 3 not in r.tokens or mode is not generate_mask_diffusion  # mask never emitted


def test_diffusion_nfe_accounting(tiny_model):
    (r,) = generate_mask_diffusion(
        tiny_model, [PROMPTS[0]], 48, confidence_threshold=0.5, eos_token_id=[]
    )
    assert len(r.block_steps) == 3 and sum(r.block_steps) == r.nfe
    assert all(1 <= s <= 16 for s in r.block_steps)
    assert len(r.step_commits) == r.nfe and sum(r.step_commits) == 48
    assert max(r.step_commits) > 1  # the tiny checkpoint's confidences are peaky


@pytest.mark.parametrize("threshold,steps", [(0.9, 16), (0.5, 16), (0.9, 8), (0.5, 4)])
def test_diffusion_commit_counts_respect_the_rule(tiny_model, threshold, steps):
    rs = generate_mask_diffusion(
        tiny_model,
        PROMPTS,
        32,
        steps_per_block=steps,
        confidence_threshold=threshold,
        eos_token_id=[],
    )
    for r in rs:
        assert all(1 <= s <= steps for s in r.block_steps)
        assert all(c >= 1 for c in r.step_commits)
        if steps < 16:  # ceil(n / (T - s)) forces at least 16 / T per step at first
            assert all(c >= -(-16 // steps) for c in r.step_commits[::1][:1])


def test_threshold_trades_steps_for_quality(tiny_model):
    strict = generate_mask_diffusion(
        tiny_model, PROMPTS, 32, confidence_threshold=0.95, eos_token_id=[]
    )
    loose = generate_mask_diffusion(
        tiny_model, PROMPTS, 32, confidence_threshold=0.3, eos_token_id=[]
    )
    assert sum(r.nfe for r in loose) < sum(r.nfe for r in strict)


def test_batch_equals_alone(tiny_model):
    """Per-request t and per-request caches: a request's output does not depend on its batch."""
    batch = generate_mask_diffusion(
        tiny_model, PROMPTS, 32, confidence_threshold=0.7, eos_token_id=[]
    )
    for prompt, r in zip(PROMPTS, batch, strict=True):
        (alone,) = generate_mask_diffusion(
            tiny_model, [prompt], 32, confidence_threshold=0.7, eos_token_id=[]
        )
        assert alone.tokens == r.tokens and alone.nfe == r.nfe


def test_eos_inside_a_block_stops_after_that_block(tiny_model):
    (free,) = generate_mask_diffusion(tiny_model, [PROMPTS[1]], 64, eos_token_id=[])
    eos = free.tokens[16 + 5]  # a token of the second block
    first = min(i for i, t in enumerate(free.tokens) if t == eos)
    (r,) = generate_mask_diffusion(tiny_model, [PROMPTS[1]], 64, eos_token_id=eos)
    block_end = (first // 16 + 1) * 16
    assert r.tokens == free.tokens[:block_end]  # the whole block is kept, nothing after it
    assert r.output_ids(stop_token_ids={eos}) == free.tokens[: first + 1]


def test_default_eos_is_config_union_generation_config(tiny_model):
    assert set(tiny_model.arch.eos_token_id) == {2, 11}


def test_max_tokens_not_a_multiple_of_the_block(tiny_model):
    (r,) = generate_mask_diffusion(tiny_model, [PROMPTS[0]], 21, eos_token_id=[])
    assert len(r.tokens) == 32  # whole blocks are denoised ...
    assert r.output_ids(max_tokens=21) == r.tokens[:21]  # ... and trimmed like vLLM


def test_output_ids_trimming():
    r = GenerationResult(tokens=[4, 5, 2, 6, 7], nfe=1)
    assert r.output_ids(stop_token_ids={2}) == [4, 5, 2]
    assert r.output_ids(max_tokens=2, stop_token_ids={2}) == [4, 5]
    assert r.output_ids(max_tokens=10) == [4, 5, 2, 6, 7]


def test_temperature_sampling_is_seeded_and_batch_invariant(tiny_model):
    kw = dict(max_new_tokens=32, temperature=1.0, eos_token_id=[])
    a = generate_mask_diffusion(tiny_model, PROMPTS, seed=11, **kw)
    b = generate_mask_diffusion(tiny_model, PROMPTS[1:2], seed=11, **kw)
    c = generate_mask_diffusion(tiny_model, PROMPTS, seed=12, **kw)
    greedy = generate_mask_diffusion(tiny_model, PROMPTS, max_new_tokens=32, eos_token_id=[])
    assert a[1].tokens == b[0].tokens
    assert [r.tokens for r in a] != [r.tokens for r in c]
    assert [r.tokens for r in a] != [r.tokens for r in greedy]


def test_mock_ar_uses_both_towers(tiny_model):
    """Mock-AR's tokens come from the denoiser head, not the context head (AR mode)."""
    ar = generate_ar(tiny_model, PROMPTS, 16, eos_token_id=[])
    mock = generate_mock_ar(tiny_model, PROMPTS, 16, eos_token_id=[])
    assert [r.tokens for r in ar] != [r.tokens for r in mock]
    assert all(r.nfe == 16 for r in mock)


def test_mock_ar_first_token_is_denoiser_decode_of_last_prompt_token(tiny_model):
    m = tiny_model
    prompt = PROMPTS[0]
    cache = m.new_cache()
    m.extend_context(cache, torch.tensor(prompt[:-1]))
    logits = m.denoise(torch.tensor([[prompt[-1]]]), None, [cache])[0, -1]
    (r,) = generate_mock_ar(m, [prompt], 1, eos_token_id=[])
    assert r.tokens == [int(logits.argmax())]


def test_ar_equals_context_tower_argmax_chain(tiny_model):
    m = tiny_model
    (r,) = generate_ar(m, [PROMPTS[0]], 8, eos_token_id=[])
    ids = list(PROMPTS[0])
    for tok in r.tokens:
        logits = m.extend_context(m.new_cache(), torch.tensor(ids))[-1]
        assert tok == int(logits.argmax())
        ids.append(tok)


def test_empty_prompt_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="at least one token"):
        generate_mask_diffusion(tiny_model, [[]], 16)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_tiny_checkpoint_confidences_are_peaky_and_varied(tiny_model, threshold):
    """The factory's scaling makes some steps commit several tokens and others only one."""
    rs = generate_mask_diffusion(
        tiny_model, PROMPTS, 48, confidence_threshold=threshold, eos_token_id=[]
    )
    commits = [c for r in rs for c in r.step_commits]
    assert 1 in commits and max(commits) > 1
