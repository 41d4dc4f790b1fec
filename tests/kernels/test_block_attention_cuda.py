"""The compiled (csrc/) block attention against its reference twin, and its loader on CPU.

GPU tests build the extension once (JIT, a minute or two the first time) and compare at the
model's full shapes (Hq 32, Hkv 2, D 128, block 16). Inputs are built so that a kernel that
reads anything it should not, or skips a write, fails: unused cache slots and blocks hold NaN,
block-table entries past a context point at NaN blocks, spare table rows hold -1 with a huge
context length, and ``out`` starts as NaN.

Tolerance (named once): atol = rtol = 2e-2 for bf16 and 1e-2 for fp16. The kernel rounds the
probabilities to the input dtype before the P @ V product; the reference keeps them in fp32.
"""

import subprocess
import sys

import pytest
import torch

from vllm_twotower.kernels import compiled

TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}
CONTEXTS = (0, 1, 16, 17, 1000, 16384)
# token_major: the GPU backends' cache; cpu: vLLM's CPU backend (K stored transposed, so the
# kernel's strided fallback loads run); head_major: [blocks, Hkv, bs, D] permuted (vector loads).
LAYOUTS = ("token_major", "cpu", "head_major")


@pytest.fixture(scope="module")
def op():
    reason = compiled._why_not()
    if reason is not None:
        pytest.skip(f"compiled op cannot be built here: {reason}")
    assert compiled.is_available(), compiled._state  # a failed build is a failure, not a skip


def make_case(lens, layout, dtype, hq=32, hkv=2, d=128, bs=16, seed=0, spare=2):
    from vllm_twotower.kernels.block_attention_ref import logical_cache_view

    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    used, num_reqs = sum(need), len(lens)
    num_blocks, width = used + 3, max(1, max(need)) + 2  # 3 NaN blocks for unused entries

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    if layout == "token_major":  # physical [blocks, bs, Hkv, 2D], handed over as [B, Hkv, bs, 2D]
        key_cache, value_cache = logical_cache_view(
            randn(num_blocks, bs, hkv, 2 * d).transpose(1, 2), "token_major"
        )
    elif layout == "cpu":
        key_cache, value_cache = logical_cache_view(
            randn(num_blocks, hkv, bs, 2 * d), "cpu", isa="vec"
        )
    else:
        key_cache, value_cache = (randn(num_blocks, hkv, bs, d).permute(0, 2, 1, 3) for _ in "kv")

    order = torch.randperm(num_blocks, generator=g, device="cuda").int()
    garbage = order[used:]
    table = torch.full((num_reqs + spare, width), -1, dtype=torch.int32, device="cuda")
    start = 0
    for r, n in enumerate(lens):
        table[r, : need[r]] = order[start : start + need[r]]
        table[r, need[r] :] = garbage[r % len(garbage)]
        start += need[r]
        if n % bs:  # slots past the context in its last block
            for cache in (key_cache, value_cache):
                cache[table[r, need[r] - 1].long(), n % bs :] = float("nan")
    for cache in (key_cache, value_cache):
        cache[garbage.long()] = float("nan")
    rows = 16 * num_reqs
    return dict(
        query=randn(rows, hq, d),
        key=randn(rows, hkv, d),
        value=randn(rows, hkv, d),
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=table,
        context_lens=torch.tensor(list(lens) + [10**6] * spare, dtype=torch.int32, device="cuda"),
        scale=d**-0.5,
    )


