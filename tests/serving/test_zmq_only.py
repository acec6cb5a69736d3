"""`--workers 0 --zmq-bind ipc://...`: a server with no HTTP at all, reached only over ZeroMQ."""
from __future__ import annotations

import os
import socket
import tempfile

from fastdeploy.client import EngineClient
from serving.conftest import start_server, stop_server


def test_zmq_only_server_over_ipc(default_model_path):
    with tempfile.TemporaryDirectory() as tmp:
        addr = f"ipc://{os.path.join(tmp, 'fd.sock')}"
        srv = start_server(["--workers", "0", "--zmq-bind", addr])
        try:
            assert f"ZeroMQ {addr}" in srv.output
            with socket.socket() as s:  # nothing listens on the HTTP port
                assert s.connect_ex(("127.0.0.1", srv.port)) != 0
            with EngineClient(addr, timeout=120) as client:
                result = client.generate(messages=[{"role": "user", "content": "Hi"}],
                                         sampling_params={"max_tokens": 3, "ignore_eos": True})
            assert len(result.choices[0].token_ids) == 3
        finally:
            assert stop_server(srv) == 0, srv.output[-3000:]


def test_zmq_bind_address_is_checked(default_model_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastdeploy.entrypoints.openai.api_server", "--workers", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--zmq-bind" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastdeploy.entrypoints.openai.api_server", "--zmq-bind",
                          "localhost:5555"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "tcp://" in out.stderr
