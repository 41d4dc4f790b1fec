import pytest
import torch

from vllm_twotower.reference import load_reference
from vllm_twotower.testing.make_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    return load_reference(tiny_path)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
