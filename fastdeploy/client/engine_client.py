"""EngineClient: use a running server from another service over ZeroMQ, without HTTP.

The server must run with `--zmq-bind ADDR` (docs/embedding.md). Both forms speak the same wire
frames the api workers use (fastdeploy.entrypoints.wire, msgspec, versioned):

    with EngineClient("tcp://127.0.0.1:8189") as client:          # blocking
        for chunk in client.submit("Hello", sampling_params={"max_tokens": 32}):
            print(chunk.text, end="")

    async with AsyncEngineClient("tcp://127.0.0.1:8189") as client:  # asyncio
        stream = await client.submit(messages=[{"role": "user", "content": "Hi"}])
        async for chunk in stream:
            ...

A stream yields `wire.TextChunk`s (new text, token ids, finish_reason on the last chunk of each
choice) and raises EngineClientError when the server reports an error. Stopping early (break,
`stream.abort()`, closing the client) aborts the request in the engine and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from fastdeploy.engine.protocol import AbortRequests
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.entrypoints import wire

VERSION_PART = str(wire.SCHEMA_VERSION).encode()


class EngineClientError(Exception):
    """The server refused or failed a request; `status` follows HTTP (400 bad value, 409 duplicate id,
    503 server going away), `param` names the offending field when there is one."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 request_id: str = "") -> None:
        super().__init__(f"{status} {code or 'error'}: {message}")
        self.status, self.message, self.code, self.param, self.request_id = status, message, code, param, request_id


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestResult:
    """A whole request, gathered from its chunks (what `generate` returns)."""

    request_id: str
    choices: list[ChoiceResult]
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.choices[0].text


def build_request(prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                  prompt_token_ids: list[int] | None = None,
                  sampling_params: SamplingParams | dict[str, Any] | None = None, request_id: str | None = None,
                  enable_thinking: bool | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                  return_prompt_token_ids: bool = False) -> wire.GenerateRequest:
    """The frame for one request; raises ValueError (SamplingParamsError names the field) on bad input."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages),
                                  ("prompt_token_ids", prompt_token_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if sampling_params is None:
        params = SamplingParams()
    elif isinstance(sampling_params, dict):
        params = SamplingParams(**sampling_params)
    elif isinstance(sampling_params, SamplingParams):
        params = sampling_params
    else:
        raise ValueError(f"sampling_params must be a SamplingParams or a dict, got {type(sampling_params).__name__}")
    rid = request_id if request_id is not None else uuid.uuid4().hex
    if not isinstance(rid, str) or not rid:
        raise ValueError("request_id must be a non-empty string")
    return wire.GenerateRequest(
        request_id=rid, reply_to="", sampling_params=params, prompt=prompt,
        prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None, messages=messages,
        chat_template_kwargs=chat_template_kwargs, add_special_tokens=prompt is not None, arrival_time=time.time(),
        enable_thinking=enable_thinking, return_prompt_token_ids=return_prompt_token_ids)


def gather(request_id: str, n: int, chunks: list[wire.TextChunk]) -> RequestResult:
    result = RequestResult(request_id, [ChoiceResult(i) for i in range(n)])
    for chunk in chunks:
        choice = result.choices[chunk.index]
        choice.text += chunk.text
        choice.reasoning += chunk.reasoning
        choice.token_ids.extend(chunk.token_ids)
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        result.num_prompt_tokens = chunk.num_prompt_tokens
        result.num_cached_tokens = max(result.num_cached_tokens, chunk.num_cached_tokens)
    return result


class _StreamState:
    """What the reader knows about one request: chunks not yet consumed and choices still open."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.n = n
        self.remaining = n
        self.items: deque[wire.TextChunk | EngineClientError] = deque()
        self.finished = False
        """True once the last chunk or an error was queued: nothing more will come."""

    def put(self, item: wire.TextChunk | EngineClientError) -> None:
        self.items.append(item)
        if isinstance(item, EngineClientError):
            self.finished = True
        elif item.finish_reason is not None:
            self.remaining -= 1
            self.finished = self.remaining <= 0


class _Demux:
    """Reply messages → the streams they belong to (shared by the blocking and asyncio clients)."""

    def __init__(self) -> None:
        self.streams: dict[str, _StreamState] = {}
        self.unattributed: list[EngineClientError] = []
        """Errors with no request id (the server could not read a message): kept for inspection."""

    def dispatch(self, parts: list[bytes]) -> set[str]:
        """Route one reply; returns the request ids that got something."""
        frame = wire.decode(parts[-1]) if len(parts) == 2 and parts[0] == VERSION_PART else None
        touched: set[str] = set()
        if isinstance(frame, wire.TextBatch):
            for chunk in frame.chunks:
                state = self.streams.get(chunk.request_id)
                if state is not None:
                    state.put(chunk)
                    touched.add(chunk.request_id)
        elif isinstance(frame, wire.ErrorFrame):
            err = EngineClientError(frame.status, frame.message, frame.code, frame.param, frame.request_id)
            state = self.streams.get(frame.request_id)
            if state is None:
                self.unattributed.append(err)
            else:
                state.put(err)
                touched.add(frame.request_id)
        return touched

    def open(self, request_id: str, n: int) -> _StreamState:
        if request_id in self.streams:
            raise ValueError(f"request_id {request_id!r} is already in flight on this client")
        state = self.streams[request_id] = _StreamState(request_id, n)
        return state


