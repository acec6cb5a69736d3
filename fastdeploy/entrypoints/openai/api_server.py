"""The launcher: `python -m fastdeploy.entrypoints.openai.api_server --model ... --port 8188`.

Creates a run directory for the ipc:// sockets, starts the engine, K tokenizer workers, D
detokenizers and --workers api workers, waits for each to report ready (every wait has a timeout
and a log line naming what it waits for), prints the URL and then supervises: SIGINT/SIGTERM or the
death of any child stops everything, removes the run directory and (for a death) exits non-zero
naming the dead process.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import zmq

from fastdeploy.engine.args import EngineArgs
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.runtime import ModelInfo, RunSpec, ipc_addr, write_spec
from fastdeploy.logger import setup_logging
from fastdeploy.output.reasoning import check_reasoning_parser

logger = logging.getLogger("fastdeploy")


class LaunchError(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdeploy.entrypoints.openai.api_server",
                                description="OpenAI-compatible FastDeploy server")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8188)
    g.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default: an internal port; /metrics on --port proxies it)")
    g.add_argument("--workers", type=int, default=1,
                   help="api worker processes sharing --port (0: no HTTP, only --zmq-bind)")
    g.add_argument("--zmq-bind", default=None, metavar="ADDR",
                   help="also serve the msgspec wire protocol to other services on this ZeroMQ address, "
                        "e.g. tcp://127.0.0.1:8189 or ipc:///run/fastdeploy.sock (docs/embedding.md)")
    g.add_argument("--tokenizer-workers", type=int, default=1)
    g.add_argument("--detokenizer-workers", type=int, default=1)
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--api-key", default=None)
    g.add_argument("--max-concurrency", type=int, default=512, help="concurrent requests before 429")
    g.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024)
    g.add_argument("--startup-timeout", type=float, default=900.0)
    g.add_argument("--fault-grace-seconds", type=float, default=3.0,
                   help="after a child dies, answer 503 this long before stopping everything")
    EngineArgs.add_cli_args(p)
    return p


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail fast with a clear message instead of a child dying later on EADDRINUSE."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(f"{what} {host}:{port} is not available ({exc.strerror}); "
                              f"is another server running? choose another {what}") from None


class Launcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: dict[str, subprocess.Popen] = {}
        self.run_dir = tempfile.mkdtemp(prefix="fastdeploy-run-")
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.bind(ipc_addr(self.run_dir, "control"))
        self.events = self.ctx.socket(zmq.PUB)
        self.events.bind(ipc_addr(self.run_dir, "events"))
        self.stop_signal: int | None = None
        self.ready: dict[str, wire.Ready] = {}

    def make_spec(self, engine_args: EngineArgs, model_path: str) -> RunSpec:
        a, d = self.args, self.run_dir
        return RunSpec(
            run_dir=d, control_addr=ipc_addr(d, "control"), events_addr=ipc_addr(d, "events"),
            engine_addr=ipc_addr(d, "engine"),
            tokenizer_addrs=[ipc_addr(d, f"tokenizer-{i}") for i in range(a.tokenizer_workers)],
            detokenizer_addrs=[ipc_addr(d, f"detokenizer-{i}") for i in range(a.detokenizer_workers)],
            api_addrs=[ipc_addr(d, f"api-{i}") for i in range(a.workers)],
            model_path=model_path, served_model_name=a.served_model_name or a.model,
            engine_args=asdict(engine_args), host=a.host, port=a.port,
            metrics_host=a.host if a.metrics_port is not None else "127.0.0.1",
            metrics_port=a.metrics_port or 0, reasoning_parser=a.reasoning_parser, api_key=a.api_key,
            max_concurrency=max(1, math.ceil(a.max_concurrency / max(1, a.workers))),
            max_request_bytes=a.max_request_bytes, zmq_bind=a.zmq_bind,
            gateway_addr=ipc_addr(d, "gateway") if a.zmq_bind else "")

    def start(self, name: str, module: str, spec_path: str, index: int | None = None) -> None:
        cmd = [sys.executable, "-m", module, "--spec", spec_path]
        if index is not None:
            cmd += ["--index", str(index)]
        self.children[name] = subprocess.Popen(cmd)
        logger.info("started %s (pid %d)", name, self.children[name].pid)

    def wait_ready(self, names: list[str], timeout: float) -> None:
        """Block until every named child sent Ready; a Failed frame, a death or the timeout aborts."""
        deadline = time.monotonic() + timeout
        last_note = 0.0
        while any(n not in self.ready for n in names):
            missing = [n for n in names if n not in self.ready]
            now = time.monotonic()
            if now > deadline:
                raise LaunchError(f"timed out after {timeout:.0f}s waiting for {', '.join(missing)} to be ready")
            if now - last_note > 10.0:
                what = "engine (loading the model, profiling the KV cache)" if "engine" in missing else ""
                _say(f"waiting for {what or ', '.join(missing)} to be ready ...")
                last_note = now
            self.check_children()
            if self.stop_signal is not None:
                raise LaunchError(f"interrupted by signal {self.stop_signal} during start-up")
            if self.control.poll(200):
                frame = wire.decode(self.control.recv())
                if isinstance(frame, wire.Failed):
                    raise LaunchError(f"{frame.name} (pid {frame.pid}) failed to start: {frame.message}")
                if isinstance(frame, wire.Ready):
                    if frame.schema_version != wire.SCHEMA_VERSION:
                        raise LaunchError(f"{frame.name} speaks wire schema {frame.schema_version}, "
                                          f"expected {wire.SCHEMA_VERSION}")
                    self.ready[frame.name] = frame
                    logger.info("%s is ready", frame.name)

    def check_children(self) -> None:
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None:
                raise ChildDied(name, proc.pid, code)

    def supervise(self) -> None:
        while self.stop_signal is None:
            self.check_children()
            if self.control.poll(200):
                frame = wire.decode(self.control.recv())
                if isinstance(frame, wire.Failed):
                    logger.error("%s reported failure: %s", frame.name, frame.message)

    def announce_death(self, died: "ChildDied") -> None:
        """Tell api workers (503 + fail pending requests), then give clients a moment to see it."""
        self.events.send(wire.encode(wire.ProcessDied(name=died.name, pid=died.pid, exitcode=died.code)))
        deadline = time.monotonic() + self.args.fault_grace_seconds
        while time.monotonic() < deadline and self.stop_signal is None:
            time.sleep(0.05)

    def shutdown(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10.0
        for name, proc in self.children.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait()
        self.control.close(0)
        self.events.close(0)
        self.ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class ChildDied(Exception):
    def __init__(self, name: str, pid: int, code: int) -> None:
        super().__init__(f"process {name} (pid {pid}) exited unexpectedly with code {code}")
        self.name, self.pid, self.code = name, pid, code


def _say(message: str) -> None:
    logger.info(message)
    print(f"[fastdeploy] {message}", file=sys.stderr, flush=True)


def launch(launcher: Launcher, args: argparse.Namespace, engine_args: EngineArgs, model_path: str) -> None:
    spec = launcher.make_spec(engine_args, model_path)
    spec_path = os.path.join(launcher.run_dir, "spec.json")
    write_spec(spec, spec_path)
    launcher.start("engine", "fastdeploy.engine.engine_process", spec_path)
    for i in range(args.tokenizer_workers):
        launcher.start(f"tokenizer-{i}", "fastdeploy.entrypoints.tokenizer_worker", spec_path, i)
    for i in range(args.detokenizer_workers):
        launcher.start(f"detokenizer-{i}", "fastdeploy.entrypoints.detokenizer_worker", spec_path, i)
    launcher.wait_ready([n for n in launcher.children], args.startup_timeout)
    engine = launcher.ready["engine"]
    spec.model_info = ModelInfo(max_model_len=engine.max_model_len, eos_token_ids=engine.eos_token_ids,
                                vocab_size=engine.vocab_size, num_blocks=engine.num_blocks)
    spec.metrics_port = engine.metrics_port
    api_spec_path = os.path.join(launcher.run_dir, "spec-api.json")
    write_spec(spec, api_spec_path)
    api_names = [f"api-{i}" for i in range(args.workers)]
    for i, name in enumerate(api_names):
        launcher.start(name, "fastdeploy.entrypoints.openai.http_app", api_spec_path, i)
    if args.zmq_bind:
        launcher.start("zmq-gateway", "fastdeploy.entrypoints.zmq_gateway", api_spec_path)
        api_names.append("zmq-gateway")
    launcher.wait_ready(api_names, args.startup_timeout)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    where = [f"http://{shown}:{args.port}/v1"] if args.workers else []
    where += [f"ZeroMQ {args.zmq_bind}"] if args.zmq_bind else []
    _say(f"FastDeploy server ready: {' and '.join(where)} (model {spec.served_model_name!r}, "
         f"max_model_len {engine.max_model_len}); metrics at http://{shown}:{engine.metrics_port}/metrics")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        engine_args = EngineArgs.from_cli_args(args)
        engine_args.create_engine_config()
        check_reasoning_parser(args.reasoning_parser)
        if args.workers < 0 or args.tokenizer_workers < 1 or args.detokenizer_workers < 1:
            raise LaunchError("--tokenizer-workers and --detokenizer-workers must be at least 1, --workers at "
                              "least 0")
        if args.workers == 0 and not args.zmq_bind:
            raise LaunchError("--workers 0 (no HTTP) needs --zmq-bind, or nothing could reach the server")
        if args.zmq_bind and not args.zmq_bind.startswith(("tcp://", "ipc://")):
            raise LaunchError(f"--zmq-bind must be a tcp:// or ipc:// address, got {args.zmq_bind!r}")
        if args.workers:
            check_port_free(args.host, args.port, "--port")
        if args.metrics_port is not None:
            check_port_free(args.host, args.metrics_port, "--metrics-port")
        from fastdeploy.model_store import resolve_model

        model_path = resolve_model(args.model)
    except (ValueError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    launcher = Launcher(args)
    logger.info("run directory %s", launcher.run_dir)
    print(f"[fastdeploy] run directory {launcher.run_dir}", file=sys.stderr, flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        launcher.stop_signal = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        launch(launcher, args, engine_args, model_path)
        launcher.supervise()
        _say(f"stopping on signal {launcher.stop_signal}")
    except ChildDied as died:
        _say(f"error: {died}; stopping all processes")
        launcher.announce_death(died)
        code = 1
    except LaunchError as exc:
        _say(f"error: {exc}")
        code = 1
    finally:
        launcher.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
