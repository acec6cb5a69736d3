"""POST /tokenize and /detokenize, as vLLM serves them: the served model's tokenizer and chat
template, so a client can count a prompt's tokens (the same count `usage.prompt_tokens` reports)
or read ids back as text. The api worker's own tokenizer does the work, in a thread, so a long
text does not stall the event loop."""
from __future__ import annotations

import asyncio

from aiohttp import web

from fastdeploy.entrypoints.openai.http_app import WORKER_KEY, read_json
from fastdeploy.entrypoints.openai.protocol import ApiError, TokenizeRequest, parse_detokenize, parse_tokenize
from fastdeploy.input.prompt_ids import PromptError, chat_prompt
from fastdeploy.input.tokenizer import Tokenizer


def _encode(tok: Tokenizer, req: TokenizeRequest) -> list[int]:
    if req.messages is None:
        return tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
    text, ids = chat_prompt(tok, req.messages, req.chat_template_kwargs,
                            add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message)
    return tok.encode(text, add_special_tokens=True) if req.add_special_tokens else ids


async def tokenize(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    req = parse_tokenize(await read_json(request), worker.model)
    async with worker.admit():
        tok = await worker.tokenizer()
        try:
            ids = await asyncio.to_thread(_encode, tok, req)  # type: ignore[arg-type]
        except PromptError as exc:
            raise ApiError(400, str(exc), exc.param) from None
        strs = None
        if req.return_token_strs:
            strs = [tok.decode([t], skip_special_tokens=False) for t in ids]  # type: ignore[attr-defined]
    return web.json_response({"count": len(ids), "max_model_len": worker.model.max_model_len, "tokens": ids,
                              "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    ids = parse_detokenize(await read_json(request), worker.model)
    async with worker.admit():
        tok = await worker.tokenizer()
        text = await asyncio.to_thread(tok.decode, ids, skip_special_tokens=False)  # type: ignore[attr-defined]
    return web.json_response({"prompt": text})
