"""The reference's context tower == Hugging Face transformers' own ``NemotronHForCausalLM``.

An independent check of the backbone math (Mamba-2 conv + chunked SSD scan, NoPE GQA
attention, sigmoid top-k MoE, relu² MLP, RMSNorms): transformers' implementation shares no
code with the reference. The context tower is loaded into it by
:mod:`vllm_twotower.testing.hf_context_tower` with strict key checking.

Settings that make the two sides compute the same function:

* ``router_dtype=torch.float32``: transformers' ``NemotronHTopkRouter`` routes in fp32.
* ``dt_limit="config"``: transformers 5.x clamps ``dt`` at ``time_step_min`` in its chunked
  scan only; NVIDIA's code uses ``config.time_step_limit`` ``[0, inf]`` (no clamp). The
  reference follows NVIDIA; :func:`test_stock_transformers_clamps_dt_at_time_step_min`
  pins that this clamp is the *only* difference.

Everything is fp32 on CPU. Logit tolerance: ``atol=1e-4, rtol=1e-5`` on logits of magnitude
~10-30 (measured max difference ~2e-5, i.e. float32 accumulation-order noise).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from vllm_twotower.reference import generate_ar, load_reference, read_state_dict
from vllm_twotower.testing.hf_context_tower import (
    import_transformers_nemotron_h,
    load_hf_context_tower,
)
from vllm_twotower.testing.make_checkpoint import make_checkpoint

try:
    import_transformers_nemotron_h()
except ImportError as e:
    pytest.skip(f"transformers with NemotronH not importable: {e}", allow_module_level=True)
pytest.importorskip("transformers", minversion="5.0")  # fused 3-D expert tensors

# fp32: the two implementations differ only in summation order (einsum vs matmul, chunk
# boundaries, expert accumulation order), so errors stay ~1e-5 on logits of size ~25.
ATOL, RTOL = 1e-4, 1e-5

# A second config: other layer order (attention first, two Mamba layers in a row), 4 Mamba
# groups (2 heads per group instead of 4), a short scan chunk so 100 tokens cross 3 chunk
# boundaries, and an MLP layer last.
VARIANT = {
    "hybrid_override_pattern": "*MME-M*E-",
    "n_groups": 4,
    "chunk_size": 32,
}


def _ids(n: int, seed: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers' full-sequence fp32 logits ``[L, V]``, no cache."""
    return hf(ids[None], use_cache=False).logits[0].float()


@pytest.fixture(scope="module")
def ref32(tiny_path):
    return load_reference(tiny_path, router_dtype=torch.float32)


@pytest.fixture(scope="module")
def hf(tiny_path):
    return load_hf_context_tower(tiny_path)


@pytest.fixture(scope="module")
def variant_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_variant"), "tiny", seed=7, **VARIANT)


def test_hf_model_is_the_stock_pure_torch_nemotron_h(hf, tiny_path):
    """Built from the checkpoint's own config, and running transformers' PyTorch paths."""
    _, NemotronHForCausalLM, _ = import_transformers_nemotron_h()
    assert type(hf) is NemotronHForCausalLM
    cfg = json.loads((tiny_path / "config.json").read_text())
    letters = {"linear_attention": "M", "full_attention": "*", "moe": "E", "mlp": "-"}
    assert (
        "".join(letters[t] for t in hf.config.layers_block_type) == cfg["hybrid_override_pattern"]
    )
    assert hf.config.chunk_size == cfg["chunk_size"] == 128
    assert hf.config.n_groups == cfg["n_groups"]
    # No CUDA kernels: transformers falls back to its reference PyTorch implementations.
    assert importlib.util.find_spec("mamba_ssm") is None
    assert importlib.util.find_spec("causal_conv1d") is None
    assert all(p.dtype == torch.float32 for p in hf.parameters())


