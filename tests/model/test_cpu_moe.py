"""The CPU experts for NemotronH's non-gated relu² MoE (``vllm_twotower.model.cpu_moe``).

Fast tier: the experts function against a plain per-token loop (incl. EP/TP shards), and
vLLM's own backend selection + modular kernel with the hook installed.
Slow tier: a whole vLLM engine on a tiny plain NemotronH (``ME*E``) checkpoint written by
transformers, greedy tokens compared with transformers' ``generate`` (exact) and prompt
logprobs with a stated tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm")

from vllm_twotower import _compat  # noqa: E402
from vllm_twotower.model.cpu_moe import CpuRelu2Experts, relu2_experts  # noqa: E402

# The loop rounds to the activation dtype where the function does (after each matmul and
# after relu²), so only summation order differs: fp32 noise, or a one-ulp flip of a bf16
# intermediate (values up to ~15 here, so 2^-8 relative).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def _problem(num_tokens=37, hidden=64, inter=32, experts=8, top_k=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w_up = (torch.randn(experts, inter, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / math.sqrt(inter)).to(dtype)
    # Distinct experts per token, as a router gives; expert 5 is never chosen.
    scores = torch.rand(num_tokens, experts, generator=g)
    scores[:, 5] = -1
    topk_ids = scores.topk(top_k, dim=-1).indices.to(torch.int32)
    topk_weights = torch.rand(num_tokens, top_k, generator=g) * 2.5
    return x, w_up, w_down, topk_weights, topk_ids


def _per_token_loop(x, w_up, w_down, topk_weights, topk_ids, b_up=None, b_down=None):
    """The definition, one (token, chosen expert) pair at a time, summed in fp32."""
    b_up = torch.zeros(w_up.shape[:2]) if b_up is None else b_up.float()
    b_down = torch.zeros(w_down.shape[:2]) if b_down is None else b_down.float()

    def rounded(v):  # to the activation dtype and back
        return v.to(x.dtype).float()

    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = rounded(rounded(torch.relu(w_up[e].float() @ x[t].float() + b_up[e])) ** 2)
            out[t] += float(topk_weights[t, k]) * rounded(w_down[e].float() @ h + b_down[e])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_experts_matches_per_token_loop(dtype):
    x, w_up, w_down, tw, ids = _problem(dtype=dtype)
    got = relu2_experts(x, w_up, w_down, tw, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _per_token_loop(x, w_up, w_down, tw, ids), **TOL[dtype])


def test_relu2_experts_biases():  # FusedMoE passes them for has_bias layers (not NemotronH)
    x, w_up, w_down, tw, ids = _problem()
    b_up, b_down = torch.randn(8, 32), torch.randn(8, 64)
    got = relu2_experts(x, w_up, w_down, tw, ids, b_up=b_up, b_down=b_down)
    want = _per_token_loop(x, w_up, w_down, tw, ids, b_up, b_down)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_relu2_experts_shards_sum_to_the_whole_layer():
    """What FusedMoE hands each rank: EP = whole experts + expert_map, TP = intermediate slices.

    The ranks' partial outputs must add up to the full layer (FusedMoE all-reduces them).
    """
    x, w_up, w_down, tw, ids = _problem(experts=8)
    full = _per_token_loop(x, w_up, w_down, tw, ids)

    ep = torch.zeros_like(full)
    for rank in range(2):  # experts 0-3 on rank 0, 4-7 on rank 1
        local = slice(4 * rank, 4 * rank + 4)
        expert_map = torch.full((8,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(4, dtype=torch.int32)
        ep += relu2_experts(x, w_up[local], w_down[local], tw, ids, expert_map)
    torch.testing.assert_close(ep, full, **TOL[torch.float32])

    tp = torch.zeros_like(full)
    for rank in range(2):  # each rank holds half of every expert's intermediate dim
        cols = slice(16 * rank, 16 * rank + 16)
        tp += relu2_experts(x, w_up[:, cols], w_down[:, :, cols], tw, ids)
    torch.testing.assert_close(tp, full, **TOL[torch.float32])


def test_version_check():
    _compat.check_vllm_version("0.32.0")
    _compat.check_vllm_version("0.32.1+cpu")
    for bad in ("0.31.2", "0.33.0", "1.32.0", "dev"):
        with pytest.raises(RuntimeError, match="needs vLLM 0.32.x"):
            _compat.check_vllm_version(bad)


def test_install_is_a_no_op_off_cpu(monkeypatch):
    """On CUDA/ROCm/XPU FusedMoE must stay vLLM's: the hook returns before touching it."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    assert _compat.install_cpu_moe() is False


def _moe_config(activation):
    from vllm.model_executor.layers.fused_moe import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=8,
        experts_per_token=2,
        hidden_dim=64,
        intermediate_size=32,
        num_local_experts=8,
        num_logical_experts=8,
        activation=activation,
        device="cpu",
        routing_method=RoutingMethodType.DeepSeekV3,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.float32,
    )


