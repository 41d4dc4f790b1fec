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

from ..config import BLOCK_SIZE
from ..model.mamba import MambaRows
from ..model.two_tower import StepPlan
from .request_state import DENOISE, TwoTowerRequestStates
from .sampler import TwoTowerSampler

logger = logging.getLogger("vllm_twotower")
_LOG_INTERVAL_S = 10.0


def _token_indices(qsl: np.ndarray, rows: np.ndarray) -> np.ndarray:
    parts = [np.arange(qsl[r], qsl[r + 1]) for r in rows]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class TwoTowerModelState(DefaultModelState):
    num_new_sampled_tokens_per_step: int = 0  # diffusion: no bonus token

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.states = TwoTowerRequestStates(self.max_num_reqs, device)
        self.chunk_size = self.model_config.get_mamba_chunk_size()
        # Per-request causal flags, int32 as the attention backends require.
        self._causal = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=device)
        self._slot_of: dict[str, int] = {}
        self._last_log = time.monotonic()

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self._slot_of[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        """Finished, aborted or preempted: log its NFE (vLLM's step counter includes commits)."""
        super().remove_request(req_id)
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
        return TwoTowerSampler(sampler, self.states), None

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
        num_reqs, num_tokens = input_batch.num_reqs, input_batch.num_tokens
        qsl = input_batch.query_start_loc_np[: num_reqs + 1]
        query_lens = np.diff(qsl)
        slots = input_batch.idx_mapping_np[:num_reqs]
        is_den = (self.states.phase.numpy()[slots] == DENOISE) & (query_lens == BLOCK_SIZE)
        den_rows, ctx_rows = np.nonzero(is_den)[0], np.nonzero(~is_den)[0]

        self._causal[:num_reqs] = torch.from_numpy((~is_den).astype(np.int32))
        mamba_groups = {
            gid
            for gid, g in enumerate(kv_cache_config.kv_cache_groups)
            if isinstance(g.kv_cache_spec, MambaSpec)
        }
        attn_only = [
            [] if gid in mamba_groups else groups for gid, groups in enumerate(attn_groups)
        ]
        metadata = build_attn_metadata(
            attn_groups=attn_only,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc_gpu=input_batch.query_start_loc[: num_reqs + 1],
            query_start_loc_cpu=torch.from_numpy(qsl),
            max_query_len=int(query_lens.max()) if num_reqs else 0,
            seq_lens=input_batch.seq_lens,
            max_seq_len=int(input_batch.seq_lens_cpu_upper_bound[:num_reqs].max()),
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            seq_lens_cpu_upper_bound=input_batch.seq_lens_cpu_upper_bound,
            positions=input_batch.positions,
            causal=self._causal[:num_reqs],
        )

        device = input_batch.input_ids.device
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
            ctx_tokens=torch.from_numpy(_token_indices(qsl, ctx_rows)).to(device),
            den_tokens=torch.from_numpy(_token_indices(qsl, den_rows)).to(device),
            ctx_mamba=ctx_mamba,
            den_mamba=den_mamba,
        )
        return metadata
