"""Run the reference's three decoding modes on a checkpoint and print tokens, text and NFE.

    python -m vllm_twotower.reference [--checkpoint DIR] [--prompt TEXT] [--max-new-tokens N]

Without ``--checkpoint`` it writes the seeded tiny checkpoint to a temporary directory first
(random weights: the text is noise; the point is the mechanics and the NFE accounting).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from . import generate_ar, generate_mask_diffusion, generate_mock_ar, load_reference


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="TwoTower checkpoint directory (default: write tiny)")
    p.add_argument("--prompt", default="The two towers of Nemotron")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=16, help="denoising steps per block")
    args = p.parse_args(argv)

    path = args.checkpoint
    if path is None:
        from ..testing.make_checkpoint import make_checkpoint

        path = make_checkpoint(tempfile.mkdtemp(prefix="twotower-tiny-"), "tiny")
        print(f"wrote the tiny random checkpoint to {path}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = load_reference(path)
    ids = tok.encode(args.prompt)
    print(f"prompt: {args.prompt!r} -> {len(ids)} tokens; EOS ids {model.arch.eos_token_id}")
    modes = {
        "diffusion": lambda: generate_mask_diffusion(
            model,
            [ids],
            args.max_new_tokens,
            steps_per_block=args.steps,
            confidence_threshold=args.threshold,
        ),
        "mock_ar": lambda: generate_mock_ar(model, [ids], args.max_new_tokens),
        "ar": lambda: generate_ar(model, [ids], args.max_new_tokens),
    }
    for name, run in modes.items():
        start = time.perf_counter()
        (r,) = run()
        seconds = time.perf_counter() - start
        out = r.output_ids(args.max_new_tokens, model.arch.eos_token_id)
        extra = f", steps per block {r.block_steps}" if r.block_steps else ""
        print(
            f"\n[{name}] {len(out)} tokens, NFE {r.nfe} ({len(out) / max(r.nfe, 1):.2f} "
            f"tokens/NFE{extra}), {seconds:.2f} s"
        )
        print(f"  ids:  {out}")
        print(f"  text: {tok.decode(out, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
