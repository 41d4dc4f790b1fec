"""Test tiers as markers (pyproject.toml): skip a tier, loudly, where this machine lacks it.

`engine` and `slow` need vLLM; `gpu` needs CUDA. Skips are listed by `-rs`. Deselect the
engine-starting tier with `-m "not slow"`.
"""

import importlib.util

import pytest


def _cuda_available() -> bool:
    import torch  # only imported when a gpu test was collected

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_vllm = importlib.util.find_spec("vllm") is not None
    has_cuda = None  # decided on the first gpu test
    for item in items:
        if not has_vllm and ("engine" in item.keywords or "slow" in item.keywords):
            item.add_marker(pytest.mark.skip(reason="needs vLLM (bash scripts/setup.sh)"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                has_cuda = _cuda_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
