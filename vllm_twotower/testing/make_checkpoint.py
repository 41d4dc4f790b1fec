"""Write a seeded random Nemotron-Labs-TwoTower checkpoint in NVIDIA's exact layout.

    python -m vllm_twotower.testing.make_checkpoint --out DIR --preset tiny

Same ``config.json`` fields as the real checkpoint (NemotronH's, ``model_type: nemotron_h``,
``architectures: [NemotronHTwoTowerForCausalLM]``), same tensor names (spec §2), a
``generation_config.json`` and a small byte-level tokenizer, so code that loads this loads the
real checkpoint unchanged. The key set is written from the layout description below, not from
the reference model, so loading it into the reference is an independent check of both.

Presets:

* ``tiny``: every layer kind (``M``, ``E``, ``*``, ``-``), float32, ~1 MB; every dimension that
  tensor parallelism shards divides by 2; head_dim 32 (vLLM's CPU attention needs >= 32).
* ``small``: a few tens of MB (bf16) for demos.
* ``deep``: NVIDIA's real 52-layer pattern with the real head, Mamba-head, group and expert
  counts, but narrow widths: catches wiring that only breaks at full depth.

The weights are scaled so that denoiser confidences are peaky *and* varied: at thresholds
0.5-0.9 some denoising steps commit several tokens and others only one.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

REAL_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

# NVIDIA-Nemotron-3-Nano-30B-A3B's config.json, which both TwoTower towers share (spec §1.2).
REAL_CONFIG = {
    "architectures": ["NemotronHTwoTowerForCausalLM"],
    # Spec UNKNOWN #1: exact auto_map text; this is the best guess, unused by the plugin.
    "auto_map": {
        "AutoConfig": "configuration_nemotron_h.NemotronHConfig",
        "AutoModelForCausalLM": "modeling_nemotron_twotower.NemotronHTwoTowerForCausalLM",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "chunk_size": 128,
    "conv_kernel": 4,
    "eos_token_id": 2,
    "expand": 2,
    "head_dim": 128,
    "hidden_dropout": 0.0,
    "hidden_size": 2688,
    "hybrid_override_pattern": REAL_PATTERN,
    "initializer_range": 0.02,
    "intermediate_size": 1856,
    "layer_norm_epsilon": 1e-05,
    "mamba_head_dim": 64,
    "mamba_hidden_act": "silu",
    "mamba_num_heads": 64,
    "mamba_proj_bias": False,
    "max_position_embeddings": 262144,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "model_type": "nemotron_h",
    "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712,
    "n_group": 1,
    "n_groups": 8,
    "n_routed_experts": 128,
    "n_shared_experts": 1,
    "norm_eps": 1e-05,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 52,
    "num_key_value_heads": 2,
    "num_logits_to_keep": 1,
    "pad_token_id": 0,
    "partial_rotary_factor": 1.0,
    "rescale_prenorm_residual": True,
    "residual_in_fp32": False,
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "sliding_window": None,
    "ssm_state_size": 128,
    "tie_word_embeddings": False,
    "time_step_floor": 0.0001,
    "time_step_limit": [0.0, math.inf],
    "time_step_max": 0.1,
    "time_step_min": 0.001,
    "topk_group": 1,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.55.4",
    "use_bias": False,
    "use_cache": True,
    "use_conv_bias": True,
    "use_mamba_kernels": True,
    "vocab_size": 131072,
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "hybrid_override_pattern": "MEM*E-M*E",
        "vocab_size": 512,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 2,
        "ssm_state_size": 16,
        "intermediate_size": 96,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 64,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    },
    "small": {
        "hybrid_override_pattern": "MEMEM*EMEM-EM*E",
        "vocab_size": 8192,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "mamba_num_heads": 16,
        "mamba_head_dim": 32,
        "n_groups": 4,
        "ssm_state_size": 32,
        "intermediate_size": 512,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 128,
        "moe_shared_expert_intermediate_size": 256,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
    "deep": {
        "vocab_size": 512,
        "hidden_size": 64,
        "head_dim": 32,
        "mamba_head_dim": 8,
        "ssm_state_size": 16,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 32,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    },
}

# Spec UNKNOWN #2: the EOS id. config.json says 2 (`</s>`); the Nano base tokenizer's eos is
# `<|im_end|>` = 11 and Nano generation configs list both. We stop on both.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 11], "pad_token_id": 0}


def build_config(preset: str = "tiny", **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = {**REAL_CONFIG, **PRESETS[preset], **overrides}
    cfg["num_hidden_layers"] = len(cfg["hybrid_override_pattern"])
    return cfg


def checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of NVIDIA's TwoTower checkpoint for ``cfg``, name -> shape (spec §2)."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    d_inner = cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    conv_dim = d_inner + 2 * cfg["n_groups"] * cfg["ssm_state_size"]
    nh, q = cfg["mamba_num_heads"], cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    E, I, S = (  # noqa: E741 (the spec's names)
        cfg["n_routed_experts"],
        cfg["moe_intermediate_size"],
        cfg["moe_shared_expert_intermediate_size"],
    )
    per_kind = {
        "M": {
            "mixer.in_proj.weight": (d_inner + conv_dim + nh, H),
            "mixer.conv1d.weight": (conv_dim, 1, cfg["conv_kernel"]),
            "mixer.conv1d.bias": (conv_dim,),
            "mixer.dt_bias": (nh,),
            "mixer.A_log": (nh,),
            "mixer.D": (nh,),
            "mixer.norm.weight": (d_inner,),
            "mixer.out_proj.weight": (H, d_inner),
        },
        "*": {
            "mixer.q_proj.weight": (q, H),
            "mixer.k_proj.weight": (kv, H),
            "mixer.v_proj.weight": (kv, H),
            "mixer.o_proj.weight": (H, q),
        },
        "E": {
            "mixer.gate.weight": (E, H),
            "mixer.gate.e_score_correction_bias": (E,),
            **{f"mixer.experts.{e}.up_proj.weight": (I, H) for e in range(E)},
            **{f"mixer.experts.{e}.down_proj.weight": (H, I) for e in range(E)},
            **(
                {
                    "mixer.shared_experts.up_proj.weight": (S, H),
                    "mixer.shared_experts.down_proj.weight": (H, S),
                }
                if cfg["n_shared_experts"] > 0
                else {}
            ),
        },
        "-": {
            "mixer.up_proj.weight": (cfg["intermediate_size"], H),
            "mixer.down_proj.weight": (H, cfg["intermediate_size"]),
        },
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for tower in ("context_tower", "denoiser_tower"):
        shapes[f"{tower}.embeddings.weight"] = (V, H)
        for i, letter in enumerate(cfg["hybrid_override_pattern"]):
            shapes[f"{tower}.layers.{i}.norm.weight"] = (H,)
            for name, shape in per_kind[letter].items():
                shapes[f"{tower}.layers.{i}.{name}"] = shape
        shapes[f"{tower}.norm_f.weight"] = (H,)
    shapes["context_lm_head.weight"] = (V, H)
    shapes["lm_head.weight"] = (V, H)
    shapes.update(
        {
            "t_embedder.mlp.0.weight": (H, 256),
            "t_embedder.mlp.0.bias": (H,),
            "t_embedder.mlp.2.weight": (H, H),
            "t_embedder.mlp.2.bias": (H,),
            "t_block.1.weight": (3 * H, H),
            "t_block.1.bias": (3 * H,),
        }
    )
    for i in range(len(cfg["hybrid_override_pattern"])):
        shapes[f"scale_shift_tables.{i}"] = (3, H)
    return shapes


# Std of the LM heads' entries, times sqrt(H): sets how peaked the (random) next-token
# distributions are. Tuned on the tiny preset so confidences spread over (0, 1).
HEAD_LOGIT_STD = 6.0


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A deterministic random value for one checkpoint tensor, scaled to keep the towers sane."""

    def randn(std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    def uniform(lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    last = name.rsplit(".", 1)[-1]
    fan_in = shape[-1] if len(shape) > 1 else 1
    if name.endswith("embeddings.weight"):
        return randn()
    if name in ("lm_head.weight", "context_lm_head.weight"):
        return randn(HEAD_LOGIT_STD / math.sqrt(fan_in))
    if name.startswith("scale_shift_tables."):
        t = randn(0.2)
        t[2] += 1.0  # gate row: layers contribute at about full strength
        return t
    if last == "A_log":
        return torch.log(uniform(1.0, 16.0))
    if last == "dt_bias":
        dt = torch.exp(uniform(math.log(1e-3), math.log(1e-1)))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if last == "D":
        return randn(0.1, 1.0)
    if name.endswith("e_score_correction_bias"):
        return randn(0.05)
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        return randn(0.1, 1.0)  # not all ones: a norm applied at the wrong place shows
    if name.endswith("conv1d.weight"):
        return randn(0.5)
    if name.endswith("bias"):
        return randn(0.1)
    if name.startswith("t_block."):
        return randn(0.5 / math.sqrt(fan_in))
    return randn(1.0 / math.sqrt(fan_in))


def _shard(names: list[str], sizes: dict[str, int], n: int) -> list[list[str]]:
    total, shards, acc = sum(sizes.values()), [[]], 0
    for name in names:
        if acc >= (len(shards)) * total / n and len(shards) < n:
            shards.append([])
        shards[-1].append(name)
        acc += sizes[name]
    return shards


def make_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    dtype: str | None = None,
    seed: int = 0,
    shards: int = 1,
    generation_config: dict | None = None,
    **config_overrides,
) -> Path:
    """Write the checkpoint to ``out`` and return its path. Deterministic in (preset, seed, ...)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config(preset, **config_overrides)
    if dtype is not None:
        cfg["torch_dtype"] = dtype
    torch_dtype = getattr(torch, cfg["torch_dtype"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(checkpoint_shapes(cfg).items()):
        value = init_tensor(name, shape, gen)
        # The e-score bias is an fp32 buffer in NVIDIA's code; everything else is model dtype.
        keep_fp32 = name.endswith("e_score_correction_bias")
        tensors[name] = value.to(torch.float32 if keep_fp32 else torch_dtype).contiguous()

    names = sorted(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
        groups = _shard(names, sizes, shards)
        weight_map = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: tensors[k] for k in group}, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, fname))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {**GENERATION_CONFIG, **(generation_config or {})}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    from .tokenizer import build_tokenizer

    build_tokenizer(cfg["vocab_size"], out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: preset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shards", type=int, default=1, help="number of safetensors files (index if > 1)"
    )
    p.add_argument("--pattern", help="override hybrid_override_pattern (letters M, E, *, -)")
    p.add_argument(
        "--generation-temperature",
        type=float,
        help="write a temperature into generation_config.json",
    )
    args = p.parse_args(argv)
    overrides = {"hybrid_override_pattern": args.pattern} if args.pattern else {}
    gen_cfg = (
        {"temperature": args.generation_temperature, "do_sample": True}
        if args.generation_temperature is not None
        else None
    )
    path = make_checkpoint(
        args.out, args.preset, args.dtype, args.seed, args.shards, gen_cfg, **overrides
    )
    n = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {args.preset} TwoTower checkpoint to {path} ({n / 2**20:.1f} MiB of weights)")


if __name__ == "__main__":
    main()
