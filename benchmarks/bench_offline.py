"""Offline throughput: TwoTower diffusion vs the AR baseline (context tower) on one checkpoint.

    python benchmarks/bench_offline.py [--checkpoint DIR] [--preset small] [--batch 1 16]

For each mode and batch size: output tokens/s (wall clock of ``LLM.generate``), engine steps
per 16-token block (denoiser forwards + the commit), tokens per denoiser forward. Prints a
table and writes JSON to ``benchmarks/results/<date>_<device>_<commit>_offline.json``.
Without ``--checkpoint`` it writes the seeded random ``small`` checkpoint (random weights:
confidences, hence NFE, are not those of the real model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# fp32 on CPU: vLLM 0.32's AR profiling run samples uninitialised bf16 logits there, and the
# Triton interpreter's argmax rejects the NaNs (see README, known limitations).
DTYPE = "float32"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def _nfe_and_blocks(llm) -> tuple[int, int]:
    def read(worker):
        states = worker.model_runner.model_state.states
        return states.total_nfe, states.total_blocks

    nfe, blocks = llm.collective_rpc(read)[0]
    return nfe, blocks


def run(path, mode: str, batch: int, prompts, max_tokens: int, threshold: float) -> dict:
    from vllm import LLM, SamplingParams

    overrides = {"twotower_mode": mode}
    llm = LLM(
        model=str(path),
        dtype=DTYPE,
        max_model_len=1024,
        max_num_seqs=max(batch, 1),
        hf_overrides=overrides,
        max_num_batched_tokens=max(2048, 16 * batch),
    )
    params = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        ignore_eos=True,
        extra_args={"twotower_confidence_threshold": threshold} if mode == "diffusion" else None,
    )
    llm.generate([{"prompt_token_ids": p} for p in prompts[:1]], params, use_tqdm=False)  # warm
    nfe0, blocks0 = _nfe_and_blocks(llm) if mode == "diffusion" else (0, 0)
    batch_prompts = [{"prompt_token_ids": p} for p in prompts[:batch]]
    start = time.perf_counter()
    outs = llm.generate(batch_prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {
        "mode": mode,
        "batch": batch,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }
    if mode == "diffusion":
        nfe, blocks = _nfe_and_blocks(llm)
        nfe, blocks = nfe - nfe0, blocks - blocks0
        row.update(
            nfe=nfe,
            blocks=blocks,
            steps_per_block=(nfe + blocks) / max(blocks, 1),
            tokens_per_forward=16 * blocks / max(nfe, 1),
        )
    else:
        row.update(steps_per_block=16.0, tokens_per_forward=1.0)
    llm.llm_engine.engine_core.shutdown()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.8)
    args = p.parse_args()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    path = args.checkpoint
    if path is None:
        from vllm_twotower.testing.make_checkpoint import make_checkpoint

        path = make_checkpoint(tempfile.mkdtemp(prefix="tt-bench-"), args.preset)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(20, vocab) for _ in range(args.prompt_len)] for _ in range(max(args.batch))
    ]
    rows = [
        run(path, mode, b, prompts, args.max_tokens, args.threshold)
        for b in args.batch
        for mode in ("ar", "diffusion")
    ]
    for b in args.batch:
        ar = next(r for r in rows if r["batch"] == b and r["mode"] == "ar")
        for r in rows:
            if r["batch"] == b:
                r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
    print(
        f"\n{'mode':10} {'batch':>5} {'tok/s':>9} {'vs AR':>6} {'steps/block':>11} {'tok/fwd':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:10} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {r['speedup_vs_ar']:>6.2f} "
            f"{r['steps_per_block']:>11.2f} {r['tokens_per_forward']:>8.2f}"
        )
    stamp = f"{datetime.date.today()}_{_device()}_{_commit()}"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{stamp}_offline.json"
    meta = {
        "checkpoint": str(path),
        "preset": None if args.checkpoint else args.preset,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "threshold": args.threshold,
        "device": _device(),
        "commit": _commit(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
