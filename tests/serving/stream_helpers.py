"""Concurrent streaming clients shared by the serving tests (aiohttp, real sockets)."""
from __future__ import annotations

import asyncio
import json


async def _stream_one(session, url: str, i: int) -> tuple[int, int]:
    body = {"messages": [{"role": "user", "content": f"Tell me about the number {i}."}], "max_tokens": 6 + i % 5,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    tokens, usage = 0, None
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                tokens += len(choice["delta"].get("token_ids", []))
    assert usage is not None
    assert usage["completion_tokens"] == tokens
    return tokens, body["max_tokens"]


def run_concurrent_streams(url: str, count: int = 32) -> None:
    import aiohttp

    async def main() -> list[tuple[int, int]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            return await asyncio.gather(*[_stream_one(session, url, i) for i in range(count)])

    results = asyncio.run(main())
    assert len(results) == count
    assert all(1 <= tokens <= limit for tokens, limit in results)
