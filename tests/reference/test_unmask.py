"""The commit rule of one denoising step, as a table of cases (spec §6.1)."""

import math

import pytest
import torch

from vllm_twotower.reference.unmask import gumbel_noise, uniform_noise, unmask_step

M = 3  # mask id
V = 8


def logits_for(probs_rows):
    """Logits whose softmax (with the mask id blocked) puts ``p`` on token ``tok`` per position.

    ``probs_rows``: per position ``(tok, p)``; the rest of the mass is spread evenly over the
    other non-mask tokens.
    """
    out = torch.empty(len(probs_rows), V)
    for i, (tok, p) in enumerate(probs_rows):
        if p == 0.5:  # exactly 0.5: two equal logits, everything else impossible
            out[i] = torch.full((V,), -1e9)
            out[i, tok] = out[i, tok + 1] = 0.0
            continue
        rest = (1 - p) / (V - 2)
        row = torch.full((V,), rest)
        row[tok] = p
        row[M] = 1e-30  # blocked anyway
        out[i] = row.log()
    return out


def step(canvas, probs, s=0, T=16, thr=0.8, temp=0.0, seed=0):
    canvas = torch.tensor([canvas])
    L = canvas.shape[1]
    r = unmask_step(
        logits_for(probs)[None],
        canvas,
        step=torch.tensor([s]),
        steps_per_block=torch.tensor([T]),
        threshold=torch.tensor([thr]),
        temperature=torch.tensor([temp]),
        seed=torch.tensor([seed]),
        positions=torch.arange(100, 100 + L)[None],
        mask_token_id=M,
    )
    return r.canvas[0].tolist(), r.commit[0].tolist(), r


CASES = [
    # (name, canvas, [(tok, p)] per position, step, T, thr, expected canvas)
    (
        "strict threshold: 0.5 is not > 0.5",
        [M, M, M],
        [(5, 0.5), (6, 0.6), (0, 0.5)],
        0,
        16,
        0.5,
        [M, 6, M],
    ),
    (
        "all above commit together",
        [M, M, M],
        [(5, 0.9), (6, 0.95), (7, 0.85)],
        0,
        16,
        0.8,
        [5, 6, 7],
    ),
    (
        "none above: the single most confident",
        [M, M, M],
        [(5, 0.3), (6, 0.6), (7, 0.45)],
        0,
        16,
        0.8,
        [M, 6, M],
    ),
    (
        "ties: lowest position wins",
        [M, M, M, M],
        [(5, 0.4), (6, 0.6), (6, 0.6), (6, 0.6)],
        0,
        16,
        0.8,
        [M, 6, M, M],
    ),
    (
        "steps < 16: at least ceil(n / (T - s)) = ceil(4/2)",
        [M, M, M, M],
        [(5, 0.3), (6, 0.6), (7, 0.45), (4, 0.2)],
        6,
        8,
        0.8,
        [M, 6, 7, M],
    ),
    (
        "last step force-commits everything",
        [M, 1, M, M],
        [(5, 0.2), (6, 0.9), (7, 0.25), (4, 0.3)],
        7,
        8,
        0.8,
        [5, 1, 7, 4],
    ),
    (
        "committed positions never change, even when confident",
        [9, M, 10],
        [(5, 0.99), (6, 0.2), (7, 0.99)],
        0,
        16,
        0.8,
        [9, 6, 10],
    ),
    ("threshold 1.0 commits one per step", [M, M], [(5, 0.999), (6, 0.999)], 0, 16, 1.0, [5, M]),
    ("mask token is never predicted", [M], [(M, 0.9)], 0, 16, 0.8, None),
]


@pytest.mark.parametrize("name,canvas,probs,s,T,thr,expected", CASES, ids=[c[0] for c in CASES])
def test_commit_rule(name, canvas, probs, s, T, thr, expected):
    new, commit, r = step(canvas, probs, s, T, thr)
    if expected is None:
        assert M not in new
    else:
        assert new == expected
    assert commit == [c == M and n != M for c, n in zip(canvas, new, strict=True)]


def test_confidence_is_the_probability_of_the_choice():
    _, _, r = step([M, M], [(5, 0.7), (6, 0.2)])
    torch.testing.assert_close(r.conf[0], torch.tensor([0.7, 0.2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.logprob[0], torch.tensor([0.7, 0.2]).log(), rtol=1e-5, atol=1e-6)


def test_temperature_sampling_reproducible_and_seeded():
    probs = [(5, 0.4)] * 16
    a = [step([M] * 16, probs, temp=1.0, seed=s)[0] for s in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2]


def test_sampled_confidence_is_unscaled():
    """Gumbel-max chooses with logits/T, but the confidence is the unscaled probability."""
    _, _, r = step([M] * 4, [(5, 0.7)] * 4, temp=3.0, seed=7)
    p = torch.tensor([0.7 if t == 5 else 0.3 / 6 for t in r.pred[0].tolist()])
    torch.testing.assert_close(r.conf[0], p, rtol=1e-5, atol=1e-6)


def test_noise_is_a_pure_function_of_seed_position_step():
    pos = torch.tensor([[10, 11, 12], [10, 11, 12]])
    u = uniform_noise(torch.tensor([5, 6]), pos, torch.tensor([0, 0]), 50)
    # The same (seed, position, step) gives the same noise in any batch and row order.
    alone = uniform_noise(torch.tensor([6]), pos[1:, 1:], torch.tensor([0]), 50)
    assert torch.equal(u[1, 1:], alone[0])
    assert not torch.equal(u[0], u[1])
    other_step = uniform_noise(torch.tensor([5]), pos[:1], torch.tensor([1]), 50)
    assert not torch.equal(other_step[0], u[0])
    assert 0 < float(u.min()) and float(u.max()) < 1


def test_noise_is_uniform_enough():
    u = uniform_noise(torch.tensor([0]), torch.arange(64)[None], torch.tensor([3]), 4096).flatten()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    g = gumbel_noise(torch.tensor([0]), torch.arange(64)[None], torch.tensor([3]), 4096).flatten()
    assert abs(g.mean().item() - 0.5772) < 0.02  # Euler–Mascheroni


def test_large_seeds_and_negative_seeds_are_accepted():
    pos = torch.arange(4)[None]
    a = uniform_noise(torch.tensor([2**62 + 5]), pos, torch.tensor([0]), 10)
    b = uniform_noise(torch.tensor([-5]), pos, torch.tensor([0]), 10)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 4, 8, 16])
def test_block_always_completes_in_T_steps(T):
    canvas = [M] * 16
    for s in range(T):
        canvas, _, _ = step(canvas, [(5 + (i % 3), 0.1) for i in range(16)], s=s, T=T, thr=0.99)
    assert M not in canvas
    assert math.ceil(16 / T) >= 1
