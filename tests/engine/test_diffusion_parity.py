"""vLLM's tokens == the reference's tokens, exactly (fp32, tiny checkpoint, greedy)."""

import random

import pytest

from vllm_twotower.reference import generate_mask_diffusion

pytestmark = [pytest.mark.slow, pytest.mark.engine]

STOP_IDS = {2, 11}  # the tokenizer's EOS (11) and generation_config's [2, 11]


def _prompts(n, seed=0, lengths=(1, 5, 17, 40, 130, 300)):
    rng = random.Random(seed)
    return [[rng.randrange(20, 512) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def _params(max_tokens, threshold=None, steps=None, **kw):
    from vllm import SamplingParams

    extra = {}
    if threshold is not None:
        extra["twotower_confidence_threshold"] = threshold
    if steps is not None:
        extra["diffusion_max_steps"] = steps
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra or None, **kw)


def _generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _expected(reference, prompt, max_tokens, threshold=0.8, steps=16):
    (r,) = generate_mask_diffusion(
        reference, [prompt], max_tokens, steps_per_block=steps, confidence_threshold=threshold
    )
    return r.output_ids(max_tokens, STOP_IDS)


CASES = [(thr, steps, mt) for thr in (0.9, 0.5) for steps in (16, 8) for mt in (37, 16)]


def test_parity_across_prompts_thresholds_steps(diffusion_llm, reference):
    prompts = _prompts(len(CASES))
    params = [_params(mt, thr, steps) for thr, steps, mt in CASES]
    got = _generate(diffusion_llm, prompts, params)
    for prompt, (thr, steps, mt), tokens in zip(prompts, CASES, got, strict=True):
        assert tokens == _expected(reference, prompt, mt, thr, steps), (len(prompt), thr, steps)


def test_default_knobs_are_threshold_08_and_16_steps(diffusion_llm, reference):
    prompts = _prompts(3, seed=1)
    got = _generate(diffusion_llm, prompts, _params(40))
    assert got == [_expected(reference, p, 40) for p in prompts]


def test_batch_invariance(diffusion_llm):
    prompts = _prompts(8, seed=2)
    knobs = [(0.9, 16), (0.5, 8), (0.7, 4), (1.0, 16), (0.6, 16), (0.8, 2), (0.95, 12), (0.3, 16)]
    params = [_params(33, thr, steps) for thr, steps in knobs]
    batch = _generate(diffusion_llm, prompts, params)
    for prompt, p, tokens in zip(prompts, params, batch, strict=True):
        assert _generate(diffusion_llm, [prompt], p) == [tokens]


@pytest.mark.parametrize("max_tokens", [1, 15, 16, 17])
def test_exact_lengths(diffusion_llm, reference, max_tokens):
    prompt = _prompts(1, seed=3)[0]
    (tokens,) = _generate(diffusion_llm, [prompt], _params(max_tokens, ignore_eos=True))
    assert len(tokens) == max_tokens
    (r,) = generate_mask_diffusion(reference, [prompt], max_tokens, eos_token_id=[])
    assert tokens == r.tokens[:max_tokens]


def test_invalid_knobs_are_rejected_naming_the_key(diffusion_llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for extra, key in [
        ({"twotower_confidence_threshold": 1.5}, "twotower_confidence_threshold"),
        ({"diffusion_max_steps": 0}, "diffusion_max_steps"),
        ({"twotower_bogus": 1}, "twotower_bogus"),
    ]:
        with pytest.raises(VLLMValidationError, match=key):
            diffusion_llm.generate(
                [{"prompt_token_ids": [5, 6]}],
                SamplingParams(temperature=0, max_tokens=4, extra_args=extra),
                use_tqdm=False,
            )
    # the engine still serves
    assert len(_generate(diffusion_llm, [[5, 6]], _params(4))[0]) == 4


def test_prompt_without_room_for_a_block_is_rejected(diffusion_llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="no room for one 16-token"):
        diffusion_llm.generate([{"prompt_token_ids": [5] * 500}], _params(8), use_tqdm=False)


def test_generation_stops_on_a_block_boundary_before_max_model_len(diffusion_llm, reference):
    """max_model_len 512, prompt 470: 42 tokens of room, so 32 (two whole blocks) at most."""
    prompt = _prompts(1, seed=5, lengths=(470,))[0]
    (tokens,) = _generate(diffusion_llm, [prompt], _params(100, ignore_eos=True))
    assert len(tokens) == 32
    (r,) = generate_mask_diffusion(reference, [prompt], 32, eos_token_id=[])
    assert tokens == r.tokens


def test_temperature_sampling_matches_reference_with_seed(diffusion_llm, reference):
    """Gumbel noise is a pure function of (seed, position, step): vLLM reproduces it."""
    from vllm import SamplingParams

    prompts = _prompts(3, seed=6)
    got = _generate(
        diffusion_llm,
        prompts,
        [
            SamplingParams(temperature=0.7, seed=1000 + i, max_tokens=32, ignore_eos=True)
            for i in range(3)
        ],
    )
    for i, (prompt, tokens) in enumerate(zip(prompts, got, strict=True)):
        (r,) = generate_mask_diffusion(
            reference, [prompt], 32, temperature=0.7, seed=1000 + i, eos_token_id=[]
        )
        assert tokens == r.tokens
    (greedy,) = _generate(diffusion_llm, prompts[:1], _params(32, ignore_eos=True))
    assert got[0] != greedy


def test_requests_without_temperature_decode_greedily(diffusion_llm, reference):
    prompt = _prompts(1, seed=7)[0]
    params = diffusion_llm.get_default_sampling_params()
    params.max_tokens, params.ignore_eos = 32, True
    (tokens,) = _generate(diffusion_llm, [prompt], params)
    (r,) = generate_mask_diffusion(reference, [prompt], 32, eos_token_id=[])
    assert params.temperature == 0.0 and tokens == r.tokens


def _diffusion_metrics(llm):
    return {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:diffusion_")}


def _nfe_blocks(llm):
    def read(worker):
        s = worker.model_runner.model_state.states
        return s.total_nfe, s.total_blocks

    return llm.collective_rpc(read)[0]


def test_diffusion_metrics_and_nfe_counter(diffusion_llm, reference):
    """vllm:diffusion_num_denoising_steps = denoiser forwards (NFE) + commit steps.

    Runs before any other engine starts in this process: a new LLM re-registers vLLM's
    Prometheus collectors (the AR-mode tests live in a later module for that reason).
    """
    prompts = _prompts(3, seed=8)
    m0, (nfe0, blocks0) = _diffusion_metrics(diffusion_llm), _nfe_blocks(diffusion_llm)
    got = _generate(diffusion_llm, prompts, _params(32, 0.7, ignore_eos=True))
    m1, (nfe1, blocks1) = _diffusion_metrics(diffusion_llm), _nfe_blocks(diffusion_llm)
    ref = generate_mask_diffusion(reference, prompts, 32, confidence_threshold=0.7, eos_token_id=[])
    assert got == [r.tokens for r in ref]
    nfe, blocks = nfe1 - nfe0, blocks1 - blocks0
    assert nfe == sum(r.nfe for r in ref) and blocks == 6
    d = {k: m1[k] - m0.get(k, 0) for k in m1}
    assert d["vllm:diffusion_num_committed_tokens"] == 96
    assert d["vllm:diffusion_num_denoising_steps"] == nfe + blocks
    assert d["vllm:diffusion_num_canvas_positions"] == 16 * (nfe + blocks)
