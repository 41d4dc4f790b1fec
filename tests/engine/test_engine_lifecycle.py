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


def _mamba_states(llm, slot_of_layer):
    """The context Mamba layers' (conv, ssm) at their request slot, read from the worker."""

    def read(worker):
        model = worker.model_runner.model
        out = {}
        for i, layer in enumerate(model.context_tower.layers):
            if layer.mixer.__class__.__name__.endswith("MambaMixer2"):
                conv, ssm = layer.mixer.kv_cache[0], layer.mixer.kv_cache[1]
                slot = slot_of_layer[layer.mixer.prefix]
                out[i] = (conv[slot].clone(), ssm[slot].clone())
        return out

    return llm.collective_rpc(read)[0]


def test_context_state_after_each_commit_equals_reference(inproc_llm, reference):
    """The spike check: after every commit the context tower's Mamba conv/SSM state equals the
    reference's after extending its cache by the same 16 tokens, and denoising steps leave
    it untouched. (State corruption would otherwise only show as late token drift.)"""
    import torch
    from vllm import SamplingParams

    engine = inproc_llm.llm_engine
    sched = _scheduler(inproc_llm)
    prompt = [40, 41, 42, 43, 44, 45, 46]
    engine.add_request(
        "spike",
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
    )
    cache = reference.new_cache()
    reference.extend_context(cache, torch.tensor(prompt))
    emitted, checked, unchanged, last = [], 0, 0, None
    while engine.has_unfinished_requests():
        engine.step()
        req = next(iter(sched.requests.values()), None)
        if req is None or req.is_finished():
            break
        groups = sched.kv_cache_manager.get_block_ids(req.request_id)
        slot_of_layer = {}
        for gid, g in enumerate(sched.kv_cache_config.kv_cache_groups):
            for name in g.layer_names:
                slot_of_layer[name] = groups[gid][0]
        states = _mamba_states(inproc_llm, slot_of_layer)
        assert len(states) == reference.arch.pattern.count("M")
        new = list(req.output_token_ids)[len(emitted) :]
        if new:  # a commit: extend the reference by the same block
            emitted += new
            reference.extend_context(cache, torch.tensor(new))
            for i, (conv, ssm) in states.items():
                torch.testing.assert_close(conv.T, cache.conv[i], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(ssm, cache.ssm[i], rtol=1e-4, atol=1e-4)
            checked += 1
            last = states
        elif last is not None:  # a denoising step: the context state is untouched
            for i, (conv, ssm) in states.items():
                assert torch.equal(conv, last[i][0]) and torch.equal(ssm, last[i][1])
            unchanged += 1
    assert checked == 2  # blocks 1 and 2 are checked while the request still runs
    assert unchanged > 0
