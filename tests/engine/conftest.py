"""Shared vLLM engines for the engine tests (one start-up each, ~20 s on this machine).

The engines run with the plugin as a user gets it: registered through the entry point in
every vLLM process, Model Runner V2 via the CPU Triton stand-in.
"""

import os

import pytest
from engines import make_llm

from vllm_twotower.testing.make_checkpoint import make_checkpoint

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Lets tests ask the worker for the ModelState's NFE counters through collective_rpc(fn).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    overrides = {}
    if os.environ.get("TWOTOWER_TEST_PATTERN"):  # debugging aid: another layer pattern
        overrides["hybrid_override_pattern"] = os.environ["TWOTOWER_TEST_PATTERN"]
    return make_checkpoint(tmp_path_factory.mktemp("engine-tiny"), "tiny", **overrides)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    # vLLM routes in fp32; so does the reference here (fp64 is NVIDIA's, equal on this model).
    import torch

    from vllm_twotower.reference import load_reference

    return load_reference(tiny_checkpoint, router_dtype=torch.float32)


@pytest.fixture(scope="session")
def diffusion_llm(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def ar_llm(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, hf_overrides={"twotower_mode": "ar"})
    yield llm
    llm.llm_engine.engine_core.shutdown()
