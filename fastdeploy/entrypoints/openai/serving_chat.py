"""POST /v1/chat/completions: OpenAI chat schema plus FastDeploy's fields (arrival_time,
reasoning_content, token_ids in deltas, prompt_token_ids, cached_tokens in usage)."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.openai.protocol import ApiError, ParsedRequest, parse_chat
from fastdeploy.entrypoints.openai.serving_common import (ChoiceState, ChunkSource, SseWriter, UsageTracker, now,
                                                          peek_first, serve)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, parse_chat, "chatcmpl", _stream, _complete)


def _chat_logprobs(entries: list[wire.LogprobEntry]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


async def _complete(parsed: ParsedRequest, sub: ChunkSource) -> web.Response:
    choices = [ChoiceState() for _ in range(parsed.params.n)]
    usage = UsageTracker()
    async for chunk in sub.chunks():
        choices[chunk.index].add(chunk)
        usage.add(chunk)
    out = []
    for i, c in enumerate(choices):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text)}
        reasoning = "".join(c.reasoning)
        message["reasoning_content"] = reasoning or None
        if parsed.return_token_ids:
            message["prompt_token_ids"] = usage.prompt_token_ids.get(sub.request_ids[0])
            message["completion_token_ids"] = c.token_ids
        out.append({"index": i, "message": message, "logprobs": _chat_logprobs(c.logprobs) if parsed.logprobs else None,
                    "finish_reason": c.finish_reason})
    body = {"id": sub.response_id, "object": "chat.completion", "created": now(), "model": parsed.model, "choices": out,
            "usage": usage.usage()}
    return web.json_response(body)


async def _stream(request: web.Request, parsed: ParsedRequest, sub: ChunkSource) -> web.StreamResponse:
    chunks = await peek_first(sub.chunks())
    sse = SseWriter(request)
    await sse.start()
    rid = sub.response_id
    created = now()
    usage = UsageTracker()

    def frame(choices: list[dict[str, Any]], with_usage: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": parsed.model, "choices": choices}
        if with_usage:
            body["usage"] = usage.usage()
        return body

    for i in range(parsed.params.n):
        first: dict[str, Any] = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None, "arrival_time": 0.0}
        await sse.send(frame([first]))
    try:
        async for chunk in chunks:
            usage.add(chunk)
            delta: dict[str, Any] = {"content": chunk.text}
            if chunk.reasoning:
                delta["reasoning_content"] = chunk.reasoning
            if parsed.return_token_ids:
                delta["token_ids"] = chunk.token_ids
                if chunk.prompt_token_ids is not None:
                    delta["prompt_token_ids"] = chunk.prompt_token_ids
            choice = {"index": chunk.index, "delta": delta,
                      "logprobs": _chat_logprobs(chunk.logprobs or []) if parsed.logprobs else None,
                      "finish_reason": chunk.finish_reason, "arrival_time": round(time.time() - sub.arrival, 6)}
            await sse.send(frame([choice], with_usage=parsed.continuous_usage))
    except ApiError as exc:
        await sse.error(exc)
        return await sse.done()
    if parsed.include_usage:
        await sse.send(frame([], with_usage=True))
    return await sse.done()
