"""The api worker: aiohttp app on uvloop, talking to the pipeline over ZeroMQ.

Several api workers share one port (SO_REUSEPORT). Each owns a PULL socket (its reply address)
where detokenizers and tokenizers send TextBatch / ErrorFrame for the requests it submitted, and
listens to the launcher's events so a dead pipeline process turns /health to 503 and fails the
requests in flight instead of leaving them hanging.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import zmq
import zmq.asyncio
from aiohttp import web

from fastdeploy.engine.protocol import AbortRequests
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.openai.protocol import ApiError, ModelContext, ParsedRequest, error_body
from fastdeploy.entrypoints.runtime import RunSpec, child_setup, read_spec, report

logger = logging.getLogger("fastdeploy")

WORKER_KEY: web.AppKey["ApiWorker"] = web.AppKey("worker")


class Submission:
    """The queue of one HTTP request's chunks and the engine ids to abort if it ends early."""

    def __init__(self, request_ids: list[str], n: int, kind: str = "completion",
                 response_id: str | None = None) -> None:
        self.request_ids = request_ids
        """Pipeline ids, one per prompt: unique by construction, whatever the client sends."""
        self.response_id = response_id or request_ids[0]
        """The response's `id`: the client's request_id when it gave one."""
        self.kind = kind
        self.n = n
        self.queue: asyncio.Queue[wire.TextChunk | wire.ErrorFrame] = asyncio.Queue()
        self.remaining = len(request_ids) * n
        self.arrival = time.time()

    async def chunks(self) -> AsyncIterator[wire.TextChunk]:
        """Every chunk until each choice has its finish_reason; raises ApiError on an error frame."""
        while self.remaining > 0:
            item = await self.queue.get()
            if isinstance(item, wire.ErrorFrame):
                self.remaining = 0
                # The engine only sees token ids; for chat the prompt the user wrote is `messages`.
                param = "messages" if item.param == "prompt" and self.kind == "chat" else item.param
                raise ApiError(item.status, item.message, param, item.code, item.error_type)
            if item.finish_reason is not None:
                self.remaining -= 1
                if item.finish_reason == "error":
                    self.remaining = 0
                    raise ApiError(500, item.error_message or "engine error", None, "engine_error")
            yield item


