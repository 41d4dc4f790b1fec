"""The seeded Mamba-2 of both towers against an explicit per-token recurrence in fp32."""

import pytest
import torch
import torch.nn.functional as F

from vllm_twotower.reference.layers import Mamba2Mixer, ssd_scan
from vllm_twotower.reference.model import ContextCache


def sequential_mamba(mixer: Mamba2Mixer, h, conv_state, ssm_state):
    """Spec §3/§9.3 written out token by token: conv window, softplus dt, h_t, y_t."""
    a = mixer.arch
    z, xbc, dt = mixer.in_proj(h).split([mixer.d_inner, mixer.conv_dim, mixer.n_heads], -1)
    w = mixer.conv1d.weight[:, 0, :]  # [C, K]
    window = conv_state.clone()  # [B, C, K-1], most recent last
    state = ssm_state.clone().float()
    A = -torch.exp(mixer.A_log.float())
    hpg = mixer.n_heads // mixer.n_groups
    ys = []
    for t in range(h.shape[1]):
        full = torch.cat([window, xbc[:, t, :, None]], -1)  # [B, C, K]
        window = full[..., 1:]
        u = F.silu((full * w).sum(-1) + mixer.conv1d.bias)
        gn = a.n_groups * a.ssm_state_size
        x, B, C = u.split([mixer.d_inner, gn, gn], -1)
        x = x.reshape(-1, mixer.n_heads, mixer.head_dim).float()
        B = B.reshape(-1, a.n_groups, a.ssm_state_size).float()
        C = C.reshape(-1, a.n_groups, a.ssm_state_size).float()
        d = F.softplus(dt[:, t].float() + mixer.dt_bias.float())  # [B, H]
        y = torch.empty_like(x)
        for head in range(mixer.n_heads):
            g = head // hpg
            decay = torch.exp(d[:, head] * A[head])[:, None, None]
            state[:, head] = (
                decay * state[:, head]
                + d[:, head, None, None] * x[:, head, :, None] * B[:, g, None, :]
            )
            y[:, head] = (state[:, head] * C[:, g, None, :]).sum(-1) + mixer.D[head] * x[:, head]
        ys.append(y.flatten(1))
    y = torch.stack(ys, 1).to(h.dtype)
    return mixer.out_proj(mixer.norm(y, z)), window, state


def _denoiser_mamba(model):
    i = next(i for i, layer in enumerate(model.denoiser_tower.layers) if layer.kind == "mamba")
    return i, model.denoiser_tower.layers[i].mixer


@pytest.mark.parametrize("state_scale", [0.0, 1.0, 1e3])
@pytest.mark.parametrize("length", [1, 16, 19])
def test_seeded_mamba_equals_sequential_recurrence(tiny_model, gen, state_scale, length):
    _, mixer = _denoiser_mamba(tiny_model)
    h = torch.randn(2, length, tiny_model.arch.hidden_size, generator=gen)
    conv, ssm = mixer.empty_state(2, torch.float32)
    conv = torch.randn(conv.shape, generator=gen)
    ssm = torch.randn(ssm.shape, generator=gen) * state_scale  # seeded states reach O(1e3)
    out, new_conv, new_ssm = mixer(h, conv, ssm)
    ref_out, ref_conv, ref_ssm = sequential_mamba(mixer, h, conv, ssm)
    scale = max(1.0, state_scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(new_conv, ref_conv)
    torch.testing.assert_close(new_ssm, ref_ssm, rtol=1e-4, atol=1e-4 * scale)


def test_scan_does_not_depend_on_chunk_size(gen):
    B, L, H, P, G, N = 2, 40, 4, 8, 2, 16
    x = torch.randn(B, L, H, P, generator=gen)
    dt = F.softplus(torch.randn(B, L, H, generator=gen))
    A = -torch.rand(H, generator=gen) * 4 - 0.5
    Bm, Cm = torch.randn(B, L, G, N, generator=gen), torch.randn(B, L, G, N, generator=gen)
    D = torch.randn(H, generator=gen)
    h0 = torch.randn(B, H, P, N, generator=gen) * 100
    ref = ssd_scan(x, dt, A, Bm, Cm, D, h0, chunk_size=128)
    for chunk in (1, 7, 16):
        got = ssd_scan(x, dt, A, Bm, Cm, D, h0, chunk_size=chunk)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-3)


def test_denoiser_mamba_reads_context_state_and_leaves_it_unchanged(tiny_model):
    """The denoiser's Mamba layer i starts from context layer i's state; the cache is read-only."""
    m = tiny_model
    cache = m.new_cache()
    m.extend_context(cache, torch.tensor([5, 17, 99, 250, 31]))
    before = cache.clone()
    block = torch.full((1, 16), 3)
    logits = m.denoise(block, torch.tensor([1.0]), [cache])
    for i in cache.ssm:
        assert torch.equal(cache.ssm[i], before.ssm[i]) and torch.equal(
            cache.conv[i], before.conv[i]
        )
    for i in cache.kv:
        assert torch.equal(cache.kv[i][0], before.kv[i][0])
    # Seeding matters: a zero-state ("unseeded") context changes the logits.
    zeroed = ContextCache(
        cache.length,
        cache.kv,
        {i: c * 0 for i, c in cache.conv.items()},
        {i: s * 0 for i, s in cache.ssm.items()},
    )
    assert not torch.allclose(m.denoise(block, torch.tensor([1.0]), [zeroed]), logits)
