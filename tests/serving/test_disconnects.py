"""Acceptance 2 and 3 with two api workers sharing the port: 100 clients that disconnect
mid-stream leave no KV blocks behind, and 32 concurrent streams complete with correct usage and
metrics that add up across both workers."""
from __future__ import annotations

import http.client
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import free_port
from stream_helpers import run_concurrent_streams

METRICS_PORT = free_port()
SERVER_ARGS = ["--workers", "2", "--metrics-port", str(METRICS_PORT)]


def metric(server, name: str) -> float:
    # Straight from --metrics-port (the engine's exporter), not the api workers' proxy.
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def wait_metric(server, name: str, value: float, attempts: int = 2000) -> float:
    """Poll until the gauge reaches value (each poll is a real request; no sleeping)."""
    got = metric(server, name)
    for _ in range(attempts):
        if got == value:
            break
        got = metric(server, name)
    return got


def disconnect_mid_stream(server, i: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"messages": [{"role": "user", "content": f"Write a long story number {i}."}], "max_tokens": 1000,
            "min_tokens": 1000, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen_content = False
    while not seen_content:  # read until real generated text arrived, then vanish
        line = resp.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: {") and b'"content":""' not in line:
            seen_content = True
    conn.sock.shutdown(2)
    conn.close()


def test_idle_kv_usage_is_zero(server):
    assert wait_metric(server, "fastdeploy:gpu_cache_usage_perc", 0.0) == 0.0


def test_100_disconnects_free_the_kv_cache(server):
    idle = metric(server, "fastdeploy:gpu_cache_usage_perc")
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda i: disconnect_mid_stream(server, i), range(100)))
    assert wait_metric(server, "fastdeploy:num_requests_running", 0.0) == 0.0
    assert wait_metric(server, "fastdeploy:num_requests_waiting", 0.0) == 0.0
    assert wait_metric(server, "fastdeploy:gpu_cache_usage_perc", idle) == idle
    # No request ran to its 1000 tokens: each was aborted shortly after its client left.
    assert metric(server, "fastdeploy:generation_tokens_total") < 100 * 1000 / 4
    # And the server still serves.
    with urllib.request.urlopen(server.url + "/health", timeout=60) as resp:
        assert resp.status == 200


def test_32_concurrent_streams_two_workers_and_metrics_add_up(server):
    before = metric(server, "fastdeploy:request_success_total")
    run_concurrent_streams(server.url, 32)
    assert metric(server, "fastdeploy:request_success_total") - before == 32
