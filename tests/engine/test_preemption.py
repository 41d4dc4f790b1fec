"""A KV cache small enough to force preemption: recomputed requests still match the reference.

vLLM preempts by freeing a request's blocks and later re-prefilling prompt + emitted tokens;
the canvas in flight is lost and its block restarts from all-[MASK] (as in the reference,
which never sees the interruption).
"""

import random

import pytest

from vllm_twotower.reference import generate_mask_diffusion

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def test_preempted_requests_equal_the_reference(tiny_checkpoint, reference):
    from engines import make_llm
    from vllm import SamplingParams

    # 8 blocks: two requests start (prompt + canvas fit), then outgrow the pool.
    llm = make_llm(
        tiny_checkpoint, max_model_len=640, num_gpu_blocks_override=8, max_num_batched_tokens=512
    )
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(20, 512) for _ in range(100)] for _ in range(3)]
        params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        preemptions = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        assert preemptions > 0
        for prompt, out in zip(prompts, outs, strict=True):
            (r,) = generate_mask_diffusion(reference, [prompt], 150, eos_token_id=[])
            assert list(out.outputs[0].token_ids) == r.tokens[:150]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_generation_config_temperature_is_honoured(tmp_path, reference):
    """A checkpoint whose generation_config.json sets a temperature serves requests (vLLM
    0.32 would reject temperature != 1 for every diffusion model) and is the default."""
    from engines import make_llm
    from vllm import SamplingParams

    from vllm_twotower.testing.make_checkpoint import make_checkpoint

    path = make_checkpoint(tmp_path / "gen-temp", "tiny", generation_config={"temperature": 0.6})
    llm = make_llm(path)
    try:
        defaults = llm.get_default_sampling_params()
        assert defaults.temperature == 0.6
        defaults.max_tokens, defaults.seed, defaults.ignore_eos = 32, 5, True
        (out,) = llm.generate([{"prompt_token_ids": [9, 8, 7]}], defaults, use_tqdm=False)
        (r,) = generate_mask_diffusion(
            reference, [[9, 8, 7]], 32, temperature=0.6, seed=5, eos_token_id=[]
        )
        assert list(out.outputs[0].token_ids) == r.tokens
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        assert len(llm.generate([[1, 2]], greedy, use_tqdm=False)[0].outputs[0].token_ids) == 16
    finally:
        llm.llm_engine.engine_core.shutdown()
