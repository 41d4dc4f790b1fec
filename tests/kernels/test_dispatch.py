"""Which implementation kernels/ picks (no kernel runs here)."""

import pytest
import torch

from vllm_twotower import kernels


def _meta(dtype, device):
    t = torch.empty(0, dtype=dtype)
    return type("T", (), {"device": torch.device(device), "dtype": t.dtype})()


def test_cpu_takes_the_reference_and_impl_pins(monkeypatch):
    assert kernels._pick("block_attention", _meta(torch.float32, "cpu"), None) == "reference"
    assert kernels._pick("block_attention", _meta(torch.float32, "cpu"), "triton") == "triton"


@pytest.mark.parametrize(
    ("kernel", "dtype", "loaded", "want"),
    [
        ("block_attention", torch.bfloat16, True, "cuda"),
        ("block_attention", torch.float32, True, "triton"),  # the op is half precision only
        ("block_attention", torch.bfloat16, False, "triton"),  # not built: Triton
        ("confidence_unmask", torch.bfloat16, True, "triton"),  # no compiled unmask
    ],
)
def test_cuda_tensors(monkeypatch, kernel, dtype, loaded, want):
    monkeypatch.setattr(kernels, "_cuda_op_loaded", lambda: loaded)
    assert kernels._pick(kernel, _meta(dtype, "cuda"), None) == want


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="confidence_unmask has no 'cuda' implementation"):
        kernels._load("confidence_unmask", "cuda")
