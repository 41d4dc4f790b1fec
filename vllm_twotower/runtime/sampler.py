"""The diffusion sampler Model Runner V2 calls after each forward (``ModelState.custom_sampler``).

Per row, by phase (:mod:`.request_state`):

* PREFILL: no logits; when the prompt's last chunk ran, the first all-[MASK] canvas starts;
* DENOISE: one confidence-unmasking step on its 16 logits rows; ``num_sampled=0`` and
  ``num_rejected=16``, so vLLM's scheduler rolls the canvas positions back and schedules
  them again;
* COMMIT: the context tower has just run over the finished canvas; its 16 tokens are emitted
  (``num_sampled=16``, ``num_rejected=0``) and vLLM trims them at EOS/stop/``max_tokens``;
  with their logprobs (recorded when each position committed) when the request asked.

The canvas the next step feeds in is written to the runner's ``req_states.draft_tokens``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.v1.outputs import LogprobsTensors
from vllm.v1.worker.gpu.sample.output import SamplerOutput

from ..config import BLOCK_SIZE, parse_decode_params
from .request_state import COMMIT, DENOISE, PREFILL, TwoTowerRequestStates

# The runner reads penalties_state.output_bin_counts; None means "no penalty bookkeeping".
_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)


class TwoTowerSampler:
    def __init__(self, sampler: Any, states: TwoTowerRequestStates, stash=None):
        self.sampling_states = sampler.sampling_states
        self.logprob_token_ids_state = sampler.logprob_token_ids_state
        self.req_states = sampler.req_states
        self.states = states
        self.stash = stash  # told which requests emit, so their prompt logprobs go out too

    @property
    def penalties_state(self):
        return _NO_PENALTIES

    def add_request(self, req_idx: int, sampling_params: Any) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)
        self.logprob_token_ids_state.add_request(req_idx, sampling_params)
        params = parse_decode_params(sampling_params.extra_args)
        seed = sampling_params.seed if sampling_params.seed is not None else 0
        logprobs = sampling_params.logprobs
        self.states.add_request(
            req_idx,
            params,
            float(sampling_params.temperature),
            seed,
            -1 if logprobs is None else int(logprobs),
        )

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()
        self.logprob_token_ids_state.apply_staged_writes()

    def _publish(self, slots: torch.Tensor) -> None:
        self.req_states.draft_tokens[slots, :BLOCK_SIZE] = self.states.canvas[slots].to(
            self.req_states.draft_tokens.dtype
        )

    def _logprobs(self, commit: np.ndarray, commit_slots: torch.Tensor, num_reqs: int):
        """The committed blocks' logprobs: 16 rows per committing request, none for others
        (``cu_num_generated_tokens`` tells vLLM which rows are whose)."""
        k = int(self.states.num_logprobs[commit_slots.cpu()].max())
        if k < 0:
            return None
        per_req = np.zeros(num_reqs, dtype=np.int64)
        per_req[commit] = BLOCK_SIZE
        s = self.states
        # Advanced indexing copies: the next block's records cannot reach these rows.
        return LogprobsTensors(
            logprob_token_ids=s.lp_ids[commit_slots, :, : k + 1].flatten(0, 1),
            logprobs=s.lp_vals[commit_slots, :, : k + 1].flatten(0, 1),
            selected_token_ranks=s.lp_rank[commit_slots].flatten(),
            cu_num_generated_tokens=[0, *np.cumsum(per_req).tolist()],
        )

    def __call__(self, logits: torch.Tensor, input_batch, draft_logits=None) -> SamplerOutput:
        states = self.states
        num_reqs = input_batch.num_reqs
        device = logits.device
        slots_np = input_batch.idx_mapping_np[:num_reqs]
        phase = states.phase.numpy()[slots_np]
        nlogits = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
        sampled = torch.zeros(num_reqs, BLOCK_SIZE, dtype=torch.int32, device=device)
        num_sampled = torch.zeros(num_reqs, dtype=torch.int32, device=device)
        num_rejected = torch.zeros(num_reqs, dtype=torch.int32, device=device)

        prefill = np.nonzero(phase == PREFILL)[0]
        done = (
            input_batch.num_computed_prefill_tokens_np[prefill]
            + input_batch.num_scheduled_tokens[prefill]
            >= input_batch.prefill_len_np[prefill]
        )
        started = torch.from_numpy(slots_np[prefill[done]]).to(device)
        if len(started):
            states.start_block(started)
            self._publish(started)

        row_start = input_batch.cu_num_logits_np[:num_reqs]
        den = np.nonzero((phase == DENOISE) & (nlogits == BLOCK_SIZE))[0]
        if len(den):
            rows = torch.from_numpy(row_start[den][:, None] + np.arange(BLOCK_SIZE)).to(device)
            tok = torch.from_numpy(
                input_batch.query_start_loc_np[den][:, None] + np.arange(BLOCK_SIZE)
            ).to(device)
            den_slots = torch.from_numpy(slots_np[den]).to(device)
            states.denoise(den_slots, logits[rows], input_batch.positions[tok])
            self._publish(den_slots)
            num_rejected[torch.from_numpy(den).to(device)] = BLOCK_SIZE

        commit = np.nonzero(phase == COMMIT)[0]
        if self.stash is not None:
            self.stash.emitting = {input_batch.req_ids[i] for i in commit}
        logprobs = None
        if len(commit):
            commit_slots = torch.from_numpy(slots_np[commit]).to(device)
            idx = torch.from_numpy(commit).to(device)
            logprobs = self._logprobs(commit, commit_slots, num_reqs)
            sampled[idx] = states.commit(commit_slots).to(torch.int32)
            num_sampled[idx] = BLOCK_SIZE
            self._publish(commit_slots)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=logprobs,
            num_nans=None,
            num_sampled=num_sampled,
            num_rejected=num_rejected,
        )
