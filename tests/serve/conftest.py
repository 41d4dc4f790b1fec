"""One real ``vllm serve`` process for the serving tests (started once, ~40 s on this machine).

The server is started exactly as a user would (the ``vllm`` CLI, the tiny checkpoint in
NVIDIA's layout, a ChatML template because the checkpoint is a base model) and spoken to only
over loopback HTTP. Expected tokens come from the reference implementation.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from vllm_twotower.testing.make_checkpoint import make_checkpoint

TEMPLATE = Path(__file__).parents[2] / "vllm_twotower" / "testing" / "chatml_template.jinja"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 64
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, log: Path):
        self.checkpoint = checkpoint
        self.model = str(checkpoint)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            str(Path(sys.executable).with_name("vllm")),
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--max-num-seqs",
            str(MAX_NUM_SEQS),
            "--chat-template",
            str(TEMPLATE),
        ]
        # No KV cache size: the plugin's CPU default (2 GiB) must let a bare `vllm serve` start.
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=log.parent
        )
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        tail = self.log.read_text()[-4000:]
        raise RuntimeError(f"vllm serve did not become healthy; log tail:\n{tail}")

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(path, json={"model": self.model, **body})

    def completion(self, **body) -> dict:
        r = self.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> dict[str, float]:
        """Unlabelled sums of every Prometheus sample, by metric name."""
        out: dict[str, float] = {}
        for line in self.client.get("/metrics").text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{")[0]
            out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self._log_file.close()


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-tiny"), "tiny")


@pytest.fixture(scope="session")
def server(serve_checkpoint, tmp_path_factory):
    srv = Server(serve_checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def serve_reference(serve_checkpoint):
    from vllm_twotower.reference import load_reference

    return load_reference(serve_checkpoint, router_dtype=torch.float32)
