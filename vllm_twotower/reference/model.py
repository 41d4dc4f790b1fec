"""Both towers of Nemotron-Labs-TwoTower in plain PyTorch; ``state_dict()`` keys = checkpoint keys.

* The **context tower** is a stock causal NemotronH. It owns the per-request cache: attention
  K/V and Mamba conv/SSM states (:class:`ContextCache`).
* The **denoiser tower** has the same layers and names but a different layer forward: adaLN
  modulation by the masked fraction ``t`` (modulate->norm for ``M``/``*``, norm->modulate for
  ``E``/``-``, gate on the residual), attention over ``[context K/V ; block K/V]`` with no mask,
  and Mamba seeded read-only from the context layer's states (spec §4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import TwoTowerArch
from .layers import MLP, Attention, Mamba2Mixer, MoE, RMSNorm, TimestepEmbedder, attention, modulate


@dataclass
class ContextCache:
    """One request's context-tower state after ``length`` tokens.

    ``kv[i]`` = (K, V) of attention layer i, each ``[length, Hkv, D]`` (post-projection, NoPE);
    ``conv[i]`` = the last K-1 raw xBC inputs of Mamba layer i ``[C, K-1]``, most recent last;
    ``ssm[i]`` = its SSM state ``[H, P, N]`` in fp32.
    """

    length: int = 0
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)

    def clone(self) -> ContextCache:
        return ContextCache(
            self.length,
            {i: (k.clone(), v.clone()) for i, (k, v) in self.kv.items()},
            {i: c.clone() for i, c in self.conv.items()},
            {i: s.clone() for i, s in self.ssm.items()},
        )


class DecoderLayer(nn.Module):
    """``layers.{i}``: the pre-mixer ``norm`` and the ``mixer``; the forward lives in the tower."""

    def __init__(self, arch: TwoTowerArch, index: int, router_dtype: torch.dtype):
        super().__init__()
        self.kind = arch.kind(index)
        self.norm = RMSNorm(arch.hidden_size, arch.layer_norm_epsilon)
        if self.kind == "mamba":
            self.mixer = Mamba2Mixer(arch)
        elif self.kind == "attention":
            self.mixer = Attention(arch)
        elif self.kind == "moe":
            self.mixer = MoE(arch, router_dtype)
        else:
            self.mixer = MLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias)


class Tower(nn.Module):
    """``{context,denoiser}_tower``: ``embeddings``, ``layers``, ``norm_f``."""

    def __init__(self, arch: TwoTowerArch, router_dtype: torch.dtype):
        super().__init__()
        self.embeddings = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, router_dtype) for i in range(arch.num_layers)
        )
        self.norm_f = RMSNorm(arch.hidden_size, arch.layer_norm_epsilon)


class TwoTowerReference(nn.Module):
    """The whole checkpoint. Use :func:`~.loading.load_reference` to build one from a directory."""

    def __init__(self, arch: TwoTowerArch, router_dtype: torch.dtype = torch.float64):
        super().__init__()
        H = arch.hidden_size
        self.arch = arch
        self.context_tower = Tower(arch, router_dtype)
        self.context_lm_head = nn.Linear(H, arch.vocab_size, bias=False)
        self.denoiser_tower = Tower(arch, router_dtype)
        self.lm_head = nn.Linear(H, arch.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(H)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(H, 3 * H))
        # Per-layer (3, H) biases added to t_block's output: rows are shift, scale, gate.
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.zeros(3, H)) for _ in range(arch.num_layers)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ context tower

    def new_cache(self) -> ContextCache:
        a, cache = self.arch, ContextCache()
        for i, layer in enumerate(self.context_tower.layers):
            if layer.kind == "attention":
                empty = torch.zeros(0, a.num_key_value_heads, a.head_dim, dtype=self.dtype)
                cache.kv[i] = (empty, empty.clone())
            elif layer.kind == "mamba":
                conv, ssm = layer.mixer.empty_state(1, self.dtype)
                cache.conv[i], cache.ssm[i] = conv[0], ssm[0]
        return cache

    @torch.no_grad()
    def extend_context(self, cache: ContextCache, ids: torch.Tensor) -> torch.Tensor:
        """Run the context tower causally over ``ids [L]`` after ``cache``; update it in place.

        This is both the prefill and the commit of a finished block (spec §5). Returns the
        fp32 ``context_lm_head`` logits ``[L, V]`` (used by AR mode and prompt logprobs).
        """
        if ids.numel() == 0:
            return torch.zeros(0, self.arch.vocab_size)
        x = self.context_tower.embeddings(ids)[None]  # [1, L, H]
        for i in range(self.arch.num_layers):
            x = self.context_layer(i, x, cache)
        cache.length += ids.shape[0]
        return self.context_lm_head(self.context_tower.norm_f(x[0])).float()

    def context_layer(self, i: int, x: torch.Tensor, cache: ContextCache) -> torch.Tensor:
        """Stock NemotronH pre-norm layer ``i`` over ``x [1, L, H]``; updates ``cache`` layer i."""
        layer = self.context_tower.layers[i]
        h = layer.norm(x)
        if layer.kind == "mamba":
            out, conv, ssm = layer.mixer(h, cache.conv[i][None], cache.ssm[i][None])
            cache.conv[i], cache.ssm[i] = conv[0], ssm[0]
        elif layer.kind == "attention":
            q, k, v = layer.mixer.qkv(h[0])
            K, V = (torch.cat([c, n]) for c, n in zip(cache.kv[i], (k, v), strict=True))
            cache.kv[i] = (K, V)
            out = layer.mixer.o_proj(attention(q, K, V, causal_offset=cache.length).flatten(-2))[
                None
            ]
        else:
            out = layer.mixer(h)
        return x + out

    # ------------------------------------------------------------------ denoiser tower

    def time_conditioning(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B]`` (masked fraction) -> ``[B, 3, H]`` before the per-layer tables."""
        return self.t_block(self.t_embedder(t)).unflatten(-1, (3, self.arch.hidden_size))

    @torch.no_grad()
    def denoise(
        self, block_ids: torch.Tensor, t: torch.Tensor | None, caches: list[ContextCache]
    ) -> torch.Tensor:
        """One denoiser forward over ``block_ids [B, L]`` -> fp32 logits ``[B, L, V]``.

        Row b reads (never writes) ``caches[b]``: attention layer i attends without a mask over
        ``[caches[b].kv[i] ; the block's own K/V]``; Mamba layer i starts from
        ``caches[b].conv[i]/ssm[i]`` and its final state is dropped. ``t [B]`` is per row (the
        trained semantics; HF's batch-mean ``t`` is a quirk, spec §9.7). ``t=None`` switches
        time conditioning off and uses the stock norm->mixer order (mock-AR).
        """
        x = self.denoiser_tower.embeddings(block_ids)
        temb = None if t is None else self.time_conditioning(t)
        for i in range(self.arch.num_layers):
            x = self.denoiser_layer(i, x, temb, caches)
        return self.lm_head(self.denoiser_tower.norm_f(x)).float()

    def denoiser_layer(
        self, i: int, x: torch.Tensor, temb: torch.Tensor | None, caches: list[ContextCache]
    ) -> torch.Tensor:
        """Denoiser layer ``i`` over ``x [B, L, H]``; ``temb [B, 3, H]`` or None (no adaLN)."""
        layer = self.denoiser_tower.layers[i]
        if temb is None:
            h = layer.norm(x)
        else:
            shift, scale, gate = (temb + self.scale_shift_tables[i]).unbind(1)
            shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
            if layer.kind in ("mamba", "attention"):  # Megatron fuses the norm into in_proj/qkv
                h = layer.norm(modulate(x, shift, scale))
            else:  # MoE/MLP have a separate pre-MLP norm: normalise first
                h = modulate(layer.norm(x), shift, scale)
        if layer.kind == "mamba":
            conv = torch.stack([c.conv[i] for c in caches]).to(h.dtype)
            ssm = torch.stack([c.ssm[i] for c in caches])
            out, _, _ = layer.mixer(h, conv, ssm)  # final states discarded
        elif layer.kind == "attention":
            rows = []
            for b, cache in enumerate(caches):
                q, k, v = layer.mixer.qkv(h[b])
                K, V = (torch.cat([c, n]) for c, n in zip(cache.kv[i], (k, v), strict=True))
                rows.append(attention(q, K, V, causal_offset=None).flatten(-2))
            out = layer.mixer.o_proj(torch.stack(rows))
        else:
            out = layer.mixer(h)
        return x + (out if temb is None else gate * out)
