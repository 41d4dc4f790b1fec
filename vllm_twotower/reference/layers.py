"""Layer math of the reference: RMSNorm, time embedding, adaLN, Mamba-2, attention, MoE, MLP.

Parameter names equal NVIDIA's checkpoint names below ``{tower}.layers.{i}.`` so the reference's
``state_dict()`` *is* the checkpoint. Every function states the dtype it computes in, because
that is where block diffusion's numeric traps live (see the spec §9).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch import TwoTowerArch

# ----------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """NemotronH RMSNorm: normalised and scaled in fp32, then cast back to the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2 output norm: ``rmsnorm(y * silu(z))`` per group of ``d_inner / n_groups``."""

    def __init__(self, dim: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group = dim // n_groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        h = h.unflatten(-1, (-1, self.group))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(dtype)


# ----------------------------------------------------------------------------- time conditioning


def timestep_embedding(t: torch.Tensor, dtype: torch.dtype, dim: int = 256) -> torch.Tensor:
    """PixArt/DiT sinusoid of ``t * 1000`` with cos first.

    ``t`` is cast to the model dtype *before* the x1000 and the product is taken in that dtype,
    exactly as NVIDIA's reference (and Megatron at training time) does: in bf16, t = 3/16 reaches
    the sinusoid as 188, not 187.5. The sinusoid itself is fp32, cast back to ``dtype``.
    """
    ts = (t.to(dtype) * 1000).float()
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = ts[:, None] * freqs[None, :].to(ts.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)


class TimestepEmbedder(nn.Module):
    """``t_embedder.mlp``: Linear(256, H) -> SiLU -> Linear(H, H)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, dtype, self.freq_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation, in the model dtype."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- Mamba-2


def causal_conv1d(
    xbc: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over ``[B, L, C]`` started from ``conv_state [B, C, K-1]``.

    ``conv_state`` holds the last K-1 *raw* (pre-conv) inputs, most recent last; the returned
    state is the same for the extended sequence. No activation here.
    """
    k = weight.shape[-1]
    full = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # [B, C, K-1+L]
    out = F.conv1d(full, weight, bias, groups=full.shape[1])  # valid conv: L outputs
    return out.transpose(1, 2), full[..., full.shape[-1] - (k - 1) :]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(a[..., j+1 : i+1])`` for i >= j, -inf above the diagonal.

    Summing the differences directly (not ``cumsum[i] - cumsum[j]``) keeps the decays exact for
    long chunks.
    """
    n = a.shape[-1]
    a = a[..., None].expand(*a.shape, n)  # [..., i(src), j]
    below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=-1)
    s = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    return s.masked_fill(~torch.tril(torch.ones_like(below)), -torch.inf)


