"""The engine process: owns one EngineCore and runs the busy loop of the serving pipeline.

Loop: drain every pending input frame (EngineRequest / AbortRequests) → step → split the columnar
StepOutput by destination (each request's reply_to, a detokenizer) and send one frame per
destination per step. Metrics are counted here, where every request of every api worker passes,
and served by a small HTTP thread on the metrics port.

Started by the launcher: `python -m fastdeploy.engine.engine_process --spec <run spec>`.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback

import zmq

from fastdeploy.engine.protocol import AbortRequests, EngineRequest, StepOutput
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.runtime import PushCache, RunSpec, child_setup, read_spec, report

logger = logging.getLogger("fastdeploy")

NAME = "engine"
_IDLE_POLL_MS = 250
"""How long an idle engine blocks waiting for input before refreshing its gauges."""
_STATS_EVERY_S = 0.1


def split_step_output(out: StepOutput, dest_of: dict[str, str]) -> dict[str, StepOutput]:
    """One StepOutput per destination address, keeping the columnar layout and the row order."""
    rows: dict[str, list[int]] = {}
    for i, rid in enumerate(out.request_ids):
        rows.setdefault(dest_of.get(rid, ""), []).append(i)
    if len(rows) == 1:
        return {next(iter(rows)): out}

    def pick(column: list, idx: list[int]) -> list:
        return [column[i] for i in idx] if column else []

    return {
        dest: StepOutput(
            request_ids=pick(out.request_ids, idx), new_token_ids=pick(out.new_token_ids, idx),
            finish_reasons=pick(out.finish_reasons, idx), num_prompt_tokens=pick(out.num_prompt_tokens, idx),
            num_cached_tokens=pick(out.num_cached_tokens, idx), logprobs=pick(out.logprobs, idx),
            first_scheduled_times=pick(out.first_scheduled_times, idx),
            error_messages=pick(out.error_messages, idx), step_time=out.step_time,
            prompt_logprobs=pick(out.prompt_logprobs, idx))
        for dest, idx in rows.items()
    }


class EngineProcess:
    def __init__(self, spec: RunSpec, core: object, metrics: object) -> None:
        from fastdeploy.engine.engine_core import EngineCore
        from fastdeploy.metrics import EngineMetrics

        self.spec = spec
        self.core: EngineCore = core  # type: ignore[assignment]
        self.metrics: EngineMetrics = metrics  # type: ignore[assignment]
        self.ctx = zmq.Context.instance()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(spec.engine_addr)
        self.outboxes = PushCache(self.ctx)
        self.dest_of: dict[str, str] = {}
        """request id → detokenizer address, until the request's final row is sent."""
        self._last_stats = 0.0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        while True:
            busy = self.core.has_unfinished_requests()
            if dict(poller.poll(0 if busy else _IDLE_POLL_MS)):
                self._drain()
            out = self.core.step() if self.core.has_unfinished_requests() else None
            if out is not None:
                self._emit(out)
            now = time.monotonic()
            if now - self._last_stats >= _STATS_EVERY_S or out is None:
                self._last_stats = now
                self.metrics.on_stats(self.core.stats())

    def _drain(self) -> None:
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            frame = wire.decode(data)
            if isinstance(frame, EngineRequest):
                self._add(frame)
            elif isinstance(frame, AbortRequests):
                self.core.abort_requests(frame.request_ids)
            elif frame is not None:
                logger.error("engine: unexpected frame %s", type(frame).__name__)

    def _add(self, req: EngineRequest) -> None:
        try:
            self.core.add_request(req)
        except ValueError as exc:
            self.outboxes.send(req.reply_to, wire.ErrorFrame(
                request_id=req.request_id, status=getattr(exc, "status", 400), message=str(exc),
                param=getattr(exc, "param", None), code=getattr(exc, "code", "invalid_value")))
            return
        self.dest_of[req.request_id] = req.reply_to
        self.metrics.on_request(req.request_id, req.arrival_time)

    def _emit(self, out: StepOutput) -> None:
        self.metrics.on_step(out)
        for dest, part in split_step_output(out, self.dest_of).items():
            self.outboxes.send(dest, part)
        for rid, reason in zip(out.request_ids, out.finish_reasons):
            if reason is not None:
                self.dest_of.pop(rid, None)

    def fail_all(self, message: str) -> None:
        """The loop crashed: every in-flight request gets its terminal error before we exit."""
        for rid, dest in list(self.dest_of.items()):
            self.outboxes.send(dest, wire.ErrorFrame(request_id=rid, status=500, message=message,
                                                     error_type="server_error", code="engine_error"))
        self.dest_of.clear()


def _start_metrics_server(spec: RunSpec, metrics: object) -> int:
    from prometheus_client import start_http_server

    server, _ = start_http_server(spec.metrics_port, spec.metrics_host, registry=metrics.registry)  # type: ignore
    return int(server.server_port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastdeploy engine process (started by the api server)")
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    child_setup(NAME)
    try:
        from fastdeploy.engine.args import EngineArgs
        from fastdeploy.engine.engine_core import EngineCore
        from fastdeploy.metrics import EngineMetrics

        core = EngineCore(EngineArgs(**spec.engine_args).create_engine_config())
        metrics = EngineMetrics()
        process = EngineProcess(spec, core, metrics)
        metrics_port = _start_metrics_server(spec, metrics)
        # Paddle installs its own SIGTERM handler (a stack dump); a requested stop is not a crash.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    except Exception as exc:  # noqa: BLE001 - any start failure must reach the launcher as text
        logger.exception("engine failed to start")
        report(spec, wire.Failed(name=NAME, pid=os.getpid(), message=f"{type(exc).__name__}: {exc}"))
        return 1
    report(spec, wire.Ready(name=NAME, pid=os.getpid(), max_model_len=core.max_model_len,
                            eos_token_ids=list(core.eos_token_ids), vocab_size=int(core.vocab_size),
                            served_model_name=spec.served_model_name, num_blocks=core.stats().num_blocks,
                            metrics_port=metrics_port))
    logger.info("engine ready: max_model_len=%d, %d KV blocks", core.max_model_len, core.stats().num_blocks)
    try:
        process.run()
    except Exception as exc:  # noqa: BLE001
        logger.error("engine loop crashed: %s\n%s", exc, traceback.format_exc())
        process.fail_all(f"engine error: {type(exc).__name__}: {exc}")
        process.outboxes.close(linger_ms=2000)
        report(spec, wire.Failed(name=NAME, pid=os.getpid(), message=f"engine loop crashed: {exc}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
