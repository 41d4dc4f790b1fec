"""The checkpoint factory writes NVIDIA's exact layout, and the reference loads all of it."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from vllm_twotower.reference import load_reference, read_state_dict
from vllm_twotower.testing.make_checkpoint import REAL_PATTERN, build_config, make_checkpoint


def real_key_set(pattern: str, n_experts: int) -> set[str]:
    """NVIDIA's key names, written out from the spec's table (§2.1/§2.2), independently of the
    factory's own shape table."""
    keys = {
        "context_lm_head.weight",
        "lm_head.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "t_block.1.weight",
        "t_block.1.bias",
    }
    keys |= {f"scale_shift_tables.{i}" for i in range(len(pattern))}
    for tower in ("context_tower", "denoiser_tower"):
        keys |= {f"{tower}.embeddings.weight", f"{tower}.norm_f.weight"}
        for i, c in enumerate(pattern):
            p = f"{tower}.layers.{i}."
            keys.add(p + "norm.weight")
            if c == "M":
                keys |= {
                    p + "mixer." + n
                    for n in (
                        "in_proj.weight",
                        "conv1d.weight",
                        "conv1d.bias",
                        "dt_bias",
                        "A_log",
                        "D",
                        "norm.weight",
                        "out_proj.weight",
                    )
                }
            elif c == "*":
                keys |= {p + f"mixer.{n}_proj.weight" for n in "qkvo"}
            elif c == "E":
                keys |= {
                    p + "mixer.gate.weight",
                    p + "mixer.gate.e_score_correction_bias",
                    p + "mixer.shared_experts.up_proj.weight",
                    p + "mixer.shared_experts.down_proj.weight",
                }
                for e in range(n_experts):
                    keys |= {
                        p + f"mixer.experts.{e}.up_proj.weight",
                        p + f"mixer.experts.{e}.down_proj.weight",
                    }
            elif c == "-":
                keys |= {p + "mixer.up_proj.weight", p + "mixer.down_proj.weight"}
    return keys


def test_cli_writes_the_real_layout(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_twotower.testing.make_checkpoint",
            "--out",
            str(out),
            "--preset",
            "tiny",
        ],
        check=True,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    assert cfg["model_type"] == "nemotron_h"
    assert set(cfg["hybrid_override_pattern"]) == {"M", "E", "*", "-"}
    state = read_state_dict(out)
    assert set(state) == real_key_set(cfg["hybrid_override_pattern"], cfg["n_routed_experts"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 11]
    assert (out / "tokenizer.json").exists()


def test_config_fields_match_the_real_config():
    real = build_config("tiny")
    for field in (
        "hybrid_override_pattern",
        "mamba_num_heads",
        "n_groups",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_shared_expert_intermediate_size",
        "routed_scaling_factor",
        "time_step_limit",
        "chunk_size",
        "norm_topk_prob",
        "mlp_hidden_act",
    ):
        assert field in real
    deep = build_config("deep")
    assert deep["hybrid_override_pattern"] == REAL_PATTERN
    assert (
        deep["num_attention_heads"],
        deep["num_key_value_heads"],
        deep["mamba_num_heads"],
        deep["n_groups"],
        deep["n_routed_experts"],
        deep["num_experts_per_tok"],
    ) == (32, 2, 64, 8, 128, 6)


def test_tiny_shards_by_two_for_tensor_parallelism():
    c = build_config("tiny")
    for k in (
        "num_attention_heads",
        "num_key_value_heads",
        "mamba_num_heads",
        "n_groups",
        "n_routed_experts",
        "moe_intermediate_size",
        "moe_shared_expert_intermediate_size",
        "intermediate_size",
        "vocab_size",
    ):
        assert c[k] % 2 == 0, k


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_every_key_used(tmp_path, shards):
    out = make_checkpoint(tmp_path / "c", "tiny", shards=shards)
    if shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == shards
    state = read_state_dict(out)
    model = load_reference(out)
    model_state = model.state_dict()
    assert set(model_state) == set(state)  # strict: none missing, none unexpected
    for k, v in state.items():
        assert torch.equal(model_state[k].to(v.dtype), v), k
    assert not any(p.is_meta for p in model.parameters())


def test_deterministic_in_seed(tmp_path):
    a = read_state_dict(make_checkpoint(tmp_path / "a", "tiny", seed=3))
    b = read_state_dict(make_checkpoint(tmp_path / "b", "tiny", seed=3))
    c = read_state_dict(make_checkpoint(tmp_path / "c", "tiny", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_bf16_and_the_fp32_router_bias(tmp_path):
    out = make_checkpoint(tmp_path / "bf", "tiny", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert (
            f.get_tensor("context_tower.layers.1.mixer.gate.e_score_correction_bias").dtype
            == torch.float32
        )
    model = load_reference(out)
    assert model.dtype == torch.bfloat16


def test_deep_preset_loads_with_the_real_pattern(tmp_path):
    out = make_checkpoint(tmp_path / "deep", "deep")
    state = read_state_dict(out)
    assert set(state) == real_key_set(REAL_PATTERN, 128)


def test_missing_key_is_reported(tmp_path):
    from safetensors.torch import save_file

    out = make_checkpoint(tmp_path / "m", "tiny")
    state = read_state_dict(out)
    del state["denoiser_tower.layers.0.mixer.D"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="denoiser_tower.layers.0.mixer.D"):
        load_reference(out)
