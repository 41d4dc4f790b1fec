"""The compiled (csrc/) block-attention op: built on first use where CUDA can build and run it.

Twin of :func:`vllm_twotower.kernels.block_attention_ref.block_attention_reference` (same
arguments, same result within rounding). The extension is compiled just in time with
``torch.utils.cpp_extension.load`` the first time :func:`is_available` runs, and only where all
of these hold: ``VLLM_TWOTOWER_NO_COMPILED`` is not set, torch is a CUDA build, a CUDA device
is visible, and ``nvcc`` is found (``$CUDA_HOME/bin`` or ``PATH``). The build is cached under
torch's extensions directory in a folder named after a hash of the sources, so an edited
source rebuilds. Sources come from the source tree's ``csrc/`` (editable install) or the copy
the wheel ships as ``vllm_twotower/_csrc/``.

Importing this module costs nothing beyond torch: no compiler is looked for and nothing is
built until :func:`is_available` (or :func:`block_attention_cuda`) is called.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

__all__ = ["is_available", "block_attention_cuda"]

logger = logging.getLogger(__name__)

_SOURCES = ("bindings.cpp", "block_attention.cu")
_OPT_OUT = "VLLM_TWOTOWER_NO_COMPILED"
_CANVAS = 16  # query rows per request: one diffusion block
# None until the first is_available(); then True, or the reason the op is unavailable.
_state: bool | str | None = None
_fake_registered = False


def _source_dir() -> Path | None:
    package = Path(__file__).resolve().parent.parent  # vllm_twotower/
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    return None


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _why_not() -> str | None:
    """Why this machine cannot build or run the op, or None if it may try."""
    if os.environ.get(_OPT_OUT, "") not in ("", "0"):
        return f"{_OPT_OUT} is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if _find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if _source_dir() is None:
        return "csrc sources not found (neither csrc/ nor vllm_twotower/_csrc/)"
    return None


def _build() -> None:
    """Compile (or reuse the cached build of) the extension and load it into torch.ops."""
    from torch.utils.cpp_extension import load  # imported here: it is slow and needs setuptools

    src = _source_dir()
    assert src is not None
    paths = [src / name for name in _SOURCES]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()[:16]
    load(
        name=f"vllm_twotower_csrc_{digest}",
        sources=[str(p) for p in paths],
        extra_cuda_cflags=["-O3"],
        extra_cflags=["-O3"],
        is_python_module=False,  # the library registers torch.ops.vllm_twotower itself
    )
    _register_fake()


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:  # a second _build() in one process (tests reset _state) reuses it
        return
    _fake_registered = True

    @torch.library.register_fake("vllm_twotower::block_attention")
    def _(query, key, value, key_cache, value_cache, block_table, context_lens, scale, out):
        # Mutates `out` and returns nothing: only the shapes can be checked.
        torch._check(query.dim() == 3 and query.shape[0] % _CANVAS == 0)
        torch._check(out.shape == query.shape)
        torch._check(key.shape == value.shape and key.shape[0] == query.shape[0])
        torch._check(key_cache.dim() == 4 and key_cache.shape == value_cache.shape)
        torch._check(block_table.dim() == 2 and context_lens.dim() == 1)
        return None


def is_available() -> bool:
    """Whether the compiled op can run here (building it on the first call). Never raises."""
    global _state
    if _state is None:
        reason = _why_not()
        if reason is not None:
            logger.debug("compiled block attention unavailable: %s", reason)
        else:
            try:
                _build()
            except Exception as e:  # a broken toolchain must not take the plugin down
                reason = f"building the extension failed: {type(e).__name__}: {e}"
                # A CUDA host with nvcc expected it to work: say so without debug logging.
                logger.warning("compiled block attention unavailable: %s", reason)
        _state = True if reason is None else reason
    return _state is True


def block_attention_cuda(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`vllm_twotower.kernels.block_attention_ref.block_attention_reference`.

    CUDA tensors only; fp16 or bf16; head dim 64 or 128; compute capability 8.0+.
    """
    if not is_available():
        raise RuntimeError(f"the compiled block attention op is unavailable: {_state}")
    if out is None:
        out = query.new_empty(query.shape)
    torch.ops.vllm_twotower.block_attention(
        query, key, value, key_cache, value_cache, block_table, context_lens, float(scale), out
    )
    return out
