"""The fused unmask kernel against its twin ``unmask_step``.

Tokens (``pred``, ``commit``, ``canvas``) must match exactly; ``conf`` and ``logprob`` within
``rtol=1e-5, atol=1e-6`` (the kernel's sum of exponentials is ordered differently from torch's;
measured differences are a few 1e-7). Every output the kernel allocates is poisoned first (NaN /
garbage), so a skipped write fails. Without CUDA the kernel runs in Triton's interpreter on small
shapes; with CUDA the same tests run compiled, plus full-size ``gpu`` tests.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the import of any @triton.jit module
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from vllm_twotower import kernels  # noqa: E402
from vllm_twotower.kernels import unmask_triton  # noqa: E402
from vllm_twotower.kernels.unmask_triton import confidence_unmask_triton  # noqa: E402
from vllm_twotower.reference.unmask import unmask_step  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
L = 16
M = 3  # mask token id
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the kernel allocates starts as NaN (floats) or garbage (ints, bools)."""
    calls = []

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        calls.append(dtype)
        if dtype.is_floating_point:
            return t.fill_(float("nan"))
        return t.fill_(True) if dtype == torch.bool else t.fill_(-12345)

    monkeypatch.setattr(unmask_triton, "_empty", empty)
    return calls


def make_args(B, *, temps=0.0, steps=0, T=16, thr=0.9, canvas=None, seed0=11):
    """Per-request knobs as [B] tensors; scalars broadcast, lists cycle over the batch."""

    def per_req(v, dtype):
        v = v if isinstance(v, (list, tuple)) else [v]
        return torch.tensor([v[i % len(v)] for i in range(B)], dtype=dtype, device=DEV)

    if canvas is None:
        canvas = torch.full((B, L), M, device=DEV)
    return dict(
        canvas=canvas.to(DEV),
        step=per_req(steps, torch.int64),
        steps_per_block=per_req(T, torch.int64),
        threshold=per_req(thr, torch.float32),
        temperature=per_req(temps, torch.float32),
        seed=seed0 + 7919 * torch.arange(B, device=DEV) - 3 * 2**40,  # negative and > 32 bits
        positions=1000 + torch.arange(B * L, device=DEV).view(B, L) * 3,
        mask_token_id=M,
    )


def random_logits(B, V, dtype=torch.float32, gen_seed=0, scale=None):
    g = torch.Generator().manual_seed(gen_seed)
    # Per-request scales from flat (conf ~ 1/V) to peaked (conf ~ 1): thresholds matter.
    scale = torch.linspace(0.5, 12.0, B)[:, None, None] if scale is None else scale
    return (torch.randn(B, L, V, generator=g) * scale).to(dtype).to(DEV)