def test_vllm_selects_and_runs_relu2_experts_on_cpu():
    """With the hook, vLLM's own oracle picks our class for relu2_no_mul (and only for it),
    and vLLM's modular kernel (prepare -> experts -> finalize) computes the layer."""
    from vllm.model_executor.layers.fused_moe import FusedMoEQuantConfig, MoEActivation
    from vllm.model_executor.layers.fused_moe.oracle import unquantized as oracle

    assert _compat.install_cpu_moe() and _compat.install_cpu_moe()  # idempotent
    cpu_classes = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.CPU)
    assert cpu_classes.count(CpuRelu2Experts) == 1

    gated = _moe_config(MoEActivation.SILU)
    assert oracle.select_unquantized_moe_backend(gated)[1] is not CpuRelu2Experts

    config = _moe_config(MoEActivation.RELU2_NO_MUL)
    backend, experts_cls = oracle.select_unquantized_moe_backend(config)
    assert (backend, experts_cls) == (oracle.UnquantizedMoeBackend.CPU, CpuRelu2Experts)

    kernel = oracle.make_unquantized_moe_kernel(
        FusedMoEQuantConfig.make(), config, backend, experts_cls
    )
    x, w_up, w_down, tw, ids = _problem()
    want = _per_token_loop(x, w_up, w_down, tw, ids)

    def apply(w1, w2, expert_map=None):
        return kernel.apply(
            hidden_states=x,
            w1=w1,
            w2=w2,
            topk_weights=tw,
            topk_ids=ids,
            activation=MoEActivation.RELU2_NO_MUL,
            global_num_experts=8,
            expert_map=expert_map,
            apply_router_weight_on_input=False,
        )

    torch.testing.assert_close(apply(w_up, w_down), want, **TOL[torch.float32])
    # Two EP ranks' partial outputs (vLLM passes the expert_map through to the experts).
    halves = []
    for rank in range(2):
        expert_map = torch.full((8,), -1, dtype=torch.int32)
        expert_map[4 * rank : 4 * rank + 4] = torch.arange(4, dtype=torch.int32)
        local = slice(4 * rank, 4 * rank + 4)
        halves.append(apply(w_up[local], w_down[local], expert_map))
    torch.testing.assert_close(halves[0] + halves[1], want, **TOL[torch.float32])


# --- whole engine ---------------------------------------------------------------------------

PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [311, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
MAX_TOKENS = 12
# fp32 on both sides; they differ in summation order only (Mamba chunk scan, attention,
# expert accumulation). Measured max |diff| of prompt logprobs: 4.8e-6 (V1 and V2 runner).
LOGPROB_ATOL = 1e-4


def _write_nemotron_h(path):
    """A tiny plain NemotronH (Mamba, MoE, attention, MoE) saved by transformers itself."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(
        hybrid_override_pattern="ME*E",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        vocab_size=512,
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        # transformers clamps the Mamba dt at time_step_min in its scan, vLLM does not
        # clamp; a negligible minimum makes both compute the same function.
        time_step_min=1e-9,
        eos_token_id=None,  # no early stop: every prompt generates MAX_TOKENS tokens
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = NemotronHForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # transformers' init (std 0.02) gives near-uniform logits; use unit-scale weights so
        # logits are peaky and the router's choices are not near-ties.
        for name, p in model.named_parameters():
            fan_in = p.shape[-1]
            if name.endswith("embeddings.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("lm_head.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 4 / math.sqrt(fan_in))
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() >= 2:  # linear / expert weights [.., out, in]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nemotron_h_moe")
    return path, _write_nemotron_h(path)


@pytest.mark.slow
def test_engine_matches_transformers(checkpoint, monkeypatch):
    import time

    path, hf = checkpoint
    # Everything in this process, so the hook installed here is the one the model sees (with
    # multiprocessing the plugin's register() installs it in each vLLM process).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert _compat.install_cpu_moe()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        skip_tokenizer_init=True,
        max_num_seqs=4,
        seed=0,
    )
    built = time.perf_counter() - start
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, prompt_logprobs=0, detokenize=False
        )
        start = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
        ran = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    print(f"LLM() {built:.1f} s, generate {ran:.2f} s")

    max_diff = 0.0
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(
                ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS
            )
            logprobs = torch.log_softmax(hf(ids, use_cache=False).logits[0].float(), dim=-1)
        tokens = list(out.outputs[0].token_ids)
        assert tokens == want[0, len(prompt) :].tolist()
        assert len(set(tokens)) > MAX_TOKENS // 2  # a model worth comparing: not one token
        for pos in range(1, len(prompt)):  # vLLM's prompt logprob of token pos given < pos
            got = out.prompt_logprobs[pos][prompt[pos]].logprob
            ref = float(logprobs[pos - 1, prompt[pos]])
            max_diff = max(max_diff, abs(got - ref))
    print(f"max |prompt logprob diff| = {max_diff:.2e}")
    assert max_diff < LOGPROB_ATOL
