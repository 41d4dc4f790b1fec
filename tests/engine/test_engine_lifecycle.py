"""Requests come and go without leaking KV blocks or Mamba slots; aborts mid-block are clean."""

import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def inproc_llm(tiny_checkpoint):
    """An engine in this process, so the scheduler's block pool can be inspected."""
    from engines import ENGINE_KW
    from vllm import LLM

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(model=str(tiny_checkpoint), **ENGINE_KW)
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _free_blocks(llm):
    return _scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def test_300_requests_complete_and_free_everything(inproc_llm):
    from vllm import SamplingParams

    free_before = _free_blocks(inproc_llm)
    prompts = [{"prompt_token_ids": [20 + i % 400, 7, 8 + i % 50]} for i in range(300)]
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=1 + i % 20,
            ignore_eos=True,
            extra_args={"twotower_confidence_threshold": 0.5 + (i % 5) / 10},
        )
        for i in range(300)
    ]
    outs = inproc_llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1 + i % 20 for i in range(300)]
    sched = _scheduler(inproc_llm)
    assert not sched.running and not sched.waiting
    assert _free_blocks(inproc_llm) == free_before


def test_abort_mid_block_frees_and_others_finish(inproc_llm):
    from vllm import SamplingParams

    engine = inproc_llm.llm_engine
    free_before = _free_blocks(inproc_llm)
    params = SamplingParams(
        temperature=0,
        max_tokens=48,
        ignore_eos=True,
        extra_args={"twotower_confidence_threshold": 0.99},
    )
    for i in range(3):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": [30 + i, 31, 32]}, params)
    for _ in range(4):  # prefill and a few denoising steps: the canvases are mid-block
        engine.step()
    engine.abort_request(["abort-1"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
    assert finished == {"abort-0": 48, "abort-2": 48}
    assert _free_blocks(inproc_llm) == free_before
