"""What every serving process shares: the run spec written by the launcher and child-process setup.

The launcher writes one RunSpec (JSON) into the run directory and starts each child with
`--spec <file> --index <i>`; children read addresses and options from it, so no option is parsed
twice and nothing secret appears on a command line (the api key lives in the spec file, mode 0600).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

import msgspec
import zmq

from fastdeploy.entrypoints import wire
from fastdeploy.logger import setup_logging

logger = logging.getLogger("fastdeploy")


class ModelInfo(msgspec.Struct, omit_defaults=True):
    """Facts the engine reports once loaded (copied from its Ready frame)."""

    max_model_len: int = 0
    eos_token_ids: list[int] = []
    vocab_size: int = 0
    num_blocks: int = 0


class RunSpec(msgspec.Struct, omit_defaults=True):
    run_dir: str
    control_addr: str
    """Launcher PULL: Ready / Failed from children."""
    events_addr: str
    """Launcher PUB: ProcessDied to api workers."""
    engine_addr: str
    tokenizer_addrs: list[str]
    detokenizer_addrs: list[str]
    api_addrs: list[str]
    model_path: str
    served_model_name: str
    engine_args: dict[str, Any]
    host: str = "0.0.0.0"
    port: int = 8188
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0
    reasoning_parser: str | None = None
    api_key: str | None = None
    max_concurrency: int = 512
    """Per api worker: the launcher divides --max-concurrency among the workers."""
    max_request_bytes: int = 8 * 1024 * 1024
    model_info: ModelInfo | None = None
    """Filled before the api workers start (they need max_model_len)."""
    zmq_bind: str | None = None
    """--zmq-bind: where the ZeroMQ gateway listens for callers (tcp:// or ipc://); None: no gateway."""
    gateway_addr: str = ""
    """The gateway's reply address (ipc, in the run directory)."""


def ipc_addr(run_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(run_dir, name)}.sock"


def write_spec(spec: RunSpec, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(spec))


def read_spec(path: str) -> RunSpec:
    with open(path, "rb") as f:
        return msgspec.json.decode(f.read(), type=RunSpec)


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the launcher dies, even by SIGKILL, so no child is orphaned."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def child_setup(name: str) -> None:
    """Common start of every child: logging, Ctrl-C handled by the launcher only, die with it."""
    setup_logging()
    # The terminal sends SIGINT to the whole group; the launcher decides how to stop everyone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _die_with_parent()
    if os.getppid() == 1:
        sys.exit(0)  # the launcher died before prctl took effect
    logger.info("%s starting (pid %d)", name, os.getpid())


def report(spec: RunSpec, frame: wire.Frame) -> None:
    """Send one frame to the launcher (Ready or Failed) and make sure it left before returning."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(spec.control_addr)
    sock.send(wire.encode(frame))
    sock.close()


def push_socket(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    # Never block a producer on a slow or dead consumer: a full pipe raises zmq.Again instead.
    sock.setsockopt(zmq.SNDHWM, 100000)
    sock.connect(addr)
    return sock


class PushCache:
    """PUSH sockets to reply addresses, created on first use (addresses come inside frames)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx = ctx
        self._socks: dict[str, zmq.Socket] = {}

    def send(self, addr: str, frame: wire.Frame) -> None:
        if not addr:
            return
        sock = self._socks.get(addr)
        if sock is None:
            sock = self._socks[addr] = push_socket(self._ctx, addr)
        try:
            sock.send(wire.encode(frame), zmq.NOBLOCK)
        except zmq.Again:
            logger.error("dropping a frame to %s: its queue is full (consumer stuck or gone)", addr)

    def close(self, linger_ms: int = 0) -> None:
        """linger_ms > 0 gives queued frames (e.g. final errors) time to leave before exit."""
        for sock in self._socks.values():
            sock.close(linger_ms)
        self._socks.clear()
