"""benchmarks/bench_kernels.py runs end to end (tiny shapes, Triton interpreter) and writes its
CSV and JSON. Timings are not checked."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.mark.slow
def test_cpu_smoke_writes_results(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (csv_path,) = tmp_path.glob("*_kernels.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert {(r["kernel"], r["impl"]) for r in rows} >= {
        ("block_attention", "triton"),
        ("block_attention", "reference"),
        ("confidence_unmask", "triton"),
        ("confidence_unmask", "reference"),
    }
    assert all(float(r["time_us"]) > 0 for r in rows)
    assert all(r["check"] == "tokens==ref" for r in rows if r["kernel"] == "confidence_unmask")
    meta = json.loads(csv_path.with_suffix(".json").read_text())["meta"]
    assert meta["cpu_smoke"] and meta["commit"].startswith(csv_path.name.split("_")[-2])
