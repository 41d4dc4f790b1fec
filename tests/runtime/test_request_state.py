"""The engine's per-slot state machine, driven by the reference model, equals the reference.

Requests here are interleaved the way vLLM schedules them (each engine step mixes rows in
PREFILL, DENOISE and COMMIT), unlike the reference's lockstep loop: equal tokens and NFE show
the state machine carries each request's loop correctly across steps and slots.
"""

import pytest
import torch

from vllm_twotower.config import DecodeParams
from vllm_twotower.reference import generate_mask_diffusion, load_reference
from vllm_twotower.runtime.request_state import COMMIT, DENOISE, PREFILL, TwoTowerRequestStates
from vllm_twotower.testing.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_reference(make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny"))


def run_engine_like(model, requests, max_tokens, preempt_at=()):
    """requests: list of (prompt, DecodeParams, temperature, seed); staggered arrivals.

    ``preempt_at``: engine steps at which the first live request is preempted the way vLLM
    does it: its slot is re-added (canvas lost) and prompt + committed tokens re-prefilled.
    """
    states = TwoTowerRequestStates(max_num_reqs=8)
    slots = [7 - i for i in range(len(requests))]  # non-trivial slot numbers
    caches, outputs = {}, {s: [] for s in slots}
    arrivals = {i * 2: i for i in range(len(requests))}  # one new request every other step
    live, step = [], 0
    while live or arrivals:
        if step in arrivals:
            i = arrivals.pop(step)
            prompt, params, temp, seed = requests[i]
            s = slots[i]
            states.add_request(s, params, temp, seed)
            caches[s] = model.new_cache()
            live.append(s)
        if step in preempt_at and live:
            s = live[0]
            _, params, temp, seed = requests[slots.index(s)]
            states.add_request(s, params, temp, seed)
            caches[s] = model.new_cache()
        phases = {s: int(states.phase[s]) for s in live}
        for s in [s for s in live if phases[s] == PREFILL]:
            prefill = requests[slots.index(s)][0] + outputs[s]  # prompt + committed tokens
            model.extend_context(caches[s], torch.tensor(prefill))
            states.start_block(torch.tensor([s]))
        den = [s for s in live if phases[s] == DENOISE]
        if den:
            idx = torch.tensor(den)
            canvas = states.canvas[idx]
            t = (canvas == 3).float().mean(-1)
            logits = model.denoise(canvas, t, [caches[s] for s in den])
            pos = torch.tensor([caches[s].length for s in den])[:, None] + torch.arange(16)
            states.denoise(idx, logits, pos)
        for s in [s for s in live if phases[s] == COMMIT]:
            toks = states.commit(torch.tensor([s]))[0]
            model.extend_context(caches[s], toks)
            outputs[s] += toks.tolist()
            if len(outputs[s]) >= max_tokens or set(toks.tolist()) & {2, 11}:
                live.remove(s)
        step += 1
    return [(outputs[s], int(states.nfe[s])) for s in slots]


REQUESTS = [
    ([5, 100, 200, 300, 17], DecodeParams(0.9, 16), 0.0, 0),
    (list(range(20, 60)), DecodeParams(0.5, 8), 0.0, 0),
    ([7], DecodeParams(0.7, 16), 1.0, 123),
    ([9, 9, 9], DecodeParams(0.8, 4), 0.0, 0),
]


def _reference(model, request, max_tokens):
    prompt, params, temp, seed = request
    (ref,) = generate_mask_diffusion(
        model,
        [prompt],
        max_tokens,
        steps_per_block=params.steps_per_block,
        confidence_threshold=params.confidence_threshold,
        temperature=temp,
        seed=seed,
    )
    return ref


def test_interleaved_engine_loop_equals_reference(model):
    got = run_engine_like(model, REQUESTS, max_tokens=48)
    for request, (tokens, nfe) in zip(REQUESTS, got, strict=True):
        ref = _reference(model, request, 48)
        assert tokens == ref.tokens and nfe == ref.nfe


def test_preemption_and_recompute_keep_the_tokens(model):
    """A preempted request restarts its block from scratch after re-prefill: same tokens."""
    got = run_engine_like(model, REQUESTS, max_tokens=48, preempt_at=(3, 9, 17, 30))
    for request, (tokens, _) in zip(REQUESTS, got, strict=True):
        assert tokens == _reference(model, request, 48).tokens
