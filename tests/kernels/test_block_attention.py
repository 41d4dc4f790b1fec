"""Block attention: the reference against brute force and SDPA, Triton against the reference.

Without CUDA the Triton kernel runs in Triton's interpreter on CPU: ``TRITON_INTERPRET=1`` must
be in the environment before the module defining the ``@triton.jit`` functions is imported, so
it is set here, above the imports, and the kernel module is imported only by a fixture. With
CUDA the same matrix runs compiled on the GPU, plus the full-size ``gpu`` tests.

Tolerances (named once): fp32 atol = rtol = 1e-4; bf16 atol = rtol = 2e-2 (the kernel rounds
probabilities to bf16 before the P @ V dot, the reference does not).
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402

from vllm_twotower.kernels import block_attention  # noqa: E402
from vllm_twotower.kernels.block_attention_ref import (  # noqa: E402
    block_attention_reference,
    logical_cache_view,
)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def kernel():
    module = pytest.importorskip("vllm_twotower.kernels.block_attention_triton")
    interpreted = type(module._block_attention_splits).__name__ == "InterpretedFunction"
    if DEVICE == "cpu" and not interpreted:
        pytest.fail("block_attention_triton was imported before TRITON_INTERPRET=1 was set")
    return module


@pytest.fixture
def split_tokens(kernel, monkeypatch):
    """Force context splits of at most n tokens (so several splits and the merge run)."""
    return lambda n: monkeypatch.setattr(kernel, "SPLIT_TOKENS", n)


def make_case(
    lens, hq=4, hkv=2, d=32, bs=16, dtype=torch.float32, layout="token_major", seed=0, spare=2
):
    """Random inputs with every unread cache slot and table entry pointing at NaN.

    Queries are scaled up 3x so that softmax is peaked and outputs are O(1) even over
    thousands of keys: with flat weights the output would shrink towards 0 and a kernel that
    dropped part of the context could still pass the bf16 tolerance.

    The cache is allocated in the physical layout vLLM uses and viewed through
    ``logical_cache_view``. Blocks are handed out in random order; table entries past each
    context point at NaN blocks; ``spare`` extra table rows hold -1 (vLLM sizes tables for
    max_num_seqs, the kernels must read only ``num_reqs`` rows).
    """
    g = torch.Generator().manual_seed(seed)
    num_reqs, width = len(lens), max(1, max(-(-n // bs) for n in lens)) + 2
    used = sum(-(-n // bs) for n in lens)
    num_blocks = used + 3  # three NaN blocks for the unused table entries
    shape = (
        (num_blocks, bs, hkv, 2 * d) if layout == "token_major" else (num_blocks, hkv, bs, 2 * d)
    )
    kv = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    kv = kv.transpose(1, 2) if layout == "token_major" else kv  # [blocks, Hkv, bs, 2D] view
    key_cache, value_cache = logical_cache_view(kv, layout, isa="vec")

    table = torch.full((num_reqs + spare, width), -1, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=g)
    garbage = order[used:]
    next_block = 0
    for r, n in enumerate(lens):
        need = -(-n // bs)
        table[r, :need] = order[next_block : next_block + need].int()
        table[r, need:] = garbage[torch.randint(len(garbage), (width - need,), generator=g)].int()
        next_block += need
        blocks, slots = table[r, torch.arange(n) // bs].long(), torch.arange(n) % bs
        for cache in (key_cache, value_cache):
            cache[blocks, slots] = torch.randn(n, hkv, d, generator=g).to(DEVICE, dtype)
    context_lens = torch.tensor(list(lens) + [10**6] * spare, dtype=torch.int32)
    rows = 16 * num_reqs
    case = dict(
        query=(3 * torch.randn(rows, hq, d, generator=g)).to(dtype),
        key=torch.randn(rows, hkv, d, generator=g).to(dtype),
        value=torch.randn(rows, hkv, d, generator=g).to(dtype),
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=table,
        context_lens=context_lens,
        scale=d**-0.5,
    )
    # .to() would make the strided cache views contiguous; they already live on DEVICE
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in case.items()}


def check_triton_matches_reference(kernel, case):
    expected = block_attention_reference(**case)
    out = torch.full_like(case["query"], float("nan"))  # a skipped write fails loudly
    got = kernel.block_attention_triton(**case, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "output rows left unwritten or NaN leaked from the cache"
    torch.testing.assert_close(out, expected, **TOL[case["query"].dtype])


# --- the reference against independent oracles ------------------------------------------------


def brute_force(case):
    """Per request, query and head: explicit softmax over keys gathered one slot at a time."""
    q, k, v = (case[n].double().cpu() for n in ("query", "key", "value"))
    kc, vc = case["key_cache"].double().cpu(), case["value_cache"].double().cpu()
    table, bs = case["block_table"].cpu(), kc.shape[1]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for r in range(q.shape[0] // 16):
        n = int(case["context_lens"][r])
        keys = [(kc[table[r, j // bs], j % bs], vc[table[r, j // bs], j % bs]) for j in range(n)]
        keys += [(k[16 * r + i], v[16 * r + i]) for i in range(16)]
        for i in range(16 * r, 16 * r + 16):
            for h in range(q.shape[1]):
                s = [float(q[i, h] @ kk[h // group]) * case["scale"] for kk, _ in keys]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                out[i, h] = sum(
                    wj * vv[h // group] for wj, (_, vv) in zip(w, keys, strict=True)
                ) / sum(w)
    return out


@pytest.mark.parametrize("lens, bs, layout", [([0, 19], 8, "token_major"), ([7, 0, 33], 16, "cpu")])
def test_reference_matches_brute_force(lens, bs, layout):
    case = make_case(lens, hq=4, hkv=2, d=16, bs=bs, layout=layout, seed=1)
    got = block_attention_reference(**case)
    torch.testing.assert_close(got.double().cpu(), brute_force(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (8, 1), (3, 3)])
def test_reference_matches_sdpa(hq, hkv):
    lens, bs = [0, 5, 32, 45], 16
    case = make_case(lens, hq=hq, hkv=hkv, d=32, bs=bs, seed=2)
    got = block_attention_reference(**case)
    table = case["block_table"]
    for r, n in enumerate(lens):
        rows = slice(16 * r, 16 * r + 16)
        slots = [(int(table[r, j // bs]), j % bs) for j in range(n)]  # one slot at a time
        k = torch.cat([case["key_cache"][b, s][None] for b, s in slots] + [case["key"][rows]])
        v = torch.cat([case["value_cache"][b, s][None] for b, s in slots] + [case["value"][rows]])
        want = torch.nn.functional.scaled_dot_product_attention(
            case["query"][rows].transpose(0, 1),
            k.reshape(-1, hkv, 32).transpose(0, 1),
            v.reshape(-1, hkv, 32).transpose(0, 1),
            scale=case["scale"],
            enable_gqa=True,
        ).transpose(0, 1)
        torch.testing.assert_close(got[rows], want, **TOL[torch.float32])


def test_reference_writes_into_out():
    case = make_case([3, 20], seed=3)
    out = torch.full_like(case["query"], float("nan"))
    assert block_attention_reference(**case, out=out) is out
    torch.testing.assert_close(out, block_attention_reference(**case))


# --- logical cache views -----------------------------------------------------------------------


def test_token_major_view_splits_k_then_v_per_token():
    phys = torch.randn(5, 16, 2, 64)  # [blocks, bs, Hkv, 2D] in memory (vLLM's LBNHC)
    k, v = logical_cache_view(phys.transpose(1, 2), "token_major")
    assert k.shape == v.shape == (5, 16, 2, 32)
    assert torch.equal(k, phys[..., :32]) and torch.equal(v, phys[..., 32:])
    stacked = torch.randn(2, 5, 16, 2, 32)
    k, v = logical_cache_view(stacked, "token_major")
    assert torch.equal(k, stacked[0]) and torch.equal(v, stacked[1])


def test_cpu_view_reads_vllm_cpu_block_interior():
    """Per (block, head): K plane [D, bs] (K transposed), then V plane [bs, D] (vec ISA)."""
    blocks, heads, bs, d = 3, 2, 32, 16
    kv = torch.arange(blocks * heads * bs * 2 * d, dtype=torch.float32).view(blocks, heads, bs, -1)
    k, v = logical_cache_view(kv, "cpu", isa="vec")
    assert k.shape == v.shape == (blocks, bs, heads, d)
    b, t, h, i = torch.meshgrid(*(torch.arange(n) for n in k.shape), indexing="ij")
    plane = (b * heads + h) * 2 * bs * d
    assert torch.equal(k, (plane + i * bs + t).float())
    assert torch.equal(v, (plane + bs * d + t * d + i).float())


def test_cpu_view_refuses_packed_layouts():
    kv = torch.zeros(2, 2, 32, 64, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="amx"):
        logical_cache_view(kv, "cpu", isa="amx")
    with pytest.raises(ValueError, match="layout"):
        logical_cache_view(kv, "head_major")


# --- Triton against the reference --------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 48, 37], ids=["empty", "one", "block-multiple", "ragged"])
def test_triton_context_lengths(kernel, n):
    check_triton_matches_reference(kernel, make_case([n], seed=n))


@pytest.mark.parametrize(
    "layout, bs, dtype",
    [
        ("token_major", 16, torch.float32),
        ("token_major", 16, torch.bfloat16),
        ("cpu", 128, torch.float32),
        ("cpu", 32, torch.bfloat16),
    ],
    ids=["token_major-16-fp32", "token_major-16-bf16", "cpu-128-fp32", "cpu-32-bf16"],
)
def test_triton_batch_33_mixed(kernel, layout, bs, dtype):
    g = torch.Generator().manual_seed(bs)
    lens = [0, 1, bs, 2 * bs, 3 * bs - 1] + torch.randint(0, 200, (28,), generator=g).tolist()
    check_triton_matches_reference(kernel, make_case(lens, bs=bs, dtype=dtype, layout=layout))


@pytest.mark.parametrize(
    "hq, hkv", [(2, 2), (4, 2), (32, 2), (6, 2)], ids=["g1", "g2", "g16", "g3"]
)
def test_triton_gqa_groups(kernel, hq, hkv):
    check_triton_matches_reference(kernel, make_case([5, 40], hq=hq, hkv=hkv, seed=hq))


@pytest.mark.parametrize(
    "dtype, layout",
    [(torch.float32, "token_major"), (torch.bfloat16, "cpu")],
    ids=["fp32-token_major", "bf16-cpu"],
)
def test_triton_long_context_splits_and_merge(kernel, split_tokens, dtype, layout):
    split_tokens(128)  # 10 splits: 1100 tokens use 9 of them, 300 use 5, 0 only the canvas's
    case = make_case([1100, 0, 300], dtype=dtype, layout=layout, bs=32, seed=4)
    check_triton_matches_reference(kernel, case)


def test_triton_allocates_out_when_not_given(kernel):
    case = make_case([9], seed=5)
    assert block_attention(**case, impl="triton").isfinite().all()  # the dispatch finds both
    assert block_attention(**case, impl="reference").isfinite().all()
    torch.testing.assert_close(
        kernel.block_attention_triton(**case),
        block_attention_reference(**case),
        **TOL[torch.float32],
    )


def test_triton_rejects_unsupported_head_dim(kernel):
    with pytest.raises(ValueError, match="power of two"):
        kernel.block_attention_triton(**make_case([3], d=24))


# --- full size, GPU only -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["token_major", "cpu"])
@pytest.mark.parametrize("batch", [1, 33])
def test_triton_full_size_gpu(kernel, layout, batch):
    g = torch.Generator().manual_seed(batch)
    lens = (
        [16384]
        if batch == 1
        else [0, 1, 16384] + torch.randint(0, 12000, (30,), generator=g).tolist()
    )
    bs = 16 if layout == "token_major" else 128
    case = make_case(lens, hq=32, hkv=2, d=128, bs=bs, dtype=torch.bfloat16, layout=layout)
    check_triton_matches_reference(kernel, case)


@pytest.mark.gpu
def test_triton_forced_splits_full_size_gpu(kernel, split_tokens):
    split_tokens(1024)
    case = make_case([10000, 3, 2500], hq=32, hkv=2, d=128, dtype=torch.bfloat16, seed=6)
    check_triton_matches_reference(kernel, case)
