"""Kernel microbenchmarks: block attention and confidence unmasking at full-size shapes.

    python benchmarks/bench_kernels.py [--peak-gbps 3350] [--reps 50] [--ref-reps 3]
    python benchmarks/bench_kernels.py --cpu-smoke --out /tmp/bench   # tiny shapes, interpreter

Every implementation is called through :mod:`vllm_twotower.kernels` with ``impl=`` pinned to
each of ``available_impls(kernel)``; the reference is the baseline of every ``speedup`` column.

* Block attention: batch 1/8/32/64 x context 1k/4k/16k/32k tokens, Hq 32, Hkv 2, D 128, bf16,
  cache block size 16, cache blocks shuffled. Optional baselines, each skipped with a printed
  reason: vLLM's FlashAttention (``vllm.vllm_flash_attn.flash_attn_varlen_func`` with a block
  table, non-causal) and FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` (causal=False,
  planned outside the timed region). Both read the 16 canvas K/V from the paged cache (written
  after the context), where our kernel takes them as tensors: same bytes, same result.
* Unmask: 16 x {1, 8, 64} rows, V 131072, bf16 logits, greedy and sampled (T = 1).

Times: CUDA events around each call, L2 flushed before each, median of ``--reps``. GB/s counts
the bytes a kernel must move once: context K/V + canvas K/V + q + out for attention; the logits
for unmask (sampled rows read them twice, not counted). ``check``: the result against the
reference (attention: max |difference|; unmask: tokens equal). Writes
``<date>_<device>_<commit>_kernels.{csv,json,png}`` under ``--out`` (default ``results/``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# HBM bandwidth (GB/s) by device-name substring, first match wins.
PEAK_GBPS = (("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350))
FULL = dict(batches=(1, 8, 32, 64), contexts=(1024, 4096, 16384, 32768), hq=32, hkv=2, d=128,
            unmask_batches=(1, 8, 64), vocab=131072)  # fmt: skip
SMOKE = dict(batches=(1, 2), contexts=(32, 80), hq=4, hkv=2, d=16,
             unmask_batches=(1, 2), vocab=256)  # fmt: skip
BLOCK_SIZE = 16  # cache block size (tokens)
CANVAS = 16  # query rows per request
MASK_ID = 3
FIELDS = ("kernel", "impl", "batch", "context", "rows", "vocab", "mode", "dtype", "time_us",
          "gbps", "pct_peak", "speedup_vs_ref", "check")  # fmt: skip


def _git(*cmd: str) -> str:
    try:
        out = subprocess.check_output(["git", *cmd], cwd=Path(__file__).parent, text=True)
        return out.strip()
    except Exception:
        return "unknown"


def _device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def _timer(torch, device, reps: int, warmup: int):
    """``time(fn) -> median microseconds``: CUDA events with an L2 flush, or wall clock on CPU."""
    if device.type != "cuda":

        def wall(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6

        return wall
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > L2 of H100/H200

    def events(fn):
        for _ in range(warmup):
            fn()
        pairs = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3

    return events


def _attention_case(torch, device, R: int, ctx: int, hq: int, hkv: int, d: int, gen):
    dt = torch.bfloat16
    per_req = math.ceil((ctx + CANVAS) / BLOCK_SIZE)  # context blocks + room for the canvas
    table = torch.randperm(R * per_req, generator=gen).view(R, per_req).to(device, torch.int32)
    cache = [torch.randn(R * per_req, BLOCK_SIZE, hkv, d, generator=gen).to(device, dt)
             for _ in range(2)]  # fmt: skip
    q = torch.randn(R * CANVAS, hq, d, generator=gen).to(device, dt)
    k, v = (torch.randn(R * CANVAS, hkv, d, generator=gen).to(device, dt) for _ in range(2))
    # Baselines read the canvas from the cache: write it right after each context.
    slot = ctx + torch.arange(CANVAS, device=device)
    blocks = table[:, slot // BLOCK_SIZE].long()
    for c, kv in zip(cache, (k, v), strict=True):
        c[blocks, slot % BLOCK_SIZE] = kv.view(R, CANVAS, hkv, d)
    lens = torch.full((R,), ctx, dtype=torch.int32, device=device)
    nbytes = (2 * R * (ctx + CANVAS) * hkv + 2 * R * CANVAS * hq) * d * 2 + table.numel() * 4
    return dict(q=q, k=k, v=v, kc=cache[0], vc=cache[1], table=table, lens=lens), nbytes


def _vllm_flash_attn(torch, c, scale):
    """vLLM's paged FlashAttention, non-causal, over context + canvas in the cache."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    R = c["table"].shape[0]
    cu_q = torch.arange(R + 1, dtype=torch.int32, device=c["q"].device) * CANVAS
    seqused = c["lens"] + CANVAS
    max_k = int(seqused.max())
    out = torch.empty_like(c["q"])
    version = get_flash_attn_version()

    def run():
        flash_attn_varlen_func(
            q=c["q"], k=c["kc"], v=c["vc"], out=out, cu_seqlens_q=cu_q, max_seqlen_q=CANVAS,
            seqused_k=seqused, max_seqlen_k=max_k, softmax_scale=scale, causal=False,
            block_table=c["table"], fa_version=version,
        )  # fmt: skip
        return out

    return run


