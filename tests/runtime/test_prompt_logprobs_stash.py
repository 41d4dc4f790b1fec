"""Prompt logprobs wait for the request's first emitted block (vLLM sends them only with
new tokens), survive preemption, and are bounded for requests that never return."""

from vllm_twotower.runtime import prompt_logprobs
from vllm_twotower.runtime.prompt_logprobs import PromptLogprobsStash

KIND = "compute_prompt_logprobs"


def test_held_until_the_request_emits():
    stash = PromptLogprobsStash()
    assert stash.exchange(KIND, {"a": "A", "b": "B"}) == {}  # prompt done, nothing emitted
    stash.emitting = {"b"}
    assert stash.exchange(KIND, {}) == {"b": "B"}
    stash.emitting = {"a", "b"}
    assert stash.exchange(KIND, {}) == {"a": "A"}  # each goes out exactly once
    assert stash.exchange(KIND, {}) == {} and len(stash) == 0


def test_kinds_are_kept_apart():
    stash = PromptLogprobsStash()
    stash.exchange(KIND, {"a": 1})
    stash.exchange("compute_prompt_token_id_logprobs", {"a": 2})
    stash.emitting = {"a"}
    assert stash.exchange(KIND, {}) == {"a": 1}
    assert stash.exchange("compute_prompt_token_id_logprobs", {}) == {"a": 2}


def test_preempted_request_keeps_its_prompt_logprobs():
    stash = PromptLogprobsStash()
    stash.exchange(KIND, {"a": "A"})
    stash.park("a")  # removed from the runner (preempted)
    stash.emitting = {"a"}
    assert stash.exchange(KIND, {}) == {}  # not in the runner: nothing goes out
    stash.unpark("a")  # resumed: vLLM does not recompute prompt logprobs
    assert stash.exchange(KIND, {}) == {"a": "A"}


def test_parked_entries_are_bounded(monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "_MAX_PARKED", 3)
    stash = PromptLogprobsStash()
    for i in range(5):
        stash.exchange(KIND, {str(i): i})
        stash.park(str(i))  # aborted requests never come back
    assert len(stash) == 3