class ApiWorker:
    def __init__(self, spec: RunSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.name = f"api-{index}"
        info = spec.model_info
        self.model = ModelContext(served_model_name=spec.served_model_name, model=spec.engine_args.get("model", ""),
                                  max_model_len=info.max_model_len if info else 0,
                                  vocab_size=info.vocab_size if info else 0)
        self.reply_addr = spec.api_addrs[index]
        self.pending: dict[str, Submission] = {}
        self.active = 0
        self.dead: str | None = None
        """Set when a pipeline process died: /health answers 503 from then on."""
        self.ctx = zmq.asyncio.Context()
        self.to_tokenizers = self.ctx.socket(zmq.PUSH)
        for addr in spec.tokenizer_addrs:
            self.to_tokenizers.connect(addr)  # PUSH round-robins over the tokenizer workers
        self.to_engine = self.ctx.socket(zmq.PUSH)
        self.to_engine.connect(spec.engine_addr)
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(self.reply_addr)
        self.events = self.ctx.socket(zmq.SUB)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.connect(spec.events_addr)
        self.http: aiohttp.ClientSession | None = None
        self.metrics_url = ""
        self._tokenizer: object | None = None

    def model_eos_ids(self) -> list[int]:
        return list(self.spec.model_info.eos_token_ids) if self.spec.model_info else []

    async def tokenizer(self) -> object:
        """Loaded on first use only (beam search decodes whole beams); most workers never need it."""
        if self._tokenizer is None:
            from fastdeploy.input.tokenizer import load_tokenizer

            self._tokenizer = await asyncio.to_thread(load_tokenizer, self.spec.model_path)
        return self._tokenizer

    # ---- background tasks -------------------------------------------------------------------
    async def receive_loop(self) -> None:
        while True:
            frame = wire.decode(await self.inbox.recv())
            if isinstance(frame, wire.TextBatch):
                for chunk in frame.chunks:
                    sub = self.pending.get(chunk.request_id)
                    if sub is not None:
                        sub.queue.put_nowait(chunk)
            elif isinstance(frame, wire.ErrorFrame):
                sub = self.pending.get(wire.parent_id(frame.request_id)[0]) or self.pending.get(frame.request_id)
                if sub is not None:
                    sub.queue.put_nowait(frame)

    async def event_loop(self) -> None:
        while True:
            frame = wire.decode(await self.events.recv())
            if isinstance(frame, wire.ProcessDied):
                self.dead = f"{frame.name} (pid {frame.pid}) exited with code {frame.exitcode}"
                logger.error("%s: %s; failing %d requests", self.name, self.dead, len(self.pending))
                for sub in set(self.pending.values()):
                    sub.queue.put_nowait(wire.ErrorFrame(request_id="", status=503, error_type="server_error",
                                                         message=f"the server is shutting down: {self.dead}",
                                                         code="service_unavailable"))

    # ---- requests ---------------------------------------------------------------------------
    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.dead:
            raise ApiError(503, f"the server is unavailable: {self.dead}", code="service_unavailable")
        if self.active >= self.spec.max_concurrency:
            raise ApiError(429, f"too many concurrent requests (limit {self.spec.max_concurrency} per api "
                                "worker); retry later", code="rate_limit_exceeded")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    @asynccontextmanager
    async def submit(self, prefix: str, parsed: ParsedRequest) -> AsyncIterator[Submission]:
        """Send one GenerateRequest per prompt; on an early exit (client gone, error) abort them all."""
        base = f"{prefix}-{os.urandom(12).hex()}"
        inputs: list[str | list[int] | None] = [None] if parsed.messages is not None else list(parsed.prompts)
        ids = [base if len(inputs) == 1 else f"{base}_{j}" for j in range(len(inputs))]
        client = parsed.request_id
        client_ids = [client if len(inputs) == 1 else f"{client}_{j}" for j in range(len(inputs))] if client \
            else [""] * len(inputs)
        sub = Submission(ids, parsed.params.n, parsed.kind, response_id=client)
        for rid in ids:
            self.pending[rid] = sub
        try:
            for rid, client_id, prompt in zip(ids, client_ids, inputs):
                await self.to_tokenizers.send(wire.encode(wire.GenerateRequest(
                    request_id=rid, reply_to=self.reply_addr, sampling_params=parsed.params,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=prompt if isinstance(prompt, list) else None,
                    messages=parsed.messages, chat_template_kwargs=parsed.chat_template_kwargs,
                    add_special_tokens=parsed.kind == "completion", arrival_time=sub.arrival,
                    enable_thinking=parsed.enable_thinking, return_prompt_token_ids=parsed.return_token_ids,
                    want_logprobs=parsed.logprobs, client_id=client_id,
                    add_generation_prompt=parsed.add_generation_prompt,
                    continue_final_message=parsed.continue_final_message)))
            yield sub
        finally:
            for rid in ids:
                self.pending.pop(rid, None)
            if sub.remaining > 0:
                children = [c for rid in ids for c in wire.child_ids(rid, sub.n)]
                self.to_engine.send(wire.encode(AbortRequests(request_ids=children)))


# ---- HTTP layer -----------------------------------------------------------------------------
# What --api-key protects: the API, not the probes (/health, /ping, /metrics).
_GUARDED = ("/v1/", "/tokenize", "/detokenize")


def json_error(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    try:
        worker = request.app[WORKER_KEY]
        key = worker.spec.api_key
        if key and request.path.startswith(_GUARDED) and request.headers.get("Authorization") != f"Bearer {key}":
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           error_type="authentication_error")
        return await handler(request)
    except ApiError as exc:
        return json_error(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(ApiError(413, f"request body too large: {exc.text}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(ApiError(exc.status, exc.reason or "error", code=exc.reason.lower().replace(" ", "_")))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must still answer with the OpenAI error body
        logger.exception("%s %s failed", request.method, request.path)
        return json_error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))


async def read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


async def health(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    if worker.dead:
        return web.json_response(error_body(f"unhealthy: {worker.dead}", "server_error", None,
                                            "service_unavailable"), status=503)
    return web.Response(status=200, text="")


async def ping(request: web.Request) -> web.Response:
    return await health(request)


async def models(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    m = worker.model
    card = {"id": m.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "fastdeploy",
            "root": m.model, "parent": None, "max_model_len": m.max_model_len,
            "permission": [{"id": "modelperm-0", "object": "model_permission", "allow_sampling": True,
                            "allow_logprobs": True, "allow_view": True, "organization": "*", "is_blocking": False}]}
    return web.json_response({"object": "list", "data": [card]})


async def version(request: web.Request) -> web.Response:
    from fastdeploy import __version__

    return web.json_response({"version": __version__})


async def metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    if worker.http is None or not worker.metrics_url:
        raise ApiError(503, "metrics are not available", code="service_unavailable")
    async with worker.http.get(worker.metrics_url) as resp:
        body = await resp.read()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def create_app(worker: ApiWorker) -> web.Application:
    from fastdeploy.entrypoints.openai.serving_chat import chat_completions
    from fastdeploy.entrypoints.openai.serving_completion import completions
    from fastdeploy.entrypoints.openai.serving_tokenize import detokenize, tokenize

    app = web.Application(middlewares=[error_middleware], client_max_size=worker.spec.max_request_bytes)
    app[WORKER_KEY] = worker
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", ping)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    return app


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(spec: RunSpec, index: int) -> None:
    worker = ApiWorker(spec, index)
    tasks = [asyncio.create_task(worker.receive_loop()), asyncio.create_task(worker.event_loop())]
    worker.http = aiohttp.ClientSession()
    metrics_host = "127.0.0.1" if spec.metrics_host in ("0.0.0.0", "::", "") else spec.metrics_host
    worker.metrics_url = f"http://{metrics_host}:{spec.metrics_port}/metrics" if spec.metrics_port else ""
    runner = web.AppRunner(create_app(worker), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, reuseport_socket(spec.host, spec.port))
    await site.start()
    report(spec, wire.Ready(name=worker.name, pid=os.getpid()))
    logger.info("%s serving on %s:%d", worker.name, spec.host, spec.port)
    try:
        await asyncio.gather(*tasks)
    finally:
        await worker.http.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastdeploy api worker (started by the api server)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    child_setup(f"api-{args.index}")
    try:
        import uvloop

        uvloop.run(serve(spec, args.index))
    except Exception as exc:  # noqa: BLE001
        logger.exception("api-%d failed", args.index)
        report(spec, wire.Failed(name=f"api-{args.index}", pid=os.getpid(), message=f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: serving_chat imports WORKER_KEY from it.
    from fastdeploy.entrypoints.openai import http_app

    sys.exit(http_app.main())
