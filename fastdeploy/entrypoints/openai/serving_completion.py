"""POST /v1/completions: prompt as str, list of str, token ids or list of token id lists."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.openai.protocol import ApiError, ParsedRequest, parse_completion
from fastdeploy.entrypoints.openai.serving_common import (ChoiceState, ChunkSource, SseWriter, UsageTracker,
                                                          choice_index, now, peek_first, serve)


async def completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, parse_completion, "cmpl", _stream, _complete)


def _completion_logprobs(entries: list[wire.LogprobEntry], offset: int = 0,
                         prompt: list[wire.LogprobEntry] | None = None) -> dict[str, Any]:
    """OpenAI's legacy logprobs object. With `prompt` (echo), its tokens come first, the first of
    them with null logprob and alternatives since nothing predicts it."""
    listed = (prompt or []) + entries
    offsets, pos = [], offset
    for e in listed:
        offsets.append(pos)
        pos += len(e.token)
    logprobs: list[float | None] = [e.logprob for e in listed]
    tops: list[dict[str, float] | None] = [dict(e.top) for e in listed]
    if prompt:
        logprobs[0] = tops[0] = None
    return {"tokens": [e.token for e in listed], "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _finish(parsed: ParsedRequest, reason: str | None) -> str | None:
    """A score-only request ends at its max_tokens of 0, whatever stopped the dropped token."""
    return "length" if parsed.score_only and reason in ("stop", "length") else reason


def _prompt_text(parsed: ParsedRequest, index: int, n: int) -> str:
    if parsed.echo_texts is not None:
        return parsed.echo_texts[index // n]
    prompt = parsed.prompts[index // n]
    return prompt if isinstance(prompt, str) else ""


async def _complete(parsed: ParsedRequest, sub: ChunkSource) -> web.Response:
    n = parsed.params.n
    choices = [ChoiceState() for _ in range(len(sub.request_ids) * n)]
    usage = UsageTracker(count_output=not parsed.score_only)
    async for chunk in sub.chunks():
        choices[choice_index(sub.request_ids, chunk, n)].add(chunk)
        usage.add(chunk)
    out = []
    for i, c in enumerate(choices):
        generated, entries, token_ids = "".join(c.text), c.logprobs, c.token_ids
        if parsed.score_only:
            generated, entries, token_ids = "", [], []
        text = _prompt_text(parsed, i, n) + generated if parsed.echo else generated
        logprobs = _completion_logprobs(entries, prompt=c.prompt_logprobs) if parsed.logprobs else None
        item: dict[str, Any] = {"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": _finish(parsed, c.finish_reason)}
        reasoning = "".join(c.reasoning)
        if reasoning:
            item["reasoning_content"] = reasoning
        if parsed.return_token_ids:
            item["prompt_token_ids"] = usage.prompt_token_ids.get(sub.request_ids[i // n])
            item["completion_token_ids"] = token_ids
        out.append(item)
    body = {"id": sub.response_id, "object": "text_completion", "created": now(), "model": parsed.model,
            "choices": out, "usage": usage.usage()}
    return web.json_response(body)


async def _stream(request: web.Request, parsed: ParsedRequest, sub: ChunkSource) -> web.StreamResponse:
    chunks = await peek_first(sub.chunks())
    sse = SseWriter(request)
    await sse.start()
    rid, created, n = sub.response_id, now(), parsed.params.n
    usage = UsageTracker(count_output=not parsed.score_only)
    sent_chars: dict[int, int] = {}  # per choice, text sent so far: where text_offset continues
    try:
        async for chunk in chunks:
            usage.add(chunk)
            index = choice_index(sub.request_ids, chunk, n)
            text, entries, token_ids, prompt_lps = chunk.text, chunk.logprobs or [], chunk.token_ids, None
            if parsed.score_only:
                text, entries, token_ids = "", [], []
            if parsed.echo and index not in sent_chars:  # the prompt goes first, in the choice's first chunk
                text, prompt_lps = _prompt_text(parsed, index, n) + text, chunk.prompt_logprobs
            offset = sent_chars.get(index, 0)
            sent_chars[index] = offset + len(text)
            logprobs = _completion_logprobs(entries, offset, prompt_lps) if parsed.logprobs else None
            choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": _finish(parsed, chunk.finish_reason),
                                      "arrival_time": round(time.time() - sub.arrival, 6)}
            if chunk.reasoning:
                choice["reasoning_content"] = chunk.reasoning
            if parsed.return_token_ids:
                choice["token_ids"] = token_ids
                if chunk.prompt_token_ids is not None:
                    choice["prompt_token_ids"] = chunk.prompt_token_ids
            body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                    "model": parsed.model, "choices": [choice]}
            if parsed.continuous_usage:
                body["usage"] = usage.usage()
            await sse.send(body)
    except ApiError as exc:
        await sse.error(exc)
        return await sse.done()
    if parsed.include_usage:
        await sse.send({"id": rid, "object": "text_completion", "created": created, "model": parsed.model,
                        "choices": [], "usage": usage.usage()})
    return await sse.done()