def check(logits, args):
    got = confidence_unmask_triton(logits, **args)
    want = unmask_step(logits, **args)
    for field in ("pred", "commit", "canvas"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype and torch.equal(g, w), f"{field}:\n{g}\n!=\n{w}"
    torch.testing.assert_close(got.conf, want.conf, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.logprob, want.logprob, rtol=RTOL, atol=ATOL)
    return got, want


@pytest.mark.parametrize("V", [256, 1000, 32768])
@pytest.mark.parametrize("temp", [0.0, 0.8], ids=["greedy", "sampled"])
def test_random_rows_match_reference(V, temp, poisoned_outputs):
    check(random_logits(1, V), make_args(1, temps=temp))
    assert len(poisoned_outputs) == 5  # pred, conf, logprob, canvas, commit: all poisoned


def test_batch_33_mixed_requests():
    """One batch mixing everything: greedy and sampled rows (T up to 5), steps 0 / middle /
    last, T = 1, thresholds 0.5 / 0.9 / 1.0, fully masked, partly and fully committed."""
    B, V = 33, 256
    g = torch.Generator().manual_seed(5)
    kind = torch.arange(B) % 3  # 0: fully masked, 1: partly committed, 2: fully committed
    partly = torch.where(torch.rand(B, L, generator=g) < 0.5, M, 7)
    full = torch.randint(4, V, (B, L), generator=g)
    canvas = torch.where((kind == 0)[:, None], M, torch.where((kind == 1)[:, None], partly, full))
    args = make_args(
        B,
        temps=[0.0, 0.5, 0.0, 1.0, 0.0, 5.0, 0.0],
        steps=[0, 7, 15, 0, 3],
        T=[16, 16, 16, 1, 8],
        thr=[0.5, 0.9, 1.0],
        canvas=canvas,
    )
    got, _ = check(random_logits(B, V, gen_seed=1), args)
    assert not got.commit[kind == 2].any()
    assert int(got.commit.sum()) > B  # some requests commit several positions


@pytest.mark.parametrize("temp", [0.0, 1.5], ids=["greedy", "sampled"])
def test_many_tiles_with_a_partial_last_tile(monkeypatch, temp):
    """128-wide tiles over V = 1000: eight tiles, the last one 104 wide; the maximum sits in a
    late tile and duplicates of it in later ones (the earliest must win)."""
    monkeypatch.setattr(unmask_triton, "_MAX_BLOCK_V", 128)
    logits = random_logits(1, 1000, gen_seed=2, scale=4.0)
    logits[0, ::2, 700] = logits[0, ::2, 999] = logits[0, ::2, 900] = 20.0
    check(logits, make_args(1, temps=temp))


def test_equal_logits_take_the_lowest_id(monkeypatch):
    monkeypatch.setattr(unmask_triton, "_MAX_BLOCK_V", 128)
    V = 300
    logits = torch.zeros(1, L, V, device=DEV)  # row 0: all equal -> id 0 (mask id is 3)
    logits[0, 1, [3, 290, 150]] = 2.0  # mask id blocked; 150 (2nd tile) beats 290 (3rd)
    logits[0, 2, [5, 6, 299]] = 2.0
    # Row 3: distinct logits that round to the same log-prob (1.0 and the float below it,
    # under a near-uniform row): the reference's argmax over log-probs takes the lower id.
    logits[0, 3, 200] = 1.0
    logits[0, 3, 10] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    got, want = check(logits, make_args(1))
    assert got.pred[0, :4].tolist() == [0, 150, 5, 10]


def test_equal_confidences_commit_the_lowest_positions():
    """Sixteen identical rows: equal confidences, so the lowest masked positions go first."""
    logits = random_logits(1, 256, gen_seed=3)[:, :1].expand(1, L, 256).contiguous()
    canvas = torch.full((1, L), M)
    canvas[0, [0, 2]] = 9
    # n = 14, step 0 of T = 4: k = ceil(14 / 4) = 4 (threshold 1.0: nothing is above).
    got, _ = check(logits, make_args(1, T=4, thr=1.0, canvas=canvas))
    assert got.commit[0].nonzero().flatten().tolist() == [1, 3, 4, 5]


def test_threshold_is_strict():
    """Two positions whose confidence equals the threshold exactly are not above it."""
    logits = random_logits(1, 256, gen_seed=11, scale=0.1)
    logits[0, :2] = -1e9
    logits[0, :2, 40] = logits[0, :2, 41] = 0.0  # conf = 1/2 at positions 0 and 1
    args = make_args(1, thr=0.5)
    args["threshold"] = unmask_step(logits, **args).conf[:, 0].clone()
    got, _ = check(logits, args)
    assert got.commit[0].nonzero().flatten().tolist() == [0]  # k = max(0 above, 1, 16/16)


@pytest.mark.parametrize("steps,T", [(15, 16), (0, 1), (20, 16)], ids=["last", "T=1", "past"])
def test_last_step_commits_every_masked_position(steps, T):
    canvas = torch.full((2, L), M)
    canvas[1, ::2] = 5
    args = make_args(2, steps=steps, T=T, thr=1.0, canvas=canvas)
    got, _ = check(random_logits(2, 256, gen_seed=4), args)
    assert torch.equal(got.commit.cpu(), canvas == M) and M not in got.canvas


def test_fully_committed_canvas_is_left_alone():
    canvas = torch.randint(4, 256, (2, L))
    got, _ = check(random_logits(2, 256, gen_seed=5), make_args(2, steps=15, canvas=canvas))
    assert not got.commit.any() and torch.equal(got.canvas.cpu(), canvas)


@pytest.mark.parametrize(
    "dtype,big",
    [(torch.float32, float("inf")), (torch.float32, 1e30), (torch.bfloat16, float("inf"))],
)
def test_mask_token_is_never_chosen(dtype, big):
    logits = random_logits(2, 256, dtype=dtype, gen_seed=6)
    logits[..., M] = big
    got, _ = check(logits, make_args(2, temps=[0.0, 3.0]))
    assert (got.pred != M).all() and torch.isfinite(got.conf).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    check(random_logits(2, 1000, dtype=dtype, gen_seed=7), make_args(2, temps=[0.0, 0.7]))


def test_row_strides_and_flat_rows_give_identical_results():
    B, V = 2, 256
    base = random_logits(B, V, gen_seed=8)
    args = make_args(B, temps=[0.0, 1.0])
    want = confidence_unmask_triton(base, **args)
    padded = torch.full((B, L, V + 40), float("nan"), device=DEV)[..., 5 : 5 + V]
    padded.copy_(base)  # rows V + 40 apart, the bytes around them NaN
    transposed = base.transpose(0, 1).contiguous().transpose(0, 1)  # stride_b < stride_l
    for logits in (base.view(B * L, V), padded, transposed):
        got = confidence_unmask_triton(logits, **args)
        for field in ("pred", "commit", "canvas", "conf", "logprob"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_float64_threshold_and_dispatcher():
    args = make_args(2, temps=[0.0, 0.9], thr=0.5)
    args["threshold"] = args["threshold"].double()
    logits = random_logits(2, 256, gen_seed=9)
    got, _ = check(logits, args)
    assert "triton" in kernels.available_impls("confidence_unmask")
    via = kernels.confidence_unmask(logits, **args, impl="triton")
    assert torch.equal(via.canvas, got.canvas) and torch.equal(via.conf, got.conf)


def test_empty_batch():
    args = make_args(0)
    got = confidence_unmask_triton(torch.empty(0, L, 256, device=DEV), **args)
    assert got.canvas.shape == got.commit.shape == got.conf.shape == (0, L)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_size_on_gpu(dtype):
    """V = 131072, B = 64 (1024 rows): greedy and sampled requests, compiled kernel."""
    if isinstance(unmask_triton._row_kernel, InterpretedFunction):
        pytest.skip("another module set TRITON_INTERPRET=1 first: the kernel is interpreted")
    B, V = 64, 131072
    args = make_args(B, temps=[0.0, 0.7, 0.0, 1.0], steps=[0, 5, 15], thr=[0.5, 0.9, 1.0])
    check(random_logits(B, V, dtype=dtype, gen_seed=10), args)
