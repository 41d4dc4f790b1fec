"""One Mamba-2 conv+scan for both towers, over the context layer's state slots.

vLLM's ``MambaMixer2.forward`` reads its rows and states from Mamba metadata built for the
whole batch. TwoTower splits every batch between towers (context rows: prefill chunks and
commits; denoiser rows: canvases), so both towers call vLLM's own Mamba ops (``causal_conv1d_fn``,
``mamba_chunk_scan_combined_varlen``; the CPU builds swap in CPU kernels) directly, with
per-row state slots:

* context rows start from their slot's state (when they have history) and **write** the
  final conv/SSM state back: a commit is a 16-token chunked-prefill continuation;
* denoiser rows start from the *context* layer's state at their slot and write nothing: the
  conv state is copied to scratch first and the final SSM state is dropped (spec §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn
from vllm.model_executor.layers.mamba.ops.ssd_combined import mamba_chunk_scan_combined_varlen


@dataclass
class MambaRows:
    """Which rows a Mamba call covers: varlen token ranges and their state slots."""

    query_start_loc: torch.Tensor  # [n + 1] int32, offsets into this call's tokens
    state_slots: torch.Tensor  # [n] int64, Mamba state slot of each row
    has_initial_state: torch.Tensor  # [n] bool
    cu_chunk_seqlens: torch.Tensor  # [num_chunks + 1] int32
    chunk_seq_idx: torch.Tensor  # [num_chunks] int32, row of each chunk
    last_chunk_indices: torch.Tensor  # [n] int64, last chunk of each row
    chunk_size: int

    @classmethod
    def build(cls, query_lens, num_computed, state_slots, chunk_size: int, device) -> MambaRows:
        """From host lists: tokens per row, tokens already in the state, slot per row.

        Chunks never span two rows and end on multiples of ``chunk_size`` of each row's
        absolute position (the layout vLLM's SSD kernels expect).
        """
        cu_chunks, seq_idx, last = [0], [], []
        for row, (n, done) in enumerate(zip(query_lens, num_computed, strict=True)):
            pos, end = done, done + n
            while pos < end:
                step = min(chunk_size - pos % chunk_size, end - pos)
                cu_chunks.append(cu_chunks[-1] + step)
                seq_idx.append(row)
                pos += step
            last.append(len(cu_chunks) - 2)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            t(qsl, torch.int32),
            t(list(state_slots), torch.int64),
            t([d > 0 for d in num_computed], torch.bool),
            t(cu_chunks, torch.int32),
            t(seq_idx, torch.int32),
            t(last, torch.int64),
            chunk_size,
        )


def mamba_conv_ssm(
    weights,  # a MambaMixer2 (either tower): conv1d, A, D, dt_bias, sizes
    projected: torch.Tensor,  # [T, in_proj out] of this call's tokens
    kv_cache: tuple[torch.Tensor, ...],  # the CONTEXT layer's (conv_state, ssm_state, ...)
    rows: MambaRows,
    write_back: bool,
) -> torch.Tensor:
    """Conv + SSD scan of ``projected`` (z | xBC | dt); returns the SSM output ``[T, d_inner]``."""
    num_tokens = projected.shape[0]
    xbc, dt = torch.split(
        projected[..., weights.tped_intermediate_size :],
        [weights.tped_conv_size, weights.tped_dt_size],
        dim=-1,
    )
    conv_state = kv_cache[0] if is_conv_state_dim_first() else kv_cache[0].transpose(-1, -2)
    ssm_state = kv_cache[1]
    if write_back:
        conv_states, cache_indices = conv_state, rows.state_slots
    else:  # read-only: the kernel updates whatever it is given, so give it a copy
        conv_states = conv_state[rows.state_slots].clone()
        cache_indices = torch.arange(len(rows.state_slots), device=projected.device)
    x = causal_conv1d_fn(
        xbc.transpose(0, 1),
        weights.conv_weights,
        weights.conv1d.bias,
        activation=weights.activation,
        conv_states=conv_states,
        has_initial_state=rows.has_initial_state,
        cache_indices=cache_indices,
        query_start_loc=rows.query_start_loc,
    ).transpose(0, 1)[:num_tokens]
    hidden, B, C = weights.split_hidden_states_B_C_fn(x)
    initial = torch.where(
        rows.has_initial_state[:, None, None, None], ssm_state[rows.state_slots], 0
    )
    heads = weights.num_heads // weights.tp_size
    groups = weights.n_groups // weights.tp_size
    out = torch.empty(num_tokens, heads, weights.head_dim, dtype=projected.dtype, device=x.device)
    final = mamba_chunk_scan_combined_varlen(
        hidden.view(num_tokens, heads, weights.head_dim),
        dt,
        weights.A,
        B.view(num_tokens, groups, -1),
        C.view(num_tokens, groups, -1),
        chunk_size=rows.chunk_size,
        D=weights.D,
        z=None,
        dt_bias=weights.dt_bias,
        seq_idx=rows.chunk_seq_idx,
        cu_seqlens=rows.query_start_loc,
        cu_chunk_seqlens=rows.cu_chunk_seqlens,
        last_chunk_indices=rows.last_chunk_indices,
        initial_states=initial,
        dt_softplus=True,
        dt_limit=(0.0, float("inf")),
        out=out,
        state_dtype=ssm_state.dtype,
    )
    if write_back:
        ssm_state[rows.state_slots] = final
    return out.view(num_tokens, -1)


def mamba_mixer_forward(
    weights, hidden: torch.Tensor, kv_cache, rows: MambaRows | None, write_back: bool
) -> torch.Tensor:
    """in_proj -> conv/scan -> gated norm -> out_proj with ``weights``' own projections.

    ``rows=None`` (profile/dummy runs, no cache bound yet) skips the state entirely.
    """
    projected, _ = weights.in_proj(hidden)
    if rows is None:
        ssm_out = torch.zeros(
            hidden.shape[0],
            weights.tped_intermediate_size,
            dtype=hidden.dtype,
            device=hidden.device,
        )
    else:
        ssm_out = mamba_conv_ssm(weights, projected, kv_cache, rows, write_back)
    gate = projected[..., : weights.tped_intermediate_size]
    out, _ = weights.out_proj(weights.norm(ssm_out, gate))
    return out