def _flashinfer(torch, c, scale):
    """FlashInfer's paged prefill, causal=False (plan once, outside the timed call)."""
    import flashinfer

    R, per_req = c["table"].shape
    dev = c["q"].device
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD"
    )
    idx = torch.arange(R + 1, dtype=torch.int32, device=dev)
    last = (c["lens"] + CANVAS - 1) % BLOCK_SIZE + 1
    wrapper.plan(
        idx * CANVAS, idx * per_req, c["table"].flatten(), last,
        c["q"].shape[1], c["kc"].shape[2], c["q"].shape[2], BLOCK_SIZE,
        causal=False, sm_scale=scale, q_data_type=c["q"].dtype, kv_data_type=c["kc"].dtype,
    )  # fmt: skip
    return lambda: wrapper.run(c["q"], (c["kc"], c["vc"]))


def _baselines(smoke: bool) -> dict:
    """The optional baselines that can run here; prints why each other one is skipped."""
    if smoke:
        print("block attention: baselines skipped (--cpu-smoke: they need CUDA)")
        return {}
    found = {}
    for name, module, make in (("vllm-flash-attn", "vllm", _vllm_flash_attn),
                               ("flashinfer", "flashinfer", _flashinfer)):  # fmt: skip
        if importlib.util.find_spec(module) is None:
            print(f"block attention: {name} skipped: {module} is not installed")
        else:
            found[name] = make
    return found


def bench_attention(torch, kernels, device, shapes, timers, peak, smoke) -> list[dict]:
    rows, gen = [], torch.Generator().manual_seed(0)
    baselines = _baselines(smoke)
    d = shapes["d"]
    scale = d**-0.5
    for R in shapes["batches"]:
        for ctx in shapes["contexts"]:
            c, nbytes = _attention_case(torch, device, R, ctx, shapes["hq"], shapes["hkv"], d, gen)
            args = (c["q"], c["k"], c["v"], c["kc"], c["vc"], c["table"], c["lens"], scale)
            ref = kernels.block_attention(*args, impl="reference").float()
            fns = {
                impl: functools.partial(kernels.block_attention, *args, impl=impl)
                for impl in kernels.available_impls("block_attention")
            }
            for name, make in list(baselines.items()):
                try:
                    fns[name] = make(torch, c, scale)
                    fns[name]()  # first call: JIT, plan caches; also fails early
                except ImportError as exc:  # no such API in this version: drop it for good
                    print(f"block attention: {name} skipped: {exc!r:.200}")
                    fns.pop(name, None)
                    del baselines[name]
                except Exception as exc:  # e.g. an unsupported shape: skip this one only
                    print(f"block attention: {name} skipped at B={R} ctx={ctx}: {exc!r:.200}")
                    fns.pop(name, None)
            base = dict(kernel="block_attention", batch=R, context=ctx, rows=R * CANVAS,
                        vocab="", mode="non-causal", dtype="bf16")  # fmt: skip
            rows += _measure(fns, timers, nbytes, peak, base, lambda o, ref=ref: _max_err(o, ref))
            del c, args, ref, fns
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _max_err(out, ref) -> str:
    return f"max|d|={(out.float() - ref).abs().max().item():.2e}"


def bench_unmask(torch, kernels, device, shapes, timers, peak) -> list[dict]:
    rows, gen, V = [], torch.Generator().manual_seed(1), shapes["vocab"]
    for B in shapes["unmask_batches"]:
        logits = (torch.randn(B, CANVAS, V, generator=gen) * 4).to(device, torch.bfloat16)
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            knobs = dict(
                canvas=torch.full((B, CANVAS), MASK_ID, device=device),
                step=torch.zeros(B, dtype=torch.int64, device=device),
                steps_per_block=torch.full((B,), 16, device=device),
                threshold=torch.full((B,), 0.9, device=device),
                temperature=torch.full((B,), temp, device=device),
                seed=torch.arange(B, device=device),
                positions=torch.arange(B * CANVAS, device=device).view(B, CANVAS),
                mask_token_id=MASK_ID,
            )
            ref = kernels.confidence_unmask(logits, **knobs, impl="reference")
            fns = {
                impl: functools.partial(kernels.confidence_unmask, logits, **knobs, impl=impl)
                for impl in kernels.available_impls("confidence_unmask")
            }

            def check(r, ref=ref):
                same = all(torch.equal(getattr(r, f), getattr(ref, f))
                           for f in ("pred", "commit", "canvas"))  # fmt: skip
                return "tokens==ref" if same else "TOKENS DIFFER"

            base = dict(kernel="confidence_unmask", batch=B, context="", rows=B * CANVAS,
                        vocab=V, mode=mode, dtype="bf16")  # fmt: skip
            rows += _measure(fns, timers, logits.numel() * 2, peak, base, check)
    return rows


