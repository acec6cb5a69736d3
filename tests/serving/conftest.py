"""One real server (launcher + engine + workers, real default model) per test module.

A module sets SERVER_ARGS (extra launcher flags) to configure its server. Readiness is the
launcher's "server ready" line, waited for with a timeout; teardown is SIGTERM and must end
every process of ours.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
STARTUP_TIMEOUT = 300.0
BASE_ARGS = ["--max-model-len", "2048", "--num-gpu-blocks-override", "160", "--max-num-seqs", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of pid, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)


def start_server(extra: list[str], timeout: float = STARTUP_TIMEOUT) -> Server:
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PYTHON, "-m", "fastdeploy.entrypoints.openai.api_server", "--host", "127.0.0.1",
                             "--port", str(port), *BASE_ARGS, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, port)
    ready: queue.Queue[bool] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            server.lines.append(line)
            if "server ready" in line:
                ready.put(True)
        ready.put(False)

    threading.Thread(target=pump, daemon=True).start()
    try:
        ok = ready.get(timeout=timeout)
    except queue.Empty:
        ok = False
    if not ok:
        stop_server(server)
        raise RuntimeError(f"server did not become ready:\n{server.output[-4000:]}")
    return server


def stop_server(server: Server) -> int:
    children = child_pids(server.proc.pid)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        code = server.proc.wait()
    run_dir = next((line.split("run directory ", 1)[1].strip() for line in server.lines
                    if "run directory " in line), None)
    assert run_dir is None or not os.path.exists(run_dir), f"run directory {run_dir} left behind"
    for pid in children:
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"child {pid} ({cmdline(pid)}) outlived the launcher"
    return code


@pytest.fixture(scope="module")
def server(request, default_model_path) -> Server:
    extra = list(getattr(request.module, "SERVER_ARGS", []))
    srv = start_server(extra)
    yield srv
    if srv.proc.poll() is None:
        assert stop_server(srv) == 0, srv.output[-3000:]
