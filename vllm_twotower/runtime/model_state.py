"""Model Runner V2 glue: split each step's rows between the towers, build attention metadata.

vLLM's runner calls ``prepare_attn`` before every forward. Here each row's phase (see
:mod:`.request_state`) decides its tower and its causality:

* PREFILL and COMMIT rows are context rows: causal, their K/V and Mamba state are kept;
* DENOISE rows are denoiser rows: bidirectional over [committed context ; canvas], Mamba
  seeded read-only from the context state.

The result is a :class:`~vllm_twotower.model.two_tower.StepPlan` on the model (token indices
per tower, Mamba state slots per context Mamba layer) plus vLLM attention metadata for the
attention KV groups only: the Mamba layers take their rows from the plan, not from vLLM's
Mamba metadata (whose builder assumes one tower and speculative decoding).

The attention metadata follows the model's attention path (see
:mod:`vllm_twotower.model.two_tower`): on the block-attention path it covers the context rows
alone, as a causal sub-batch (none at all when there are none), and the plan carries the
denoiser rows' block tables and context lengths for the kernel; on the one-call path it covers
every row, with per-request causal flags.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_cache_interface import MambaSpec
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from ..config import BLOCK_SIZE, max_sample_logprobs
from ..model.mamba import MambaRows
from ..model.two_tower import BlockAttnRows, StepPlan
from .prompt_logprobs import PromptLogprobsStash
from .request_state import DENOISE, TwoTowerRequestStates
from .sampler import TwoTowerSampler

logger = logging.getLogger("vllm.twotower")
_LOG_INTERVAL_S = 10.0


def _token_indices(qsl: np.ndarray, rows: np.ndarray) -> np.ndarray:
    parts = [np.arange(qsl[r], qsl[r + 1]) for r in rows]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class TwoTowerModelState(DefaultModelState):
    num_new_sampled_tokens_per_step: int = 0  # diffusion: no bonus token

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.states = TwoTowerRequestStates(
            self.max_num_reqs, device, max_sample_logprobs(self.model_config.max_logprobs)
        )
        self.chunk_size = self.model_config.get_mamba_chunk_size()
        # Per-request causal flags, int32 as the attention backends require.
        self._causal = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=device)
        self._slot_of: dict[str, int] = {}
        # Prompt logprobs wait here for the request's first block (see prompt_logprobs.py).
        self.prompt_logprobs_stash = PromptLogprobsStash()
        model.prompt_logprobs_stash = self.prompt_logprobs_stash
        self._last_log = time.monotonic()

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self._slot_of[new_req_data.req_id] = req_index
        self.prompt_logprobs_stash.unpark(new_req_data.req_id)

    def remove_request(self, req_id: str) -> None:
        """Finished, aborted or preempted: log its NFE (vLLM's step counter includes commits)."""
        super().remove_request(req_id)
        self.prompt_logprobs_stash.park(req_id)
        slot = self._slot_of.pop(req_id, None)
        if slot is None:
            return
        s = self.states
        logger.debug(
            "TwoTower request %s: %d denoiser forwards, %d blocks",
            req_id,
            int(s.nfe[slot]),
            int(s.blocks[slot]),
        )
        now = time.monotonic()
        if now - self._last_log > _LOG_INTERVAL_S and s.total_nfe:
            self._last_log = now
            logger.info(
                "TwoTower: %d denoiser forwards (NFE), %d committed blocks: %.2f tokens per "
                "denoiser forward",
                s.total_nfe,
                s.total_blocks,
                16 * s.total_blocks / s.total_nfe,
            )

    def get_supported_generation_tasks(self):
        return ("generate",)

    def custom_sampler(self, sampler: Any):
        return TwoTowerSampler(sampler, self.states, self.prompt_logprobs_stash), None

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        self.model.plan = None  # dummy runs go through the context tower without state
        return super().prepare_dummy_inputs(num_reqs, num_tokens)

    def prepare_attn(
        self,
        input_batch,
        cudagraph_mode,
        block_tables,
        slot_mappings,
        attn_groups,
        kv_cache_config,
        for_capture: bool = False,
        ubatch_idx: int = 0,
    ) -> dict[str, Any]:
        num_reqs = input_batch.num_reqs
        qsl = input_batch.query_start_loc_np[: num_reqs + 1]
        query_lens = np.diff(qsl)
        slots = input_batch.idx_mapping_np[:num_reqs]
        is_den = (self.states.phase.numpy()[slots] == DENOISE) & (query_lens == BLOCK_SIZE)
        den_rows, ctx_rows = np.nonzero(is_den)[0], np.nonzero(~is_den)[0]

        mamba_groups = {
            gid
            for gid, g in enumerate(kv_cache_config.kv_cache_groups)
            if isinstance(g.kv_cache_spec, MambaSpec)
        }
        attn_only = [
            [] if gid in mamba_groups else groups for gid, groups in enumerate(attn_groups)
        ]
        device = input_batch.input_ids.device
        ctx_tokens = torch.from_numpy(_token_indices(qsl, ctx_rows)).to(device)
        tables = (block_tables, slot_mappings, attn_only, kv_cache_config)
        den_attn = ctx_slots = None
        if self.model.step_attention_path() == "block":
            metadata, ctx_slots = self._context_attn_metadata(
                input_batch, ctx_rows, ctx_tokens, *tables
            )
            den_attn = self._denoiser_attn_rows(input_batch, den_rows, *tables)
        else:
            metadata = self._one_call_attn_metadata(input_batch, is_den, *tables)

        computed = input_batch.num_computed_tokens_np[:num_reqs]

        def rows_of(rows, slots):
            if not len(rows):
                return None
            return MambaRows.build(
                query_lens[rows].tolist(),  # 16 for every denoiser row
                computed[rows].tolist(),
                [slots[r] for r in rows],
                self.chunk_size,
                device,
            )

        ctx_mamba, den_mamba = {}, {}
        for gid in mamba_groups:
            # In mamba_cache_mode "none" a request's state slot is its first block id.
            state_slots = block_tables[gid][:num_reqs, 0].tolist()
            ctx, den = rows_of(ctx_rows, state_slots), rows_of(den_rows, state_slots)
            for name in kv_cache_config.kv_cache_groups[gid].layer_names:
                ctx_mamba[name], den_mamba[name] = ctx, den
        self.model.plan = StepPlan(
            ctx_tokens=ctx_tokens,
            den_tokens=torch.from_numpy(_token_indices(qsl, den_rows)).to(device),
            ctx_mamba=ctx_mamba,
            den_mamba=den_mamba,
            den_attn=den_attn,
            ctx_slots=ctx_slots,
        )
        return metadata

    def _one_call_attn_metadata(
        self, input_batch, is_den, block_tables, slot_mappings, attn_only, kv_cache_config
    ) -> dict[str, Any]:
        """Every row in one batch; causal flags per request (denoiser rows bidirectional)."""
        num_reqs = input_batch.num_reqs
        qsl = input_batch.query_start_loc_np[: num_reqs + 1]
        self._causal[:num_reqs] = torch.from_numpy((~is_den).astype(np.int32))
        return build_attn_metadata(
            attn_groups=attn_only,
            num_reqs=num_reqs,
            num_tokens=input_batch.num_tokens,
            query_start_loc_gpu=input_batch.query_start_loc[: num_reqs + 1],
            query_start_loc_cpu=torch.from_numpy(qsl),
            max_query_len=int(np.diff(qsl).max()) if num_reqs else 0,
            seq_lens=input_batch.seq_lens,
            max_seq_len=int(input_batch.seq_lens_cpu_upper_bound[:num_reqs].max()),
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            seq_lens_cpu_upper_bound=input_batch.seq_lens_cpu_upper_bound,
            positions=input_batch.positions,
            causal=self._causal[:num_reqs],
        )

    def _context_attn_metadata(
        self,
        input_batch,
        ctx_rows,
        ctx_tokens,
        block_tables,
        slot_mappings,
        attn_only,
        kv_cache_config,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """vLLM attention metadata for the context rows alone: a plain causal batch.

        Returns the metadata and, per attention layer, the slots of the context tokens, which
        the model hands to vLLM's K/V write in place of the runner's (all tokens): only
        committed tokens (prompt chunks, commits) are ever written to the cache.
        """
        if not len(ctx_rows):
            return {}, {}
        device = ctx_tokens.device
        rows_cpu = torch.from_numpy(ctx_rows)
        rows = rows_cpu.to(device)
        qsl_np = input_batch.query_start_loc_np
        query_lens = qsl_np[ctx_rows + 1] - qsl_np[ctx_rows]
        qsl = torch.zeros(len(ctx_rows) + 1, dtype=torch.int32)
        torch.cumsum(torch.from_numpy(query_lens), 0, out=qsl[1:])
        upper = input_batch.seq_lens_cpu_upper_bound[rows_cpu]
        attn_gids = [gid for gid, groups in enumerate(attn_only) if groups]
        sub_tables = list(block_tables)
        sub_slots = list(slot_mappings)
        for gid in attn_gids:
            sub_tables[gid] = block_tables[gid][rows]
            sub_slots[gid] = slot_mappings[gid][ctx_tokens]
        metadata = build_attn_metadata(
            attn_groups=attn_only,
            num_reqs=len(ctx_rows),
            num_tokens=len(ctx_tokens),
            query_start_loc_gpu=qsl.to(device),
            query_start_loc_cpu=qsl,
            max_query_len=int(query_lens.max()),
            seq_lens=input_batch.seq_lens[rows],
            max_seq_len=int(upper.max()),
            block_tables=sub_tables,
            slot_mappings=sub_slots,
            kv_cache_config=kv_cache_config,
            seq_lens_cpu_upper_bound=upper,
            positions=input_batch.positions[ctx_tokens],
            causal=True,
        )
        slots = {
            name: sub_slots[gid]
            for gid in attn_gids
            for name in kv_cache_config.kv_cache_groups[gid].layer_names
        }
        return metadata, slots

    def _denoiser_attn_rows(
        self, input_batch, den_rows, block_tables, slot_mappings, attn_only, kv_cache_config
    ) -> dict[str, BlockAttnRows]:
        """Per attention layer: the denoiser rows' block tables and committed context lengths.

        A denoising row's committed context is its computed tokens (its seq_len minus the
        16-token canvas, which is scheduled but never written to the cache).
        """
        if not len(den_rows):
            return {}
        device = input_batch.input_ids.device
        rows = torch.from_numpy(den_rows).to(device)
        context_lens = torch.from_numpy(
            input_batch.num_computed_tokens_np[den_rows].astype(np.int32)
        ).to(device)
        out = {}
        for gid, groups in enumerate(attn_only):
            if groups:
                rows_of_group = BlockAttnRows(block_tables[gid][rows], context_lens)
                for name in kv_cache_config.kv_cache_groups[gid].layer_names:
                    out[name] = rows_of_group
        return out
