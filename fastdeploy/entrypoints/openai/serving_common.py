"""What chat and completion serving share: SSE writing, usage, per-choice accumulation."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.openai.http_app import WORKER_KEY, ApiWorker, read_json
from fastdeploy.entrypoints.openai.protocol import ApiError, ModelContext, ParsedRequest


class ChunkSource(Protocol):
    """What the formatters read: a live Submission or a finished beam search result."""

    request_ids: list[str]
    response_id: str
    arrival: float

    def chunks(self) -> AsyncIterator[wire.TextChunk]: ...


@dataclass
class ChoiceState:
    """Everything known about one choice once its chunks are merged (non-streaming, usage)."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[wire.LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    prompt_logprobs: list[wire.LogprobEntry] | None = None

    def add(self, chunk: wire.TextChunk) -> None:
        self.prompt_logprobs = chunk.prompt_logprobs or self.prompt_logprobs
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs or [])
        self.finish_reason = chunk.finish_reason or self.finish_reason


@dataclass
class UsageTracker:
    """Prompt tokens are counted once per prompt (not per choice); output tokens per choice."""

    prompt_tokens: dict[str, int] = field(default_factory=dict)
    cached_tokens: dict[str, int] = field(default_factory=dict)
    output_tokens: dict[tuple[str, int], int] = field(default_factory=dict)
    prompt_token_ids: dict[str, list[int]] = field(default_factory=dict)
    count_output: bool = True
    """False where the generated tokens are not returned (ParsedRequest.score_only)."""

    def add(self, chunk: wire.TextChunk) -> None:
        self.prompt_tokens[chunk.request_id] = chunk.num_prompt_tokens
        self.cached_tokens[chunk.request_id] = max(chunk.num_cached_tokens,
                                                   self.cached_tokens.get(chunk.request_id, 0))
        self.output_tokens[(chunk.request_id, chunk.index)] = chunk.num_output_tokens
        if chunk.prompt_token_ids is not None:
            self.prompt_token_ids[chunk.request_id] = chunk.prompt_token_ids

    def usage(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.output_tokens.values()) if self.count_output else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}


def choice_index(sub_ids: list[str], chunk: wire.TextChunk, n: int) -> int:
    """Choices of prompt j are j*n .. j*n+n-1 (OpenAI's order for several prompts)."""
    return sub_ids.index(chunk.request_id) * n + chunk.index if len(sub_ids) > 1 else chunk.index


class SseWriter:
    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                    "Cache-Control": "no-cache", "Connection": "keep-alive"})

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(f"data: {data}\n\n".encode())

    async def error(self, exc: ApiError) -> None:
        await self.send(exc.body())

    async def done(self) -> web.StreamResponse:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


Parser = Callable[[Any, ModelContext], ParsedRequest]
StreamFormatter = Callable[[web.Request, ParsedRequest, "ChunkSource"], Awaitable[web.StreamResponse]]
BodyFormatter = Callable[[ParsedRequest, "ChunkSource"], Awaitable[web.Response]]


async def serve(request: web.Request, parse: Parser, id_prefix: str, stream: StreamFormatter,
                complete: BodyFormatter) -> web.StreamResponse:
    """One generation endpoint: parse, wait for admission, run (beam search or a plain submission)
    and answer as an SSE stream or one JSON body."""
    worker: ApiWorker = request.app[WORKER_KEY]
    parsed = parse(await read_json(request), worker.model)
    async with worker.admit():
        if parsed.echo and any(isinstance(p, list) for p in parsed.prompts):
            parsed.echo_texts = await _echo_texts(worker, parsed.prompts)
        if parsed.beam_width:
            from fastdeploy.entrypoints.openai.serving_beam import run_beam_search

            result = await run_beam_search(worker, parsed, id_prefix)
            return await (stream(request, parsed, result) if parsed.stream else complete(parsed, result))
        async with worker.submit(id_prefix, parsed) as sub:
            return await (stream(request, parsed, sub) if parsed.stream else complete(parsed, sub))


async def _echo_texts(worker: ApiWorker, prompts: list[str | list[int]]) -> list[str]:
    """What echo returns per prompt: the text, or a token-id prompt decoded (off the event loop)."""
    tok: Any = await worker.tokenizer()
    return await asyncio.to_thread(
        lambda: [p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in prompts])


def now() -> int:
    return int(time.time())


async def peek_first(chunks: AsyncIterator[wire.TextChunk]) -> AsyncIterator[wire.TextChunk]:
    """Wait for the first chunk before the response starts, so an early error (prompt too long,
    bad token id) is still answered with its own status code instead of inside a 200 stream."""
    first = await chunks.__anext__()

    async def rest() -> AsyncIterator[wire.TextChunk]:
        yield first
        async for chunk in chunks:
            yield chunk

    return rest()
