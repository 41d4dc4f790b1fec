"""CPU experts for NemotronH's non-gated relu² MoE, run *inside* vLLM's FusedMoE.

vLLM 0.32's CPU experts implement only gated MLPs (SiLU/GELU and-mul), so NemotronH's
``down(relu(up(x))²)`` experts find no CPU backend at all. :class:`CpuRelu2Experts` fills
exactly that gap and nothing else: FusedMoE keeps its weight loading (for non-gated experts
``w13`` holds ``up_proj`` alone), its TP/EP sharding and its CPU router (sigmoid scores,
correction bias, renormalisation, routed scaling); only the expert matmuls are ours.
:func:`vllm_twotower._compat.install_cpu_moe` offers the class to vLLM's backend selection on
the CPU platform, after vLLM's own CPU classes, and it declines every activation but
``relu2_no_mul``, so other MoE models keep vLLM's kernels. CUDA never sees it.

Only names that ``vllm.model_executor.layers.fused_moe`` exports are used here; the one it does
not export (the no-op finalize) comes through ``_compat``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import (
    FusedMoEActivationFormat,
    FusedMoEExpertsModular,
    MoEActivation,
)
from vllm.platforms import current_platform

from vllm_twotower import _compat


def relu2_experts(
    hidden: torch.Tensor,  # [T, H], activation dtype
    w_up: torch.Tensor,  # [E_local, I, H]  (FusedMoE's w13 for non-gated experts)
    w_down: torch.Tensor,  # [E_local, H, I]  (FusedMoE's w2)
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] global expert ids
    expert_map: torch.Tensor | None = None,  # [E_global] -> local id, -1 if not on this rank
    b_up: torch.Tensor | None = None,  # [E_local, I]
    b_down: torch.Tensor | None = None,  # [E_local, H]
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * down_e(relu(up_e(x[t]))²)``, e = topk_ids[t,k], in fp32.

    Only this rank's experts contribute (a TP rank holds a slice of every expert's
    intermediate dim, an EP rank whole experts; FusedMoE reduces across ranks afterwards).
    The (token, slot) pairs are sorted by local expert and their inputs gathered once; each
    expert that some token chose then runs two matmuls over its contiguous rows in the
    activation dtype and adds its weighted rows into the fp32 output.
    """
    num_tokens, top_k = topk_ids.shape
    num_local = w_up.shape[0]
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    counts = torch.bincount(ids + 1, minlength=num_local + 1).tolist()
    order = torch.argsort(ids, stable=True)[counts[0] :]  # drop other ranks' experts (-1)
    tokens = order // top_k
    rows = hidden[tokens]  # [slots, H], grouped by expert
    weights = topk_weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(num_tokens, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    start = 0
    for e, n in enumerate(counts[1:]):
        if n == 0:
            continue
        seg = slice(start, start + n)
        start += n
        h = F.linear(rows[seg], w_up[e], None if b_up is None else b_up[e])
        h = torch.relu_(h).square_()
        y = F.linear(h, w_down[e], None if b_down is None else b_down[e])
        out.index_add_(0, tokens[seg], y.float() * weights[seg])
    return out


class CpuRelu2Experts(FusedMoEExpertsModular):
    """FusedMoE experts (Standard format, unquantized) for non-gated relu² on CPU."""

    @staticmethod
    def activation_format() -> FusedMoEActivationFormat:
        return FusedMoEActivationFormat.Standard

    @property
    def expects_unquantized_inputs(self) -> bool:
        return True

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu()

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return True

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return (weight_key, activation_key) == (None, None)

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.RELU2_NO_MUL

    @staticmethod
    def _supports_parallel_config(moe_parallel_config) -> bool:
        # TP slices and EP expert maps are handled in relu2_experts; batched (all-to-all)
        # formats are excluded by activation_format().
        return True

    def workspace_shapes(
        self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation
    ):
        return (0,), (0,), (M, K)  # scratch is allocated per expert in relu2_experts

    def finalize_weight_and_reduce_impl(self):
        return _compat.moe_already_reduced()  # apply() writes the weighted top-k sum itself

    def apply(
        self,
        output,
        hidden_states,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ) -> None:
        if apply_router_weight_on_input:  # prepare() already scaled hidden_states (top-1)
            topk_weights = torch.ones_like(topk_weights)
        output.copy_(
            relu2_experts(
                hidden_states,
                w1,
                w2,
                topk_weights,
                topk_ids,
                expert_map,
                b_up=self.w1_bias,
                b_down=self.w2_bias,
            )
        )
