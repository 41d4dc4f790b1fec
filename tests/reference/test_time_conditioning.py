"""Time embedding and the adaLN order per layer type (spec §4, §9.1)."""

import math

import pytest
import torch

from vllm_twotower.reference.layers import modulate, rms_norm, timestep_embedding

# Spec §9.1: bf16(bf16(k/16) * 1000) for k = 0..16.
BF16_T1000 = [0, 62.5, 125, 188, 250, 312, 376, 438, 500, 564, 624, 688, 752, 812, 876, 936, 1000]


def test_bf16_rounds_t_before_times_1000():
    t = torch.arange(17) / 16
    emb = timestep_embedding(t, torch.float32)
    # Recompute with the expected, rounded values in fp32: must match the bf16 path's sinusoid.
    ts = torch.tensor(BF16_T1000, dtype=torch.float32)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    expected = torch.cat([torch.cos(ts[:, None] * freqs), torch.sin(ts[:, None] * freqs)], -1)
    got_bf16 = timestep_embedding(t, torch.bfloat16)
    torch.testing.assert_close(got_bf16, expected.to(torch.bfloat16))
    # fp32 keeps the exact values (3/16 -> 187.5), which differ from the bf16-rounded ones.
    assert not torch.allclose(emb[3], expected[3], atol=1e-3)
    torch.testing.assert_close(emb[[0, 1, 2, 4, 8, 16]], expected[[0, 1, 2, 4, 8, 16]])


def test_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0]), torch.float32)
    assert torch.all(emb[0, :128] == 1) and torch.all(emb[0, 128:] == 0)


def _mixer_io(layer):
    """(module that first sees the mixer input, module whose output is the mixer output)."""
    mixer = layer.mixer
    if layer.kind == "mamba":
        return mixer.in_proj, mixer.out_proj
    if layer.kind == "attention":
        return mixer.q_proj, mixer.o_proj
    return mixer, mixer


def _run_recording(m, i, x, temb):
    layer = m.denoiser_tower.layers[i]
    first, last = _mixer_io(layer)
    seen = {}
    h1 = first.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    h2 = last.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    try:
        cache = m.new_cache()
        m.extend_context(cache, torch.tensor([4, 5, 6]))
        result = m.denoiser_layer(i, x, temb, [cache])
    finally:
        h1.remove()
        h2.remove()
    return seen["h"], seen["out"], result


@pytest.mark.parametrize("kind_letter", ["M", "*", "E", "-"])
def test_adaln_order_and_gate_per_layer_type(tiny_model, kind_letter, gen):
    """modulate->norm for M and *, norm->modulate for E and -, gate multiplies the mixer output."""
    m = tiny_model
    i = m.arch.pattern.index(kind_letter)
    layer = m.denoiser_tower.layers[i]
    x = torch.randn(1, 16, m.arch.hidden_size, generator=gen) * 3 + 0.5
    temb = m.time_conditioning(torch.tensor([5 / 16]))
    shift, scale, gate = (temb + m.scale_shift_tables[i]).unbind(1)
    shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
    w, eps = layer.norm.weight, layer.norm.eps
    if kind_letter in "M*":
        expected_h = rms_norm(modulate(x, shift, scale), w, eps)
        wrong_h = modulate(rms_norm(x, w, eps), shift, scale)
    else:
        expected_h = modulate(rms_norm(x, w, eps), shift, scale)
        wrong_h = rms_norm(modulate(x, shift, scale), w, eps)
    h, out, result = _run_recording(m, i, x, temb)
    torch.testing.assert_close(h.reshape(expected_h.shape), expected_h)
    assert not torch.allclose(wrong_h, expected_h, atol=1e-3)  # the order is observable
    torch.testing.assert_close(result, x + gate * out.reshape(x.shape))


def test_no_time_conditioning_uses_stock_order(tiny_model, gen):
    """t=None (mock-AR): plain norm -> mixer -> residual, no modulation, no gate."""
    m = tiny_model
    for letter in "M*E-":
        i = m.arch.pattern.index(letter)
        layer = m.denoiser_tower.layers[i]
        x = torch.randn(1, 1, m.arch.hidden_size, generator=gen)
        h, out, result = _run_recording(m, i, x, None)
        torch.testing.assert_close(
            h.reshape(x.shape), rms_norm(x, layer.norm.weight, layer.norm.eps)
        )
        torch.testing.assert_close(result, x + out.reshape(x.shape))