def _next_item(state: _StreamState) -> wire.TextChunk:
    item = state.items.popleft()
    if isinstance(item, EngineClientError):
        raise item
    return item


# ---- blocking ---------------------------------------------------------------------------------
class RequestStream:
    """Iterator over one request's chunks (blocking client)."""

    def __init__(self, client: "EngineClient", state: _StreamState) -> None:
        self._client = client
        self._state = state
        self.request_id = state.request_id

    def __iter__(self) -> Iterator[wire.TextChunk]:
        try:
            while True:
                if not self._state.items:
                    if self._state.finished:
                        return
                    self._client._pump(self._state)
                    continue
                yield _next_item(self._state)
        finally:
            self.close()

    def abort(self) -> None:
        """Stop generating; the stream still ends with finish_reason "abort" for each open choice."""
        if not self._state.finished:
            self._client.abort(self.request_id)

    def close(self) -> None:
        """Forget the request (aborting it when it is still running)."""
        self.abort()
        self._client._demux.streams.pop(self.request_id, None)


class EngineClient:
    """Blocking client. Thread-safe: any thread may iterate any stream; one reads the socket at a time.

    `timeout` (seconds) bounds each wait for the next chunk; TimeoutError when it passes.
    """

    def __init__(self, address: str, *, timeout: float | None = 300.0) -> None:
        self.address = address
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)
        self._demux = _Demux()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()

    def submit(self, prompt: str | None = None, **kwargs: Any) -> RequestStream:
        """Send one request (see build_request for the arguments); iterate the result for its chunks."""
        req = build_request(prompt, **kwargs)
        state = self._demux.open(req.request_id, req.sampling_params.n)
        self._send(req)
        return RequestStream(self, state)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> RequestResult:
        stream = self.submit(prompt, **kwargs)
        chunks = list(stream)
        return gather(stream.request_id, stream._state.n, chunks)

    def abort(self, *request_ids: str) -> None:
        self._send(AbortRequests(request_ids=list(request_ids)))

    def close(self) -> None:
        open_ids = [rid for rid, s in self._demux.streams.items() if not s.finished]
        if open_ids:
            self.abort(*open_ids)
        self._demux.streams.clear()
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, frame: wire.Frame) -> None:
        with self._send_lock:
            self._sock.send_multipart([VERSION_PART, wire.encode(frame)])

    def _pump(self, waiting: _StreamState) -> None:
        """Read replies until `waiting` has something (other streams' chunks are queued for them)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._lock:
            while not waiting.items:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if left == 0.0 or not self._sock.poll(None if left is None else int(left * 1000) + 1):
                    raise TimeoutError(f"no reply for request {waiting.request_id!r} within {self.timeout}s")
                self._demux.dispatch(self._sock.recv_multipart())


# ---- asyncio ----------------------------------------------------------------------------------
class AsyncRequestStream:
    """Async iterator over one request's chunks."""

    def __init__(self, client: "AsyncEngineClient", state: _StreamState) -> None:
        self._client = client
        self._state = state
        self._wake = asyncio.Event()
        self.request_id = state.request_id

    async def __aiter__(self) -> AsyncIterator[wire.TextChunk]:
        try:
            while True:
                if not self._state.items:
                    if self._state.finished:
                        return
                    self._wake.clear()
                    await asyncio.wait_for(self._wake.wait(), self._client.timeout)
                    continue
                yield _next_item(self._state)
        finally:
            await self.close()

    async def abort(self) -> None:
        if not self._state.finished:
            await self._client.abort(self.request_id)

    async def close(self) -> None:
        await self.abort()
        self._client._demux.streams.pop(self.request_id, None)
        self._client._wakers.pop(self.request_id, None)


class AsyncEngineClient:
    """asyncio client: one reader task routes replies to the streams; `timeout` bounds each wait."""

    def __init__(self, address: str, *, timeout: float | None = 300.0) -> None:
        self.address = address
        self.timeout = timeout
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)
        self._demux = _Demux()
        self._wakers: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None

    async def submit(self, prompt: str | None = None, **kwargs: Any) -> AsyncRequestStream:
        req = build_request(prompt, **kwargs)
        state = self._demux.open(req.request_id, req.sampling_params.n)
        stream = AsyncRequestStream(self, state)
        self._wakers[req.request_id] = stream._wake
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop())
        await self._sock.send_multipart([VERSION_PART, wire.encode(req)])
        return stream

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> RequestResult:
        stream = await self.submit(prompt, **kwargs)
        chunks = [chunk async for chunk in stream]
        return gather(stream.request_id, stream._state.n, chunks)

    async def abort(self, *request_ids: str) -> None:
        await self._sock.send_multipart([VERSION_PART, wire.encode(AbortRequests(request_ids=list(request_ids)))])

    async def close(self) -> None:
        open_ids = [rid for rid, s in self._demux.streams.items() if not s.finished]
        if open_ids:
            await self.abort(*open_ids)
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._demux.streams.clear()
        self._sock.close()
        self._ctx.term()

    async def __aenter__(self) -> "AsyncEngineClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        while True:
            parts = await self._sock.recv_multipart()
            for rid in self._demux.dispatch(parts):
                waker = self._wakers.get(rid)
                if waker is not None:
                    waker.set()
