"""ZeroMQ gateway: the serving pipeline for services that do not speak HTTP (`--zmq-bind ADDR`).

A ROUTER socket at the address the user chose takes the same msgspec frames the api workers send
(GenerateRequest, AbortRequests) from any number of DEALER peers, each message as two parts:
`[schema version (ASCII), frame]`. Replies go back the same way: TextBatch frames whose chunks
carry the caller's own request ids, and an ErrorFrame when a request fails. A message that does
not decode, or speaks another schema version, gets an ErrorFrame with status 400 (request_id
empty) and nothing else happens. See docs/embedding.md; `fastdeploy.client.EngineClient` wraps it.

Pipeline ids are the gateway's own ("zmq-<random>"); the caller's id travels as the engine's
client id, so two requests with the same id are refused (409) wherever they came from. A caller
that disappears (ROUTER_MANDATORY reports it unreachable) has its requests aborted, so its KV
blocks are freed.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Union

import msgspec
import zmq

from fastdeploy.engine.protocol import AbortRequests
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.runtime import RunSpec, child_setup, read_spec, report

logger = logging.getLogger("fastdeploy")

VERSION_PART = str(wire.SCHEMA_VERSION).encode()
MAX_CLIENT_ID_CHARS = 256

ClientFrame = Union[wire.GenerateRequest, AbortRequests]
"""What a caller may send; anything else is answered with an error."""
_client_decoder = msgspec.msgpack.Decoder(ClientFrame)


class BadFrame(ValueError):
    def __init__(self, message: str, code: str = "bad_frame", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def decode_client_message(parts: list[bytes]) -> ClientFrame:
    """[version, frame] → the frame; BadFrame says what is wrong (version, shape, schema, values)."""
    if len(parts) != 2:
        raise BadFrame(f"expected a 2-part message [schema version, frame], got {len(parts)} parts")
    version, payload = parts
    if version != VERSION_PART:
        shown = version[:16].decode("ascii", "replace")
        raise BadFrame(f"schema version {shown!r} is not supported; this server speaks version "
                       f"{wire.SCHEMA_VERSION}", code="unsupported_schema_version")
    try:
        frame = _client_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise BadFrame(f"the frame does not decode as a GenerateRequest or AbortRequests: {exc}") from None
    if isinstance(frame, wire.GenerateRequest):
        rid = frame.request_id
        if not rid or len(rid) > MAX_CLIENT_ID_CHARS:
            raise BadFrame(f"request_id must be 1..{MAX_CLIENT_ID_CHARS} characters", "invalid_value", "request_id")
    return frame


@dataclass
class _Flight:
    """One caller request in the pipeline."""

    identity: bytes
    client_id: str
    pipeline_id: str
    n: int
    remaining: int
    """Choices without a finish_reason yet."""


class Gateway:
    def __init__(self, spec: RunSpec, ctx: zmq.Context) -> None:
        self.spec = spec
        self.reply_addr = spec.gateway_addr
        self.flights: dict[str, _Flight] = {}
        """pipeline id → flight."""
        self.by_client: dict[str, str] = {}
        """caller's request id → pipeline id (ids are unique among requests in flight)."""
        self.dead: str | None = None
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, 100000)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(spec.zmq_bind or "")
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.bind(self.reply_addr)
        self.to_tokenizers = ctx.socket(zmq.PUSH)
        for addr in spec.tokenizer_addrs:
            self.to_tokenizers.connect(addr)
        self.to_engine = ctx.socket(zmq.PUSH)
        self.to_engine.connect(spec.engine_addr)
        self.events = ctx.socket(zmq.SUB)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.connect(spec.events_addr)

    # ---- callers → pipeline -------------------------------------------------------------------
    def on_caller(self, parts: list[bytes]) -> None:
        identity, rest = parts[0], parts[1:]
        try:
            frame = decode_client_message(rest)
        except BadFrame as exc:
            logger.warning("zmq gateway: bad message from a caller: %s", exc)
            self.send(identity, wire.ErrorFrame(request_id="", status=400, message=str(exc), code=exc.code,
                                                param=exc.param))
            return
        if isinstance(frame, AbortRequests):
            self.abort([pid for cid in frame.request_ids
                        if (pid := self.by_client.get(cid)) and self.flights[pid].identity == identity])
        else:
            self.submit(identity, frame)

    def submit(self, identity: bytes, req: wire.GenerateRequest) -> None:
        cid = req.request_id
        if self.dead:
            self.send(identity, wire.ErrorFrame(request_id=cid, status=503, message=f"the server is unavailable: "
                                                f"{self.dead}", error_type="server_error",
                                                code="service_unavailable"))
            return
        if cid in self.by_client:
            self.send(identity, wire.ErrorFrame(request_id=cid, status=409, param="request_id",
                                                code="duplicate_request_id",
                                                message=f"request_id {cid!r} is already in flight"))
            return
        pid = f"zmq-{os.urandom(12).hex()}"
        self.flights[pid] = _Flight(identity, cid, pid, n=req.sampling_params.n,
                                     remaining=req.sampling_params.n)
        self.by_client[cid] = pid
        forwarded = msgspec.structs.replace(req, request_id=pid, reply_to=self.reply_addr, client_id=cid)
        self.to_tokenizers.send(wire.encode(forwarded))

    def abort(self, pipeline_ids: list[str]) -> None:
        """Ask the engine to stop; each running choice still ends with a finish_reason "abort" chunk.
        Aborting a choice that already finished is a no-op in the engine."""
        children = [c for pid in pipeline_ids for c in wire.child_ids(pid, self.flights[pid].n)]
        if children:
            self.to_engine.send(wire.encode(AbortRequests(request_ids=children)))

    # ---- pipeline → callers -------------------------------------------------------------------
    def on_reply(self, frame: wire.Frame | None) -> None:
        if isinstance(frame, wire.TextBatch):
            out: dict[bytes, list[wire.TextChunk]] = {}
            for chunk in frame.chunks:
                flight = self.flights.get(chunk.request_id)
                if flight is None:
                    continue
                out.setdefault(flight.identity, []).append(msgspec.structs.replace(chunk, request_id=flight.client_id))
                if chunk.finish_reason is not None:
                    flight.remaining -= 1
                    if flight.remaining <= 0:
                        self.forget(flight)
            for identity, chunks in out.items():
                self.send(identity, wire.TextBatch(chunks=chunks))
        elif isinstance(frame, wire.ErrorFrame):
            flight = self.flights.get(wire.parent_id(frame.request_id)[0]) or self.flights.get(frame.request_id)
            if flight is not None:
                self.forget(flight)
                self.send(flight.identity, msgspec.structs.replace(frame, request_id=flight.client_id))

    def on_event(self, frame: wire.Frame | None) -> None:
        if isinstance(frame, wire.ProcessDied):
            self.dead = f"{frame.name} (pid {frame.pid}) exited with code {frame.exitcode}"
            logger.error("zmq gateway: %s; failing %d requests", self.dead, len(self.flights))
            for flight in list(self.flights.values()):
                self.forget(flight)
                self.send(flight.identity, wire.ErrorFrame(
                    request_id=flight.client_id, status=503, error_type="server_error",
                    message=f"the server is shutting down: {self.dead}", code="service_unavailable"))

    def forget(self, flight: _Flight) -> None:
        self.flights.pop(flight.pipeline_id, None)
        self.by_client.pop(flight.client_id, None)

    def send(self, identity: bytes, frame: wire.Frame) -> None:
        try:
            self.router.send_multipart([identity, VERSION_PART, wire.encode(frame)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            # The caller is gone (or stopped reading): stop generating for it.
            gone = [f for f in self.flights.values() if f.identity == identity]
            logger.warning("zmq gateway: a caller is unreachable (%s); aborting its %d requests", exc, len(gone))
            self.abort([f.pipeline_id for f in gone])
            for flight in gone:
                self.forget(flight)

    # ---- loop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self.router, self.inbox, self.events):
            poller.register(sock, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.inbox in ready:
                self.on_reply(wire.decode(self.inbox.recv()))
            if self.router in ready:
                self.on_caller(self.router.recv_multipart())
            if self.events in ready:
                self.on_event(wire.decode(self.events.recv()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastdeploy ZeroMQ gateway (started by the api server)")
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    child_setup("zmq-gateway")
    try:
        gateway = Gateway(spec, zmq.Context.instance())
    except Exception as exc:  # noqa: BLE001 - e.g. the address is taken: the launcher says so and stops
        logger.exception("zmq-gateway failed to start")
        report(spec, wire.Failed(name="zmq-gateway", pid=os.getpid(),
                                 message=f"cannot bind --zmq-bind {spec.zmq_bind}: {type(exc).__name__}: {exc}"))
        return 1
    report(spec, wire.Ready(name="zmq-gateway", pid=os.getpid()))
    logger.info("zmq-gateway serving on %s", spec.zmq_bind)
    gateway.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
