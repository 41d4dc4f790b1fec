"""The denoiser's attention path, seen from inside the worker of the shared engine.

With ``VLLM_TWOTOWER_BLOCK_ATTENTION=1`` (the default) the denoiser rows go through
``kernels.block_attention`` and their canvas K/V never reach vLLM's paged cache; with ``0``
(one paged-attention call over both towers) every denoising step writes them into the
canvas slots, which the commit overwrites. A probe wrapped around the model's forward
snapshots, for every step, the cache entries (K and V, every attention layer) at the slots
of the step's tokens as vLLM's runner maps them, and counts which changed:

* context tokens (prompt chunks, commits) must always be written: this shows the probe sees
  writes, on either path;
* canvas tokens must be untouched on the block-attention path and written on the other.

The same test passes in a run with the path off (it then checks the fallback), so one engine
serves both; tokens are compared with the reference either way.
"""

import os
import random

import pytest

from vllm_twotower.reference import generate_mask_diffusion

pytestmark = [pytest.mark.slow, pytest.mark.engine]

EXPECTED_PATH = "one_call" if os.environ.get("VLLM_TWOTOWER_BLOCK_ATTENTION") == "0" else "block"


def _install_probe(worker):
    """Wrap the model's forward and the ModelState's prepare_attn (instance attributes)."""
    import torch
    from vllm.forward_context import get_forward_context

    from vllm_twotower.model.two_tower import kv_cache_views

    model = worker.model_runner.model
    model_state = worker.model_runner.model_state
    pattern = model.config.hybrid_override_pattern
    attns = [model.context_tower.layers[i].mixer.attn for i, k in enumerate(pattern) if k == "*"]
    stats = {
        "path": model.attention_path,
        "den_steps": 0,
        "ctx_written": 0,
        "ctx_kept": 0,
        "canvas_written": 0,
        "canvas_kept": 0,
        "context_lens_checked": 0,
        "context_lens_wrong": 0,
    }
    forward, prepare_attn = model._two_tower_forward, model_state.prepare_attn

    def entries(attn, slots):  # [2, n, Hkv, D] copies of K and V at these slots
        key_cache, value_cache = kv_cache_views(attn)
        blocks, offsets = slots // key_cache.shape[1], slots % key_cache.shape[1]
        return torch.stack([key_cache[blocks, offsets], value_cache[blocks, offsets]]).clone()

    def probed_forward(input_ids):
        plan = model.plan
        if plan is None:
            return forward(input_ids)
        runner_slots = get_forward_context().slot_mapping
        parts = {"ctx": plan.ctx_tokens, "canvas": plan.den_tokens}
        before = {}
        for attn in attns:
            for part, tokens in parts.items():
                slots = runner_slots[attn.layer_name][tokens].long()
                before[attn.layer_name, part] = slots, entries(attn, slots)
        out = forward(input_ids)
        stats["den_steps"] += bool(plan.den_tokens.numel())
        for (name, part), (slots, old) in before.items():
            attn = next(a for a in attns if a.layer_name == name)
            same = (entries(attn, slots) == old).flatten(2).all(-1).all(0)  # per token
            stats[f"{part}_kept"] += int(same.sum())
            stats[f"{part}_written"] += int((~same).sum())
        return out

    def probed_prepare_attn(input_batch, *args, **kwargs):
        metadata = prepare_attn(input_batch, *args, **kwargs)
        plan = model.plan
        if plan.den_attn and plan.den_tokens.numel():
            # The kernel's context length is the request's seq_len minus its canvas.
            starts = plan.den_tokens.view(-1, 16)[:, 0].cpu().numpy()
            rows = input_batch.query_start_loc_np[: input_batch.num_reqs].searchsorted(starts)
            seq_lens = input_batch.seq_lens[: input_batch.num_reqs].cpu()[rows]
            for block_rows in plan.den_attn.values():
                ok = torch.equal(block_rows.context_lens.cpu().long(), seq_lens.long() - 16)
                stats["context_lens_checked"] += 1
                stats["context_lens_wrong"] += not ok
        return metadata

    model._two_tower_forward = probed_forward
    model_state.prepare_attn = probed_prepare_attn
    model._attention_probe_stats = stats


def _remove_probe(worker):
    model = worker.model_runner.model
    del model._two_tower_forward, worker.model_runner.model_state.prepare_attn
    return model.__dict__.pop("_attention_probe_stats")


def test_denoising_never_writes_the_kv_cache_on_the_block_attention_path(diffusion_llm, reference):
    from vllm import SamplingParams

    rng = random.Random(4242)
    # One prompt longer than the 128-token step budget (chunked), so steps mix prefill,
    # denoise and commit rows of different requests.
    prompts = [[rng.randrange(20, 512) for _ in range(n)] for n in (3, 29, 150)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    diffusion_llm.collective_rpc(_install_probe)
    try:
        outs = diffusion_llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
        )
    finally:
        stats = diffusion_llm.collective_rpc(_remove_probe)[0]

    assert [list(o.outputs[0].token_ids) for o in outs] == [
        r.tokens for r in generate_mask_diffusion(reference, prompts, 32, eos_token_id=[])
    ]
    assert stats["path"] == EXPECTED_PATH, stats
    assert stats["den_steps"] > 0 and stats["canvas_kept"] + stats["canvas_written"] > 0, stats
    # Every prompt chunk and commit writes its tokens' K/V: the probe sees writes.
    assert stats["ctx_written"] > 0 and stats["ctx_kept"] == 0, stats
    if EXPECTED_PATH == "block":
        assert stats["canvas_written"] == 0, stats
        assert stats["context_lens_checked"] > 0 and stats["context_lens_wrong"] == 0, stats
    else:
        assert stats["canvas_written"] > stats["canvas_kept"], stats
