"""The README's main job (`python -m vllm_twotower.demo`) runs and prints what it promises."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def test_demo_prints_text_tokens_per_forward_and_speed(tmp_path):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_twotower.demo",
            "--out",
            str(tmp_path / "ckpt"),
            "--max-tokens",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RANDOM weights" in out.stdout and "--- 'The capital of France is'" in out.stdout
    m = re.search(
        r"4 requests, (\d+) tokens in .* s: ([\d.]+) tokens/s; ([\d.]+) tokens per "
        r"denoiser forward",
        out.stdout,
    )
    assert m, out.stdout[-2000:]
    tokens, per_forward = int(m[1]), float(m[3])
    assert 0 < tokens <= 4 * 32  # EOS may end a request early
    assert 1.0 <= per_forward <= 16.0