def ssd_scan(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H] after softplus
    A: torch.Tensor,  # [H], negative
    B: torch.Tensor,  # [B, L, G, N]
    C: torch.Tensor,  # [B, L, G, N]
    D: torch.Tensor,  # [H]
    init_state: torch.Tensor,  # [B, H, P, N]
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD (state-space duality) scan in fp32, chunk by chunk.

    Within a chunk the recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``,
    ``y_t = C_t h_t + D x_t`` is evaluated in its quadratic "attention" form; the state is
    carried between chunks. The result does not depend on ``chunk_size`` (only rounding
    does). Returns ``(y [B,L,H,P], h_L)``.
    """
    f32 = torch.float32
    x, dt, A, B, C, D = (v.to(f32) for v in (x, dt, A, B, C, D))
    h = init_state.to(f32)
    heads_per_group = x.shape[2] // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # [B, L, H, N]
    C = C.repeat_interleave(heads_per_group, dim=2)
    ys = []
    for s in range(0, x.shape[1], chunk_size):
        xc, dtc, Bc, Cc = (v[:, s : s + chunk_size] for v in (x, dt, B, C))
        dA = (dtc * A).transpose(1, 2)  # [B, H, l]
        cum = torch.cumsum(dA, dim=-1)  # [B, H, l]
        decay = torch.exp(_segsum(dA))  # [B, H, l(i), l(j)]
        scores = torch.einsum("bihn,bjhn->bhij", Cc, Bc) * decay
        y = torch.einsum("bhij,bjh,bjhp->bihp", scores, dtc, xc)
        y = y + torch.einsum("bihn,bhpn,bhi->bihp", Cc, h, torch.exp(cum))
        to_end = torch.exp(cum[..., -1:] - cum)  # [B, H, l]: decay from token j to chunk end
        h = h * torch.exp(cum[..., -1])[..., None, None] + torch.einsum(
            "bhj,bjh,bjhp,bjhn->bhpn", to_end, dtc, xc, Bc
        )
        ys.append(y)
    y = torch.cat(ys, dim=1) + x * D[:, None]
    return y, h


class Mamba2Mixer(nn.Module):
    """NemotronH's Mamba-2 mixer with explicit initial and final states.

    The same module serves both towers: the context tower passes its cached states and keeps the
    final ones; a denoiser layer passes the *context* layer's states and drops the final ones
    (spec §4: seeded, read-only). The scan always runs in fp32 (spec §9.2).
    """

    def __init__(self, arch: TwoTowerArch):
        super().__init__()
        a = arch
        self.arch = a
        self.d_inner, self.conv_dim = a.mamba_d_inner, a.mamba_conv_dim
        self.n_heads, self.head_dim = a.mamba_num_heads, a.mamba_head_dim
        self.n_groups, self.d_state = a.n_groups, a.ssm_state_size
        proj = self.d_inner + self.conv_dim + self.n_heads  # z | xBC | dt
        self.in_proj = nn.Linear(a.hidden_size, proj, bias=a.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, a.conv_kernel, groups=self.conv_dim, bias=a.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedGroupRMSNorm(self.d_inner, self.n_groups, a.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, a.hidden_size, bias=a.mamba_proj_bias)

    def empty_state(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        conv = torch.zeros(batch, self.conv_dim, self.arch.conv_kernel - 1, dtype=dtype)
        ssm = torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, dtype=torch.float32)
        return conv, ssm

    def forward(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [B, L, H]`` -> ``(out [B, L, H], new_conv_state, new_ssm_state)``."""
        bsz, seq, _ = h.shape
        z, xbc, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc, new_conv = causal_conv1d(xbc, conv_state, self.conv1d.weight, self.conv1d.bias)
        xbc = F.silu(xbc)
        gn = self.n_groups * self.d_state
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        lo, hi = self.arch.time_step_limit
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(lo, hi)
        y, new_ssm = ssd_scan(
            x.reshape(bsz, seq, self.n_heads, self.head_dim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(bsz, seq, self.n_groups, self.d_state),
            C.reshape(bsz, seq, self.n_groups, self.d_state),
            self.D,
            ssm_state,
            self.arch.chunk_size,
        )
        y = self.norm(y.reshape(bsz, seq, self.d_inner).to(h.dtype), z)
        return self.out_proj(y), new_conv, new_ssm


# ----------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int | None):
    """Explicit softmax attention for one sequence (NoPE, GQA).

    ``q [Lq, Hq, D]``, ``k/v [Lk, Hkv, D]``. ``causal_offset=None`` means no mask at all (the
    denoiser: every block query sees the whole context and the whole block). Otherwise query i
    sits at key position ``causal_offset + i`` and sees keys ``<=`` that (the context tower).
    Softmax in fp32.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    if causal_offset is not None:
        qpos = causal_offset + torch.arange(q.shape[0])[:, None]
        scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, -torch.inf)
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float())
    return out.to(q.dtype)


class Attention(nn.Module):
    """NemotronH attention projections; the caller decides what the queries see."""

    def __init__(self, arch: TwoTowerArch):
        super().__init__()
        a = arch
        self.n_heads, self.n_kv, self.head_dim = (
            a.num_attention_heads,
            a.num_key_value_heads,
            a.head_dim,
        )
        bias = a.attention_bias
        self.q_proj = nn.Linear(a.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(a.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(a.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, a.hidden_size, bias=bias)

    def qkv(self, h: torch.Tensor):
        """``h [L, H]`` -> ``q [L, Hq, D]``, ``k, v [L, Hkv, D]``."""
        return (
            self.q_proj(h).unflatten(-1, (self.n_heads, self.head_dim)),
            self.k_proj(h).unflatten(-1, (self.n_kv, self.head_dim)),
            self.v_proj(h).unflatten(-1, (self.n_kv, self.head_dim)),
        )


# ----------------------------------------------------------------------------- MLP and MoE


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class MLP(nn.Module):
    """Non-gated relu² MLP: ``down(relu(up(x))²)`` (NemotronH ``-`` layers and the experts)."""

    def __init__(self, hidden: int, width: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


class Router(nn.Module):
    """Sigmoid top-k router with the e-score correction bias (DeepSeek-V3 style)."""

    def __init__(self, arch: TwoTowerArch):
        super().__init__()
        self.arch = arch
        self.weight = nn.Parameter(torch.zeros(arch.n_routed_experts, arch.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(arch.n_routed_experts))

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> ``(expert ids [T, k], fp32 weights [T, k])``.

        NVIDIA's reference routes in fp64 (Megatron's ``--moe-router-dtype fp64``); vLLM routes
        in fp32. ``dtype`` picks which, so borderline expert choices can be studied either way.
        """
        a = self.arch
        scores = torch.sigmoid(x.to(dtype) @ self.weight.to(dtype).T)
        choice = scores + self.e_score_correction_bias.to(dtype)
        if a.n_group > 1:  # group-limited routing: keep the best topk_group groups
            grouped = choice.unflatten(-1, (a.n_group, -1))
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(
                -1, group_score.topk(a.topk_group, dim=-1).indices, 1.0
            )
            choice = grouped.masked_fill(keep[..., None] == 0, 0.0).flatten(-2)
        ids = choice.topk(a.num_experts_per_tok, dim=-1, sorted=True).indices
        w = scores.gather(-1, ids)
        if a.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, (w * a.routed_scaling_factor).float()


class MoE(nn.Module):
    """Routed non-gated relu² experts plus the shared expert."""

    def __init__(self, arch: TwoTowerArch, router_dtype: torch.dtype = torch.float64):
        super().__init__()
        self.router_dtype = router_dtype
        self.gate = Router(arch)
        self.experts = nn.ModuleList(
            MLP(arch.hidden_size, arch.moe_intermediate_size, arch.mlp_bias)
            for _ in range(arch.n_routed_experts)
        )
        self.shared_experts = (
            MLP(arch.hidden_size, arch.moe_shared_expert_intermediate_size, arch.mlp_bias)
            if arch.n_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, w = self.gate(x, self.router_dtype)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():  # only the experts some token chose
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.experts[e](x[tok]).float() * w[tok, slot, None])
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)
