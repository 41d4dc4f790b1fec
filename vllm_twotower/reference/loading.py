"""Load a TwoTower checkpoint directory into the reference, strictly by key name.

Accepts NVIDIA's layout: ``config.json`` plus either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Every checkpoint key must land on a parameter and every
parameter must come from the checkpoint (the model is built on the meta device, so a missing
key cannot hide behind a random initialisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .arch import TwoTowerArch
from .model import TwoTowerReference

# Router tensors keep their stored dtype: routing is computed in fp64/fp32 from them anyway,
# and the e-score bias is an fp32 buffer in NVIDIA's code.
_KEEP_DTYPE_SUFFIXES = ("gate.weight", "gate.e_score_correction_bias")


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors or index in {path}")
    return [single]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        part = load_file(str(f))
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"keys stored twice in {path}: {sorted(dup)[:5]}")
        state.update(part)
    return state


def load_reference(
    path: str | Path,
    dtype: torch.dtype | None = None,
    router_dtype: torch.dtype = torch.float64,
) -> TwoTowerReference:
    """Build the reference from a checkpoint directory.

    ``dtype`` defaults to the stored dtype of the weights; ``router_dtype`` is fp64 like
    NVIDIA's reference (pass ``torch.float32`` to route like vLLM).
    """
    arch = TwoTowerArch.from_pretrained(path)
    state = read_state_dict(path)
    with torch.device("meta"):
        model = TwoTowerReference(arch, router_dtype)
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint keys do not match the architecture: missing {sorted(missing)[:8]}"
            f" ({len(missing)}), unexpected {sorted(unexpected)[:8]} ({len(unexpected)})"
        )
    if dtype is None:
        dtype = state["lm_head.weight"].dtype
    state = {k: v if k.endswith(_KEEP_DTYPE_SUFFIXES) else v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