@pytest.mark.parametrize("length", [1, 5, 37, 150])
def test_full_sequence_logits_match(ref32, hf, length):
    """``extend_context`` from an empty cache == transformers' forward; 150 > chunk_size=128."""
    ids = _ids(length, seed=length)
    ours = ref32.extend_context(ref32.new_cache(), ids)
    theirs = _hf_logits(hf, ids)
    assert ours.shape == theirs.shape == (length, 512)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def test_incremental_extension_matches_full_sequence(ref32, hf):
    """Prefill, single tokens, a 16-token commit and a 140-token extension through the cache
    (conv/SSM states carried, the scan's chunks start mid-sequence) == one full forward."""
    segments = [20, 1, 1, 1, 1, 1, 1, 1, 1, 16, 1, 1, 1, 1, 140]
    ids = _ids(sum(segments), seed=99)
    cache, out, start = ref32.new_cache(), [], 0
    for n in segments:
        out.append(ref32.extend_context(cache, ids[start : start + n]))
        start += n
    assert cache.length == len(ids)
    torch.testing.assert_close(torch.cat(out), _hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def _hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy ``generate`` (its own cache: chunked prefill + 1-token decode),
    with every generation setting explicit so no default from the model's config applies."""
    _, _, GenerationConfig = import_transformers_nemotron_h()
    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=1,
        repetition_penalty=1.0,
        use_cache=True,
    )
    hf.generation_config = gen_cfg
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=gen_cfg)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("prompt_len", [1, 7, 40, 130])
def test_greedy_generation_matches(ref32, hf, prompt_len):
    """``generate_ar`` tokens == transformers' greedy ``generate`` tokens, exactly."""
    prompt = _ids(prompt_len, seed=1000 + prompt_len).tolist()
    eos = list(ref32.arch.eos_token_id)  # (2, 11): config.json ∪ generation_config.json
    ours = generate_ar(ref32, [prompt], max_new_tokens=24, eos_token_id=eos)[0].tokens
    theirs = _hf_greedy(hf, prompt, 24, eos)
    assert ours == theirs
    assert len(ours) == 24 or ours[-1] in eos


def test_variant_config_matches(variant_path):
    """Another pattern, 4 Mamba groups, chunk_size 32: full sequence, cache path, greedy."""
    ref = load_reference(variant_path, router_dtype=torch.float32)
    hf_v = load_hf_context_tower(variant_path)
    assert ref.arch.pattern == VARIANT["hybrid_override_pattern"] and ref.arch.n_groups == 4
    ids = _ids(100, seed=5)
    full = _hf_logits(hf_v, ids)
    torch.testing.assert_close(ref.extend_context(ref.new_cache(), ids), full, atol=ATOL, rtol=RTOL)
    cache, out = ref.new_cache(), []
    for a, b in [(0, 45), (45, 46), (46, 47), (47, 100)]:
        out.append(ref.extend_context(cache, ids[a:b]))
    torch.testing.assert_close(torch.cat(out), full, atol=ATOL, rtol=RTOL)
    prompt = ids[:33].tolist()
    eos = list(ref.arch.eos_token_id)
    ours = generate_ar(ref, [prompt], max_new_tokens=24, eos_token_id=eos)[0].tokens
    assert ours == _hf_greedy(hf_v, prompt, 24, eos)


def test_stock_transformers_clamps_dt_at_time_step_min(tiny_path, ref32, tmp_path):
    """Why ``dt_limit="config"`` is needed, and that it is the only difference.

    Stock transformers (``NemotronHMamba2Mixer.time_step_limit = (time_step_min, inf)``)
    differs from the reference on this checkpoint, whose ``dt`` often falls below 1e-3; it
    equals the reference built from the same weights with ``time_step_limit`` set to
    ``[time_step_min, inf]`` in ``config.json``.
    """
    ids = _ids(150, seed=3)
    stock = load_hf_context_tower(tiny_path, dt_limit="transformers")
    assert stock.model.layers[0].mixer.time_step_limit == (stock.config.time_step_min, math.inf)
    theirs = _hf_logits(stock, ids)

    assert ref32.arch.time_step_limit == (0.0, math.inf)
    diff = (ref32.extend_context(ref32.new_cache(), ids) - theirs).abs().max()
    assert diff > 1e-2, "the tiny checkpoint no longer exercises dt < time_step_min"

    clamped_path = make_checkpoint(tmp_path, "tiny", time_step_limit=[1e-3, math.inf])
    same_weights, other_weights = read_state_dict(tiny_path), read_state_dict(clamped_path)
    assert same_weights.keys() == other_weights.keys()
    assert all(torch.equal(same_weights[k], other_weights[k]) for k in same_weights)
    clamped = load_reference(clamped_path, router_dtype=torch.float32)
    assert clamped.arch.time_step_limit == (1e-3, math.inf)
    torch.testing.assert_close(
        clamped.extend_context(clamped.new_cache(), ids), theirs, atol=ATOL, rtol=RTOL
    )
