"""The architecture numbers the reference needs, read from a checkpoint's ``config.json``.

The checkpoint keeps NemotronH's plain ``config.json`` (``model_type: nemotron_h``); there are
no TwoTower-specific fields, both towers share one backbone config. Reading the JSON directly
(instead of through transformers' ``NemotronHConfig``) keeps the reference free of any library
whose behaviour could change under it: it is the executable specification.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Pattern letter -> layer kind, as in NemotronH's ``hybrid_override_pattern``.
LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
# transformers 5.x may write ``layers_block_type`` instead of the pattern string.
_BLOCK_TYPE_TO_LETTER = {
    "mamba": "M",
    "linear_attention": "M",
    "attention": "*",
    "full_attention": "*",
    "moe": "E",
    "mlp": "-",
}


@dataclass(frozen=True)
class TwoTowerArch:
    """Backbone hyper-parameters shared by the context and the denoiser tower."""

    pattern: str
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    chunk_size: int
    time_step_limit: tuple[float, float]
    intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    n_shared_experts: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    layer_norm_epsilon: float
    use_conv_bias: bool
    mamba_proj_bias: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_id: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    def kind(self, layer: int) -> str:
        return LAYER_KINDS[self.pattern[layer]]

    @classmethod
    def from_config_dict(cls, cfg: dict) -> TwoTowerArch:
        if "hybrid_override_pattern" in cfg:
            pattern = cfg["hybrid_override_pattern"]
        elif "layers_block_type" in cfg:
            pattern = "".join(_BLOCK_TYPE_TO_LETTER[k] for k in cfg["layers_block_type"])
        else:
            raise ValueError(
                "config.json has neither hybrid_override_pattern nor layers_block_type"
            )
        bad = set(pattern) - set(LAYER_KINDS)
        if bad:
            raise ValueError(f"unknown layer letters {sorted(bad)} in pattern {pattern!r}")
        eos = cfg.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        limit = cfg.get("time_step_limit", (0.0, math.inf))
        n_heads = cfg["num_attention_heads"]
        return cls(
            pattern=pattern,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            mamba_num_heads=cfg["mamba_num_heads"],
            mamba_head_dim=cfg["mamba_head_dim"],
            n_groups=cfg["n_groups"],
            ssm_state_size=cfg["ssm_state_size"],
            conv_kernel=cfg["conv_kernel"],
            chunk_size=cfg.get("chunk_size", 128),
            time_step_limit=(float(limit[0]), float(limit[1])),
            intermediate_size=cfg.get("intermediate_size", 0),
            n_routed_experts=cfg.get("n_routed_experts", 0),
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
            moe_intermediate_size=cfg.get("moe_intermediate_size", 0),
            moe_shared_expert_intermediate_size=cfg.get("moe_shared_expert_intermediate_size", 0),
            n_shared_experts=cfg.get("n_shared_experts", 0),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            n_group=cfg.get("n_group", 1),
            topk_group=cfg.get("topk_group", 1),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", cfg.get("norm_eps", 1e-5)),
            use_conv_bias=cfg.get("use_conv_bias", True),
            mamba_proj_bias=cfg.get("mamba_proj_bias", cfg.get("use_bias", False)),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            eos_token_id=eos,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TwoTowerArch:
        """Read ``config.json``; EOS ids are the union with ``generation_config.json``'s.

        config.json says EOS 2 while the tokenizer's EOS is ``<|im_end|>`` (11) and generation
        configs list both (spec UNKNOWN #2); vLLM stops on the union too.
        """
        path = Path(path)
        # NVIDIA's config.json may hold the non-standard literal `Infinity`
        # (time_step_limit); Python's json accepts it.
        cfg = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if gen_eos is not None:
                own = cfg.get("eos_token_id", [])
                own = own if isinstance(own, list) else [own]
                gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
                cfg = {**cfg, "eos_token_id": list(dict.fromkeys(own + gen_eos))}
        return cls.from_config_dict(cfg)
