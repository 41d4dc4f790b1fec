"""Per-request diffusion state, slot-indexed and pre-allocated (no per-request Python objects).

vLLM spreads one block's denoising loop over engine steps, so each request's place in the loop
lives here between steps, indexed by the runner's request slot. A request moves through

    PREFILL --(last prompt chunk)--> DENOISE --(no mask left)--> COMMIT --(16 tokens out)--> DENOISE

* PREFILL rows run the context tower over prompt chunks and emit nothing;
* DENOISE rows run the denoiser on the canvas and apply one unmasking step (one NFE);
* COMMIT rows run the context tower over the finished canvas (extending its KV cache and Mamba
  state) and emit its 16 tokens; the next block starts all-[MASK].

The transition rules are the reference's (:func:`vllm_twotower.reference.unmask_step`, run
through :func:`vllm_twotower.kernels.confidence_unmask`), so the engine's tokens equal
:func:`vllm_twotower.reference.generate_mask_diffusion`'s.

Sample logprobs (decision, README "Logprobs"): a token's logprob is the one it had at the
denoising step that committed it: the log-softmax of that step's *unscaled* denoiser logits
with the [MASK] token excluded (exactly the ``conf`` the commit rule compares with γ, as a
log), and the top-k alternatives come from the same distribution. They are recorded per
canvas position when the position commits and emitted with the block.
"""

from __future__ import annotations

import torch

from ..config import BLOCK_SIZE, MASK_TOKEN_ID, DecodeParams
from ..kernels import confidence_unmask
from ..reference.unmask import MASK_LOGIT, UnmaskResult

PREFILL, DENOISE, COMMIT = 0, 1, 2


class TwoTowerRequestStates:
    def __init__(
        self, max_num_reqs: int, device: torch.device | str = "cpu", max_logprobs: int = 0
    ):
        r, dev = max_num_reqs, device
        self.max_num_reqs = r
        # The canvas of the current block; [MASK] where not committed yet.
        self.canvas = torch.full((r, BLOCK_SIZE), MASK_TOKEN_ID, dtype=torch.long, device=dev)
        # Denoising steps taken in the current block (the commit rule's `s`).
        self.step = torch.zeros(r, dtype=torch.long, device=dev)
        # Where the request is in the loop (PREFILL / DENOISE / COMMIT). Host copy: the row
        # split between towers is decided on the host before each forward.
        self.phase = torch.zeros(r, dtype=torch.int8)
        # Per-request knobs (SamplingParams + extra_args, validated in config.py).
        self.threshold = torch.zeros(r, dtype=torch.float32, device=dev)
        self.steps_per_block = torch.zeros(r, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(r, dtype=torch.float32, device=dev)
        self.seed = torch.zeros(r, dtype=torch.long, device=dev)
        # Denoiser forwards so far (NFE) and blocks committed, for tokens-per-forward reports.
        self.nfe = torch.zeros(r, dtype=torch.long, device=dev)
        self.blocks = torch.zeros(r, dtype=torch.long, device=dev)
        # Engine-wide totals since start (host ints): denoiser forwards and committed blocks.
        self.total_nfe = 0
        self.total_blocks = 0
        # Top-k logprobs requested per slot (-1: none; host, read on every step).
        self.num_logprobs = torch.full((r,), -1, dtype=torch.int32)
        # Per canvas position, filled when it commits: [token, top-1..k] ids and logprobs,
        # and the token's rank (1 = most likely). Only rows of requests asking are written.
        self.max_logprobs = max_logprobs
        self.lp_ids = torch.zeros(r, BLOCK_SIZE, max_logprobs + 1, dtype=torch.long, device=dev)
        self.lp_vals = torch.zeros(r, BLOCK_SIZE, max_logprobs + 1, device=dev)
        self.lp_rank = torch.zeros(r, BLOCK_SIZE, dtype=torch.long, device=dev)

    def add_request(
        self,
        slot: int,
        params: DecodeParams,
        temperature: float = 0.0,
        seed: int = 0,
        num_logprobs: int = -1,
    ) -> None:
        if num_logprobs > self.max_logprobs:
            raise ValueError(f"{num_logprobs} logprobs requested, at most {self.max_logprobs}")
        self.num_logprobs[slot] = num_logprobs
        self.phase[slot] = PREFILL
        self.threshold[slot] = params.confidence_threshold
        self.steps_per_block[slot] = params.steps_per_block
        self.temperature[slot] = temperature
        self.seed[slot] = seed
        self.nfe[slot] = 0
        self.blocks[slot] = 0
        self.step[slot] = 0
        self.canvas[slot] = MASK_TOKEN_ID

    def start_block(self, slots: torch.Tensor) -> None:
        """A fresh all-[MASK] canvas for ``slots`` (after the prompt, or after a commit)."""
        self.canvas[slots] = MASK_TOKEN_ID
        self.step[slots] = 0
        self.phase[slots.cpu()] = DENOISE

    def denoise(
        self, slots: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor
    ) -> UnmaskResult:
        """One unmasking step for ``slots`` from their denoiser logits ``[n, 16, V]``.

        ``positions [n, 16]`` are the canvas tokens' absolute positions (sampling noise is a
        function of them). A canvas with no mask left moves to COMMIT.
        """
        res = confidence_unmask(
            logits,
            self.canvas[slots],
            self.step[slots],
            self.steps_per_block[slots],
            self.threshold[slots],
            self.temperature[slots],
            self.seed[slots],
            positions,
            MASK_TOKEN_ID,
        )
        self._record_logprobs(slots, logits, res)
        self.canvas[slots] = res.canvas
        self.step[slots] += 1
        self.nfe[slots] += 1
        self.total_nfe += len(slots)
        full = ~(res.canvas == MASK_TOKEN_ID).any(-1)
        self.phase[slots[full].cpu()] = COMMIT
        return res

    def _record_logprobs(self, slots: torch.Tensor, logits: torch.Tensor, res) -> None:
        """Store the logprobs of the positions this step commits, for requests asking."""
        asked = self.num_logprobs[slots.cpu()]
        want = asked >= 0
        if not bool(want.any()):
            return
        rows = torch.nonzero(want.to(slots.device))[:, 0]
        k = int(asked[want].max())
        logp = logits[rows].float()
        logp[..., MASK_TOKEN_ID] = MASK_LOGIT  # the mask token is never a candidate
        logp = torch.log_softmax(logp, dim=-1)
        chosen = res.pred[rows]
        chosen_lp = logp.gather(-1, chosen[..., None])[..., 0]
        ids = chosen[..., None]
        vals = chosen_lp[..., None]
        if k:
            top = torch.topk(logp, k, dim=-1)
            ids = torch.cat([ids, top.indices], -1)
            vals = torch.cat([vals, top.values], -1)
        rank = (logp > chosen_lp[..., None]).sum(-1) + 1
        s, c = slots[rows], res.commit[rows]
        self.lp_ids[s, :, : k + 1] = torch.where(c[..., None], ids, self.lp_ids[s, :, : k + 1])
        self.lp_vals[s, :, : k + 1] = torch.where(c[..., None], vals, self.lp_vals[s, :, : k + 1])
        self.lp_rank[s] = torch.where(c, rank, self.lp_rank[s])

    def commit(self, slots: torch.Tensor) -> torch.Tensor:
        """The finished canvases of ``slots`` (to emit); their next block starts."""
        tokens = self.canvas[slots].clone()
        self.blocks[slots] += 1
        self.total_blocks += len(slots)
        self.start_block(slots)
        return tokens
