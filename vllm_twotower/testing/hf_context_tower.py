"""Load a TwoTower checkpoint's *context tower* into Hugging Face's own ``NemotronHForCausalLM``.

The context tower plus ``context_lm_head`` is a stock causal NemotronH, so transformers' model
is an implementation of it that shares no code with this project. Tests use it as an
independent oracle for the reference's backbone math (Mamba-2 scan, NoPE attention, MoE
routing, relu² MLP, RMSNorms).

Needs transformers >= 5 (fused 3-D expert tensors, ``hybrid_override_pattern`` parsed into
``layers_block_type``). Imports transformers lazily so importing this module is free.

Checkpoint -> transformers names:

* ``context_tower.X`` -> ``model.X`` (``embeddings``, ``layers.{i}.norm``/``mixer.*``, ``norm_f``
  keep their names: transformers' NemotronH uses NVIDIA's module names);
* ``context_lm_head.weight`` -> ``lm_head.weight``;
* per-expert ``...mixer.experts.{e}.up_proj.weight [I, H]`` / ``down_proj.weight [H, I]`` are
  stacked on a new dim 0 into ``...mixer.experts.up_proj [E, I, H]`` / ``down_proj [E, H, I]``
  (transformers applies ``F.linear(x, up_proj[e])``, i.e. the same ``[out, in]`` orientation);
* everything else (denoiser tower, ``lm_head``, time conditioning) is dropped.

Loading is strict: a key left over or missing on either side raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.mixer\.experts)\.(?P<e>\d+)\.(?P<proj>up_proj|down_proj)\.weight$"
)


def import_transformers_nemotron_h():
    """``(NemotronHConfig, NemotronHForCausalLM, GenerationConfig)`` from transformers.

    Needs an environment without PyPI's torchvision/torchaudio/torchcodec built for another
    torch (they break transformers' imports); ``scripts/setup.sh`` removes them.
    """
    from transformers import GenerationConfig, NemotronHConfig, NemotronHForCausalLM

    return NemotronHConfig, NemotronHForCausalLM, GenerationConfig


def hf_config_dict(path: str | Path) -> dict:
    """``config.json`` made acceptable to transformers' ``NemotronHConfig``.

    Only the fields naming NVIDIA's remote code are replaced; every architecture number is
    passed through unchanged (transformers turns ``hybrid_override_pattern`` into
    ``layers_block_type`` itself).
    """
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg["architectures"] = ["NemotronHForCausalLM"]
    cfg.pop("auto_map", None)
    if cfg.get("model_type") != "nemotron_h":
        raise ValueError(f"not a NemotronH config: model_type={cfg.get('model_type')!r}")
    return cfg


def context_tower_state_dict(
    state: dict[str, torch.Tensor], n_experts: int
) -> dict[str, torch.Tensor]:
    """The TwoTower checkpoint's context-tower tensors under transformers' NemotronH names."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "context_lm_head.weight":
            out["lm_head.weight"] = value
            continue
        if not key.startswith("context_tower."):
            continue
        key = "model." + key[len("context_tower.") :]
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault((m["prefix"], m["proj"]), {})[int(m["e"])] = value
        else:
            out[key] = value
    for (prefix, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(n_experts)):
            raise ValueError(
                f"{prefix}.*.{proj}: experts {sorted(per_expert)}, expected 0..{n_experts - 1}"
            )
        out[f"{prefix}.{proj}"] = torch.stack([per_expert[e] for e in range(n_experts)])
    return out


def load_hf_context_tower(
    path: str | Path,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "eager",
    dt_limit: str = "config",
):
    """``NemotronHForCausalLM`` holding the checkpoint's context tower and ``context_lm_head``.

    ``dtype`` defaults to the stored dtype of ``context_lm_head``. The model is built directly
    from the config (no hub lookup, no ``generation_config.json``): callers pass generation
    settings explicitly.

    ``dt_limit``: transformers 5.x's ``NemotronHMamba2Mixer`` sets
    ``time_step_limit = (config.time_step_min, inf)``, so its chunked (prefill) scan clamps
    ``softplus(dt + dt_bias)`` at ``time_step_min`` (1e-3, an *initialisation* bound), while its
    single-token decode path (``mamba2_selective_state_update``) does not clamp at all. NVIDIA's
    NemotronH code clamps with ``config.time_step_limit`` (``[0, inf]``: no clamp) on every
    path. ``"config"`` (default) puts ``config.time_step_limit`` back on every Mamba mixer,
    which is NVIDIA's semantics; ``"transformers"`` keeps transformers' own behaviour.
    """
    NemotronHConfig, NemotronHForCausalLM, _ = import_transformers_nemotron_h()
    from vllm_twotower.reference.loading import read_state_dict

    config = NemotronHConfig(**hf_config_dict(path))
    config._attn_implementation = attn_implementation
    state = read_state_dict(path)
    if dtype is None:
        dtype = state["context_lm_head.weight"].dtype
    hf_state = context_tower_state_dict(state, config.n_routed_experts)
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - hf_state.keys(), hf_state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"context tower does not fit transformers' NemotronH: missing {sorted(missing)[:8]}"
            f" ({len(missing)}), unexpected {sorted(unexpected)[:8]} ({len(unexpected)})"
        )
    for name, param in model.state_dict().items():
        if hf_state[name].shape != param.shape:
            shapes = (
                f"checkpoint {tuple(hf_state[name].shape)} vs transformers {tuple(param.shape)}"
            )
            raise ValueError(f"{name}: {shapes}")
    # The e-score bias stays fp32 (transformers keeps it in fp32 too); the rest goes to ``dtype``.
    hf_state = {
        k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in hf_state.items()
    }
    model.load_state_dict(hf_state, strict=True, assign=True)
    if dt_limit == "config":
        lo, hi = (float(v) for v in config.time_step_limit)
        for layer in model.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = (lo, hi)
    elif dt_limit != "transformers":
        raise ValueError(f"dt_limit must be 'config' or 'transformers', not {dt_limit!r}")
    return model.eval()
