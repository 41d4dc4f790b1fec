"""Hold a request's prompt logprobs until its first block is emitted.

vLLM 0.32's scheduler sends prompt logprobs only together with new tokens (it asserts that
no prompt logprobs arrive in a step without output). An AR model emits its first token in
the step that finishes the prompt; a TwoTower request emits nothing until its first block
commits, some denoising steps later. So the prompt logprobs the runner computes when the
prompt finishes are parked here and released in the step that emits the request's first
block (the sampler marks who emits).

A request removed from the runner before it emitted (preemption) keeps its entry, parked,
because vLLM does not recompute prompt logprobs for a resumed request; a bounded LRU drops
entries of requests that never come back (aborted).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

_MAX_PARKED = 4096


class PromptLogprobsStash:
    def __init__(self) -> None:
        # req_id -> {kind: value}; kind is the worker method that produced it.
        self._held: dict[str, dict[str, Any]] = {}
        self._parked: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Requests whose tokens the sampler emits in the current step.
        self.emitting: set[str] = set()

    def exchange(self, kind: str, computed: dict[str, Any]) -> dict[str, Any]:
        """Hold what the runner just computed; return what may go out with this step."""
        for req_id, value in computed.items():
            self._held.setdefault(req_id, {})[kind] = value
        out = {}
        for req_id in self.emitting:
            entry = self._held.get(req_id)
            if entry is not None and kind in entry:
                out[req_id] = entry.pop(kind)
                if not entry:
                    del self._held[req_id]
        return out

    def park(self, req_id: str) -> None:
        entry = self._held.pop(req_id, None)
        if entry:
            self._parked[req_id] = entry
            while len(self._parked) > _MAX_PARKED:
                self._parked.popitem(last=False)

    def unpark(self, req_id: str) -> None:
        entry = self._parked.pop(req_id, None)
        if entry:
            self._held[req_id] = entry

    def __len__(self) -> int:
        return len(self._held) + len(self._parked)