def check(case, out=None):
    from vllm_twotower.kernels.block_attention_ref import block_attention_reference

    expected = block_attention_reference(**case)
    if out is None:
        out = torch.full_like(case["query"], float("nan"))  # a skipped write fails loudly
    got = compiled.block_attention_cuda(**case, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "rows left unwritten, or NaN leaked from the cache"
    torch.testing.assert_close(out, expected, **TOL[case["query"].dtype])


# --- GPU: full shapes ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_batch_1_matches_reference(op, context, layout, dtype):
    check(make_case([context], layout, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_33_mixed_contexts_matches_reference(op, layout, dtype):
    lens = [CONTEXTS[(7 * r) % len(CONTEXTS)] for r in range(33)]
    check(make_case(lens, layout, dtype, seed=1))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hq, hkv, d",
    [(16, 2, 64), (8, 8, 128), (40, 2, 128), (24, 2, 64)],
    ids=["group8-d64", "mha", "group20-two-head-chunks", "group12-partial-chunk"],
)
def test_other_head_shapes(op, hq, hkv, d):
    check(make_case([0, 17, 1000, 300], "token_major", torch.bfloat16, hq=hq, hkv=hkv, d=d))


@pytest.mark.gpu
def test_strided_and_misaligned_inputs(op):
    """q/k/v as column slices of one packed qkv (vLLM's case); out at a 1-element offset."""
    case = make_case([17, 1000], "token_major", torch.bfloat16, seed=2)
    q, k, v = case["query"], case["key"], case["value"]
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    sizes = [q[0].numel(), k[0].numel(), v[0].numel()]
    parts = qkv.split(sizes, dim=1)
    case.update(
        query=parts[0].view(q.shape), key=parts[1].view(k.shape), value=parts[2].view(v.shape)
    )
    buf = torch.full((q.numel() + 1,), float("nan"), dtype=q.dtype, device="cuda")
    check(case, out=buf[1:].view(q.shape))  # not 16-byte aligned: scalar stores are fine
    odd = torch.full((q.numel() + 1,), float("nan"), dtype=q.dtype, device="cuda")
    odd[1:].copy_(q.flatten())
    case["query"] = odd[1:].view(q.shape)  # misaligned query: the kernel's scalar loads
    check(case)


@pytest.mark.gpu
def test_out_is_allocated_when_none(op):
    from vllm_twotower.kernels.block_attention_ref import block_attention_reference

    case = make_case([16, 0], "token_major", torch.bfloat16)
    got = compiled.block_attention_cuda(**case)
    torch.testing.assert_close(got, block_attention_reference(**case), **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_cuda_graph_replay(op):
    """vLLM captures the denoiser in CUDA graphs: the op (workspace included) must replay."""
    from vllm_twotower.kernels.block_attention_ref import block_attention_reference

    case = make_case([1000, 16384, 0], "token_major", torch.bfloat16, seed=3)
    out = torch.full_like(case["query"], float("nan"))
    compiled.block_attention_cuda(**case, out=out)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compiled.block_attention_cuda(**case, out=out)
    out.fill_(float("nan"))
    case["query"].normal_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, block_attention_reference(**case), **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_fake_impl_and_schema(op):
    case = make_case([17], "token_major", torch.bfloat16)
    args = tuple(case.values()) + (torch.empty_like(case["query"]),)
    torch.library.opcheck(
        torch.ops.vllm_twotower.block_attention.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(d=96), "head dim 96"),
        (dict(dtype=torch.float32), "float16 or bfloat16"),
    ],
)
def test_rejects_unsupported_inputs_clearly(op, change, message):
    dtype = change.get("dtype", torch.bfloat16)
    case = make_case([17], "token_major", torch.bfloat16, d=change.get("d", 128))
    if dtype != torch.bfloat16:
        case = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in case.items()}  # fmt: skip
    with pytest.raises(RuntimeError, match=message):
        compiled.block_attention_cuda(**case)


# --- CPU: the loader stays inert ---------------------------------------------------------------


def test_import_builds_nothing():
    code = (
        "import sys\n"
        "import vllm_twotower.kernels.compiled as c\n"
        "assert c._state is None, c._state\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build")
def test_unavailable_on_cpu_torch_without_trying_to_build(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_build(*args, **kwargs):
        raise AssertionError("tried to build the extension on a CPU torch")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(compiled, "_state", None)
    assert compiled.is_available() is False
    assert "not a CUDA build" in compiled._state
    with pytest.raises(RuntimeError, match="unavailable"):
        compiled.block_attention_cuda(*[torch.empty(0)] * 7, 1.0)


def test_opt_out_env_var(monkeypatch):
    monkeypatch.setenv("VLLM_TWOTOWER_NO_COMPILED", "1")
    monkeypatch.setattr(compiled, "_state", None)
    assert compiled.is_available() is False
    assert "VLLM_TWOTOWER_NO_COMPILED" in compiled._state
