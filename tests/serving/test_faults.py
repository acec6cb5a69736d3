"""Acceptance 5 and start-up failures: a killed engine turns /health to 503, fails the pending
stream, and makes the launcher exit non-zero naming it with no process left; options we cannot
honour and port clashes fail fast with a clear message."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request

from conftest import PYTHON, ROOT, alive, child_pids, cmdline, start_server


def health_status(server) -> int | None:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None  # the server is already gone


def test_killed_engine_gives_503_error_and_nonzero_exit(default_model_path):
    server = start_server([])
    try:
        children = child_pids(server.proc.pid)
        engine = [p for p in children if "fastdeploy.engine.engine_process" in cmdline(p)]
        assert len(engine) == 1 and len(children) >= 4
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1500,
                "min_tokens": 1500, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")

        os.kill(engine[0], signal.SIGKILL)
        # The pending stream ends with an error event, then [DONE].
        rest = resp.read().decode()
        assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]")
        statuses = set()
        while server.proc.poll() is None:
            status = health_status(server)
            statuses.add(status)
            if status in (503, None):
                break
        assert 503 in statuses, statuses
        code = server.proc.wait(timeout=120)
        assert code != 0
        assert "engine" in server.output and "exited" in server.output
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            assert not alive(pid), f"{pid} ({cmdline(pid)}) left running"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def run_launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "fastdeploy.entrypoints.openai.api_server", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_port_clash_fails_fast():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_launcher("--host", "127.0.0.1", "--port", str(port))
    assert out.returncode != 0
    assert f"--port 127.0.0.1:{port} is not available" in out.stderr


def test_options_we_cannot_honour_fail_at_start():
    for flags, words in ((["--tensor-parallel-size", "2"], "tensor-parallel"), (["--enable-mm"], "enable-mm"),
                         (["--scheduler-name", "global"], "scheduler"),
                         (["--reasoning-parser", "nope"], "reasoning-parser")):
        out = run_launcher("--port", "1", *flags)
        assert out.returncode == 2, (flags, out.stderr)
        assert words in out.stderr, (flags, out.stderr)
