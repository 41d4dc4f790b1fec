"""csrc/ compiles without a GPU: scripts/check_csrc.sh (nvcc object for one arch + bindings syntax).

Needs nvcc, not a GPU and not a CUDA build of torch: torch's CPU wheel ships the ATen/c10 headers
that bindings.cpp includes, and block_attention.cu includes only CUDA's own headers.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_check_csrc_script_compiles_the_kernel_and_bindings():
    # One arch keeps this under a minute on two cores; the script's default builds sm_80 + sm_90.
    env = dict(os.environ, CSRC_ARCHS="90", PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_csrc.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[check_csrc] OK" in run.stdout, run.stdout
    # ptxas's report lists every instantiated kernel: fp16/bf16 x D 64/128 x 8/16 heads + merges.
    assert run.stdout.count("block_attention_kernel<") == 8, run.stdout
    assert run.stdout.count("merge_kernel<") == 2, run.stdout