def _measure(fns, timers, nbytes, peak, base, check) -> list[dict]:
    out = []
    for name, fn in fns.items():
        time_us = (timers["reference"] if name == "reference" else timers["fast"])(fn)
        gbps = nbytes / time_us / 1e3
        out.append(dict(base, impl=name, time_us=float(f"{time_us:.4g}"), gbps=float(f"{gbps:.4g}"),
                        pct_peak=round(100 * gbps / peak, 1) if peak else "",
                        check=check(fn())))  # fmt: skip
    ref = next((r["time_us"] for r in out if r["impl"] == "reference"), None)
    for r in out:
        r["speedup_vs_ref"] = round(ref / r["time_us"], 2) if ref else ""
        print(", ".join(f"{k}={r[k]}" for k in FIELDS if r[k] != ""))
    return out


def plot(rows, path: Path, peak) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    attn = [r for r in rows if r["kernel"] == "block_attention"]
    for impl in dict.fromkeys(r["impl"] for r in attn):
        for batch in dict.fromkeys(r["batch"] for r in attn):
            key = (impl, batch)
            pts = [(r["context"], r["gbps"]) for r in attn if (r["impl"], r["batch"]) == key]
            style = "-" if impl in ("triton", "cuda") else "--"
            ax1.plot(*zip(*pts, strict=True), style, marker="o", label=f"{impl} B={batch}")
    if peak:
        ax1.axhline(peak, color="k", lw=0.8, label=f"peak {peak} GB/s")
    ax1.set(xscale="log", xlabel="context tokens", ylabel="GB/s", title="block attention")
    ax1.legend(fontsize=6, ncol=2)
    unmask = [r for r in rows if r["kernel"] == "confidence_unmask"]
    for impl, mode in dict.fromkeys((r["impl"], r["mode"]) for r in unmask):
        pts = [(r["rows"], r["time_us"]) for r in unmask if (r["impl"], r["mode"]) == (impl, mode)]
        ax2.plot(*zip(*pts, strict=True), marker="o", label=f"{impl} {mode}")
    ax2.set(xscale="log", yscale="log", xlabel="rows", ylabel="us", title="confidence unmask")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, Triton interpreter")
    p.add_argument("--peak-gbps", type=float, help="memory bandwidth for pct_peak")
    p.add_argument("--reps", type=int, default=50, help="timed calls per fast kernel")
    p.add_argument("--ref-reps", type=int, default=3, help="timed calls of the reference")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.cpu_smoke:  # before any @triton.jit module is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from vllm_twotower import kernels

    if args.cpu_smoke:
        device, shapes, reps, ref_reps, warmup = torch.device("cpu"), SMOKE, 1, 1, 0
    elif torch.cuda.is_available():
        device, shapes = torch.device("cuda"), FULL
        reps, ref_reps, warmup = args.reps, args.ref_reps, 3
    else:
        sys.exit("no CUDA device: run with --cpu-smoke for the tiny interpreter shapes")
    name = _device_name(torch, device)
    peak = args.peak_gbps or next((g for k, g in PEAK_GBPS if k in name), None)
    print(f"device {name}, peak {peak or 'unknown (pass --peak-gbps)'} GB/s")
    timers = {"fast": _timer(torch, device, reps, warmup),
              "reference": _timer(torch, device, ref_reps, min(warmup, 1))}  # fmt: skip
    rows = bench_attention(torch, kernels, device, shapes, timers, peak, args.cpu_smoke)
    rows += bench_unmask(torch, kernels, device, shapes, timers, peak)

    args.out.mkdir(parents=True, exist_ok=True)
    commit = _git("rev-parse", "--short", "HEAD")
    stem = args.out / f"{datetime.date.today()}_{name.replace(' ', '-')}_{commit}_kernels"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(device=name, peak_gbps=peak, commit=_git("rev-parse", "HEAD"),
                dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, cpu_smoke=args.cpu_smoke, reps=reps, ref_reps=ref_reps,
                shapes=shapes, block_size=BLOCK_SIZE)  # fmt: skip
    Path(f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {stem}.csv and {stem}.json")
    plot(rows, Path(f"{stem}.png"), peak)


if __name__ == "__main__":
    main()
