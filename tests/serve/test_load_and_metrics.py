"""Concurrency, client disconnects and the Prometheus / `vllm bench serve` diffusion numbers,
against the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from expected import STOP_IDS, prompts

from vllm_twotower.reference import generate_mask_diffusion

pytestmark = [pytest.mark.slow, pytest.mark.engine]

NUM_CLIENTS = 64
NUM_DISCONNECT = 8
MAX_TOKENS = 32


async def _stream_one(client, model, prompt, disconnect: bool):
    body = dict(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, stream=True, return_token_ids=True
    )
    ids, finish = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            ids += choice.get("token_ids") or []
            finish = choice.get("finish_reason") or finish
            if disconnect:
                return None  # close the connection mid-stream (after the first chunk)
    return ids, finish


async def _run_clients(server, all_prompts, disconnect):
    limits = httpx.Limits(max_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        return await asyncio.gather(
            *(
                _stream_one(client, server.model, p, d)
                for p, d in zip(all_prompts, disconnect, strict=True)
            )
        )


def _wait_idle(server, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m.get("vllm:num_requests_running", 1) == 0
        idle = idle and m.get("vllm:num_requests_waiting", 1) == 0
        if idle and m.get("vllm:kv_cache_usage_perc", 1) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def test_64_streaming_clients_and_disconnects(server, serve_reference):
    all_prompts = prompts(NUM_CLIENTS, seed=11)
    disconnect = [i % (NUM_CLIENTS // NUM_DISCONNECT) == 3 for i in range(NUM_CLIENTS)]
    m0 = server.metrics()
    t0 = time.monotonic()
    results = asyncio.run(_run_clients(server, all_prompts, disconnect))
    elapsed = time.monotonic() - t0
    kept = [i for i in range(NUM_CLIENTS) if not disconnect[i]]
    ref = generate_mask_diffusion(serve_reference, [all_prompts[i] for i in kept], MAX_TOKENS)
    for i, r in zip(kept, ref, strict=True):
        ids, finish = results[i]
        want = r.output_ids(MAX_TOKENS, STOP_IDS)
        assert ids == want, i
        assert finish == ("stop" if want[-1] in STOP_IDS else "length")
    served = sum(len(results[i][0]) for i in kept)
    print(
        f"\n{NUM_CLIENTS} streaming clients ({NUM_DISCONNECT} disconnected): {elapsed:.1f} s, "
        f"{served / elapsed:.1f} tok/s completed"
    )
    # Disconnected requests are aborted: nothing keeps running or holding KV blocks.
    m = _wait_idle(server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
    finished = m["vllm:request_success_total"] - m0.get("vllm:request_success_total", 0)
    assert finished == len(kept)
    # ...and the server still answers correctly.
    prompt = all_prompts[kept[0]]
    out = server.completion(prompt=prompt, max_tokens=MAX_TOKENS, return_token_ids=True)
    assert out["choices"][0]["token_ids"] == results[kept[0]][0]


def test_metrics_count_the_tokens_served(server):
    m0 = server.metrics()
    total = 0
    for p in prompts(3, seed=12):
        out = server.completion(prompt=p, max_tokens=48, ignore_eos=True)
        total += out["usage"]["completion_tokens"]
    m1 = server.metrics()
    d = {k: m1[k] - m0.get(k, 0) for k in m1}
    assert total == 3 * 48
    assert d["vllm:diffusion_num_committed_tokens_total"] == total
    assert d["vllm:generation_tokens_total"] == total
    blocks = total // 16
    steps = d["vllm:diffusion_num_denoising_steps_total"]
    # every block: 1..16 denoiser forwards, then one commit step
    assert 2 * blocks <= steps <= 17 * blocks
    assert d["vllm:diffusion_num_canvas_positions_total"] == 16 * steps


def test_vllm_bench_serve_prints_diffusion_section(server, tmp_path):
    cmd = [
        str(Path(sys.executable).with_name("vllm")),
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--model",
        server.model,
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "32",
        "--num-prompts",
        "8",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "bench.json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Diffusion Decoding" in out.stdout, out.stdout[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["diffusion_committed_tokens"] == 8 * 32
    assert 1.0 <= result["diffusion_committed_per_step"] <= 16.0
    assert 1.0 <= result["diffusion_steps_per_canvas"] <= 16.0
