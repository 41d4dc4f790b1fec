"""Denoiser attention = softmax over [context K/V ; block K/V] with no mask; context is causal."""

import math

import torch

from vllm_twotower.reference import model as model_mod
from vllm_twotower.reference.layers import attention


def explicit_attention(q, k, v, visible):
    """Per query and head: softmax(q·k / sqrt(d)) over the keys ``visible(qi, ki)`` allows."""
    Lq, Hq, D = q.shape
    groups = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for i in range(Lq):
        for h in range(Hq):
            keys = [j for j in range(k.shape[0]) if visible(i, j)]
            s = torch.tensor([float(q[i, h] @ k[j, h // groups]) / math.sqrt(D) for j in keys])
            w = torch.softmax(s, 0)
            out[i, h] = sum(w[n] * v[j, h // groups] for n, j in enumerate(keys))
    return out


def test_attention_without_mask_sees_every_key(gen):
    q, k, v = (
        torch.randn(5, 4, 8, generator=gen),
        torch.randn(9, 2, 8, generator=gen),
        torch.randn(9, 2, 8, generator=gen),
    )
    torch.testing.assert_close(
        attention(q, k, v, None), explicit_attention(q, k, v, lambda i, j: True)
    )


def test_attention_causal_offset(gen):
    q, k, v = (
        torch.randn(5, 4, 8, generator=gen),
        torch.randn(9, 2, 8, generator=gen),
        torch.randn(9, 2, 8, generator=gen),
    )
    got = attention(q, k, v, causal_offset=4)
    torch.testing.assert_close(got, explicit_attention(q, k, v, lambda i, j: j <= 4 + i))


def _record_attention(monkeypatch):
    calls = []

    def recording(q, k, v, causal_offset):
        calls.append((q, k, v, causal_offset))
        return attention(q, k, v, causal_offset)

    monkeypatch.setattr(model_mod, "attention", recording)
    return calls


def test_denoiser_attention_is_concat_context_then_block_unmasked(tiny_model, monkeypatch):
    m = tiny_model
    cache = m.new_cache()
    m.extend_context(cache, torch.tensor([7, 8, 9, 10, 11, 12, 13]))
    calls = _record_attention(monkeypatch)
    block = torch.tensor([[3] * 6 + [40] * 4 + [3] * 6])
    m.denoise(block, torch.tensor([12 / 16]), [cache])
    attn_layers = [
        i for i, layer in enumerate(m.denoiser_tower.layers) if layer.kind == "attention"
    ]
    assert len(calls) == len(attn_layers) >= 2
    for (q, K, V, offset), i in zip(calls, attn_layers, strict=True):
        assert offset is None  # no mask, no causality: every block query sees everything
        assert q.shape[0] == 16 and K.shape[0] == cache.length + 16
        # context first (the context tower's layer-i K/V, untouched), then the block's own.
        assert torch.equal(K[: cache.length], cache.kv[i][0])
        assert torch.equal(V[: cache.length], cache.kv[i][1])


def test_context_attention_is_causal_over_cache(tiny_model, monkeypatch):
    m = tiny_model
    cache = m.new_cache()
    m.extend_context(cache, torch.tensor([7, 8, 9]))
    calls = _record_attention(monkeypatch)
    m.extend_context(cache, torch.tensor([20, 21, 22, 23]))
    assert calls and all(offset == 3 for _, _, _, offset in calls)
    assert all(K.shape[0] == 7 for _, K, _, _ in calls)


def test_in_block_attention_is_bidirectional(tiny_model):
    """Changing a late block token changes early positions' logits (it would not if causal)."""
    m = tiny_model
    cache = m.new_cache()
    m.extend_context(cache, torch.tensor([7, 8, 9]))
    a = torch.full((1, 16), 3)
    b = a.clone()
    b[0, 15] = 100
    t = torch.tensor([1.0])
    la, lb = m.denoise(a, t, [cache]), m.denoise(b, t, [cache])
    assert not torch.allclose(la[0, 0], lb[0, 0])


def test_context_tower_is_causal(tiny_model):
    m = tiny_model
    la = m.extend_context(m.new_cache(), torch.tensor([5, 6, 7, 8]))
    lb = m.extend_context(m.new_cache(), torch.tensor([5, 6, 7, 99]))
    # Not bit-exact: the MoE batches a different set of rows per expert.
    torch.testing.assert_close(la[:3], lb[:3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[3], lb[3])


def test_incremental_context_equals_one_pass(tiny_model):
    """Prefill + commits (chunked extension) == one causal pass: the cache carries everything."""
    m = tiny_model
    ids = torch.arange(20, 60)
    full = m.extend_context(m.new_cache(), ids)
    cache = m.new_cache()
    parts = [m.extend_context(cache, ids[s:e]) for s, e in ((0, 7), (7, 23), (23, 24), (24, 40))]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-4, atol=1e-4)
