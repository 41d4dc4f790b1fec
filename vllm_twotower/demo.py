"""The main job on an embedded default: ``python -m vllm_twotower.demo``.

Writes the seeded ``small`` checkpoint (NVIDIA's layout, RANDOM weights, ~60 MB) unless one is
given, loads it in vLLM with the plugin, runs an offline batch with diffusion decoding and
prints each completion, the tokens committed per denoiser forward and tokens/s. Needs no GPU
and no download, so a fresh clone can see the whole path work; the text is gibberish because
the weights are random. The same code serves the real model with ``--model``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Block diffusion language models generate text by",
    "Once upon a time,",
]
REAL_MODEL = "nvidia/Nemotron-Labs-TwoTower-30B-A3B-Base-BF16"


def diffusion_counters(llm) -> dict[str, float]:
    """vLLM's ``vllm:diffusion_*`` counters (needs ``disable_log_stats=False``)."""
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:diffusion_"):
            out[metric.name] = out.get(metric.name, 0.0) + float(getattr(metric, "value", 0.0))
    return out


def tokens_per_forward(before: dict, after: dict) -> float:
    """Committed tokens per denoiser forward. vLLM counts a block's commit step among its
    "denoising steps" (canvas positions = 16 x steps), so one step per 16 tokens is removed."""
    committed = after["vllm:diffusion_num_committed_tokens"] - before.get(
        "vllm:diffusion_num_committed_tokens", 0
    )
    steps = after["vllm:diffusion_num_denoising_steps"] - before.get(
        "vllm:diffusion_num_denoising_steps", 0
    )
    forwards = steps - committed / 16
    return committed / forwards if forwards > 0 else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint dir or HF id (default: write the demo one)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "twotower-demo-small"))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    args = p.parse_args(argv)

    import torch

    model = args.model
    if model is None:
        from .testing.make_checkpoint import make_checkpoint

        if not (Path(args.out) / "config.json").exists():
            make_checkpoint(args.out, "small")
        model = args.out
        print(f"Demo checkpoint: {model} (NVIDIA's layout, RANDOM weights: expect gibberish)")
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=1024, disable_log_stats=False)
    params = SamplingParams(
        temperature=0,
        max_tokens=args.max_tokens,
        extra_args={"twotower_confidence_threshold": args.threshold},
    )
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=16), use_tqdm=False)  # warm-up
    before = diffusion_counters(llm)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = diffusion_counters(llm)

    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print()
    for o in outputs:
        print(f"--- {o.prompt!r}\n{o.outputs[0].text!r}")
    print(
        f"\n{len(outputs)} requests, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} "
        f"tokens/s; {tokens_per_forward(before, after):.2f} tokens per denoiser forward "
        f"(AR decoding: 1.00) at confidence threshold {args.threshold}"
    )
    if args.model is None:
        print(
            "These weights are random, so text and speed say nothing about the real model. "
            f"On GPUs: vllm serve {REAL_MODEL} --tensor-parallel-size 2 (see README)."
        )


if __name__ == "__main__":
    main()
