"""Decode defaults and the per-request knobs, parsed and validated in one place.

Users set knobs per request through ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP):

* ``twotower_confidence_threshold``: γ in (0, 1]; a masked position commits when its
  confidence is strictly above γ. Default 0.8, the published operating point.
* ``diffusion_max_steps`` (vLLM's own key): denoising steps per block, 1-16; the last one
  force-commits whatever is still masked. Default 16.
* ``diffusion_canvas_length`` (vLLM's own key): only 16, the trained block, is accepted; the
  paper shows quality collapsing for larger blocks, and smaller ones are untested.

Invalid values raise ``ValueError`` naming the key, which vLLM turns into an HTTP 400.
This module imports nothing from vLLM, so it is unit-testable anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .reference.decode import BLOCK_SIZE, CONFIDENCE_THRESHOLD, MASK_TOKEN_ID, STEPS_PER_BLOCK

__all__ = [
    "BLOCK_SIZE",
    "CONFIDENCE_THRESHOLD",
    "MASK_TOKEN_ID",
    "STEPS_PER_BLOCK",
    "THRESHOLD_KEY",
    "STEPS_KEY",
    "CANVAS_KEY",
    "DecodeParams",
    "parse_decode_params",
    "MAX_SAMPLE_LOGPROBS",
    "max_sample_logprobs",
]

# Top-k sample logprobs are kept per canvas position until the block commits; this bounds
# that buffer (vLLM's own default --max-logprobs is 20).
MAX_SAMPLE_LOGPROBS = 64


def max_sample_logprobs(max_logprobs: int) -> int:
    """The top-k logprobs a request may ask for, given vLLM's ``--max-logprobs`` (-1: all)."""
    if max_logprobs < 0:
        return MAX_SAMPLE_LOGPROBS
    return min(max_logprobs, MAX_SAMPLE_LOGPROBS)


THRESHOLD_KEY = "twotower_confidence_threshold"
STEPS_KEY = "diffusion_max_steps"
CANVAS_KEY = "diffusion_canvas_length"
_KNOWN_KEYS = {THRESHOLD_KEY, STEPS_KEY, CANVAS_KEY}


@dataclass(frozen=True)
class DecodeParams:
    """One request's diffusion knobs after validation."""

    confidence_threshold: float = CONFIDENCE_THRESHOLD
    steps_per_block: int = STEPS_PER_BLOCK


def _number(key: str, value: Any) -> float:
    # bool is an int subclass: `True` as a threshold is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return float(value)


def _integer(key: str, value: Any) -> int:
    number = _number(key, value)
    if number != int(number):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(number)


def parse_decode_params(extra_args: Mapping[str, Any] | None) -> DecodeParams:
    """Validate the diffusion knobs of one request; unknown ``twotower_*`` keys are errors.

    Other keys are left alone: ``extra_args`` is shared with vLLM and other plugins.
    """
    extra = dict(extra_args or {})
    unknown = sorted(k for k in extra if k.startswith("twotower_") and k not in _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown TwoTower option(s) {unknown}; known: {sorted(_KNOWN_KEYS)}")
    threshold = CONFIDENCE_THRESHOLD
    if extra.get(THRESHOLD_KEY) is not None:
        threshold = _number(THRESHOLD_KEY, extra[THRESHOLD_KEY])
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"{THRESHOLD_KEY} must be in (0, 1], got {threshold!r}")
    steps = STEPS_PER_BLOCK
    if extra.get(STEPS_KEY) is not None:
        steps = _integer(STEPS_KEY, extra[STEPS_KEY])
        if not 1 <= steps <= STEPS_PER_BLOCK:
            raise ValueError(f"{STEPS_KEY} must be in [1, {STEPS_PER_BLOCK}], got {steps}")
    if extra.get(CANVAS_KEY) is not None:
        width = _integer(CANVAS_KEY, extra[CANVAS_KEY])
        if width != BLOCK_SIZE:
            raise ValueError(f"{CANVAS_KEY} must be {BLOCK_SIZE} (the trained block), got {width}")
    return DecodeParams(threshold, steps)
