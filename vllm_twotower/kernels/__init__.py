"""The plugin's kernels, reached only through this module: compiled (csrc/) -> Triton -> reference.

Two kernels, each with a pure-PyTorch twin that has the same signature and is its oracle:

* :func:`block_attention`: the denoiser's attention for whole canvases: 16 queries of one
  request attend, non-causally, over that request's committed context K/V read in place from
  vLLM's paged cache plus the canvas's own 16 K/V (never written to the cache).
* :func:`confidence_unmask`: one confidence-unmasking step of the reference commit rule from
  the denoiser logits, without materialising a softmax.

Which implementation runs (``impl=None``): tensors on a CUDA device take the compiled op when
the extension is built and loaded and the dtype is fp16/bf16, else Triton; tensors on the CPU
take the reference, because Triton runs there only under its interpreter, which is for tests
(``impl="triton"`` forces it).
``impl`` may be ``"cuda"``, ``"triton"`` or ``"reference"`` to pin one (tests, benchmarks).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

__all__ = ["block_attention", "confidence_unmask", "available_impls", "IMPLS"]

IMPLS = ("cuda", "triton", "reference")

# (module, function) per kernel and implementation; imported on first use so that importing
# this package never needs Triton or a compiled extension.
_TABLE = {
    "block_attention": {
        "cuda": ("vllm_twotower.kernels.compiled", "block_attention_cuda"),
        "triton": ("vllm_twotower.kernels.block_attention_triton", "block_attention_triton"),
        "reference": ("vllm_twotower.kernels.block_attention_ref", "block_attention_reference"),
    },
    "confidence_unmask": {
        "triton": ("vllm_twotower.kernels.unmask_triton", "confidence_unmask_triton"),
        "reference": ("vllm_twotower.reference.unmask", "unmask_step"),
    },
}


def _load(kernel: str, impl: str):
    entry = _TABLE[kernel].get(impl)
    if entry is None:
        raise ValueError(f"{kernel} has no {impl!r} implementation; it has {list(_TABLE[kernel])}")
    module, name = entry
    return getattr(importlib.import_module(module), name)


def _cuda_op_loaded() -> bool:
    try:
        from . import compiled
    except ImportError:
        return False
    return compiled.is_available()


def available_impls(kernel: str) -> list[str]:
    """The implementations of ``kernel`` that can run on this machine (for tests/benchmarks)."""
    out = []
    for impl in _TABLE[kernel]:
        if impl == "cuda" and not (torch.cuda.is_available() and _cuda_op_loaded()):
            continue
        if impl == "triton" and importlib.util.find_spec("triton") is None:
            continue
        out.append(impl)
    return out


# The compiled op is built for half precision only (csrc/README.md); fp32 models use Triton.
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _pick(kernel: str, tensor: torch.Tensor, impl: str | None) -> str:
    if impl is not None:
        return impl
    if tensor.device.type != "cuda":
        return "reference"
    if "cuda" in _TABLE[kernel] and tensor.dtype in _CUDA_DTYPES and _cuda_op_loaded():
        return "cuda"
    return "triton"


def block_attention(query: torch.Tensor, *args: Any, impl: str | None = None, **kw: Any):
    """See :func:`vllm_twotower.kernels.block_attention_ref.block_attention_reference`."""
    return _load("block_attention", _pick("block_attention", query, impl))(query, *args, **kw)


def confidence_unmask(logits: torch.Tensor, *args: Any, impl: str | None = None, **kw: Any):
    """See :func:`vllm_twotower.reference.unmask.unmask_step` (same arguments and result)."""
    return _load("confidence_unmask", _pick("confidence_unmask", logits, impl))(logits, *args, **kw)
