"""Tokenizer worker: GenerateRequest (text or messages) → EngineRequests (token ids only).

Applies the chat template, tokenizes, turns bad_words into token ids, fans n out into n engine
requests "<id>-<i>" (seed + i when seeded), registers the request with the detokenizer that owns
it (stable hash of the id) and only then submits to the engine. Anything wrong with the input
goes straight back to the api worker as a 400 ErrorFrame; length limits are the engine's to check
(it answers with a 400 ErrorFrame through the detokenizer).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import zlib

import zmq

from fastdeploy.engine.protocol import EngineRequest
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.runtime import PushCache, RunSpec, child_setup, push_socket, read_spec, report
from fastdeploy.input.bad_words import bad_words_to_token_ids
from fastdeploy.input.prompt_ids import PromptError, chat_prompt, checked_ids
from fastdeploy.input.tokenizer import Tokenizer, load_tokenizer
from fastdeploy.output.reasoning import starts_in_reasoning

logger = logging.getLogger("fastdeploy")

PROMPT_TAIL_TOKENS = 4


def detokenizer_for(request_id: str, count: int) -> int:
    """Stable across processes and runs (unlike hash()), so every stage agrees on the owner."""
    return zlib.crc32(request_id.encode()) % count


class TokenizerWorker:
    def __init__(self, spec: RunSpec, tokenizer: Tokenizer, index: int = 0) -> None:
        self.spec = spec
        self.index = index
        self.name = f"tokenizer-{index}"
        self.tokenizer = tokenizer
        self.ctx = zmq.Context.instance()
        self.engine = push_socket(self.ctx, spec.engine_addr)
        self.replies = PushCache(self.ctx)

    def handle(self, req: wire.GenerateRequest) -> None:
        try:
            ids = self.prompt_ids(req)
            params = self.resolve_params(req.sampling_params)
        except ValueError as exc:  # PromptError, SamplingParamsError: both name the param
            self.replies.send(req.reply_to, wire.ErrorFrame(
                request_id=req.request_id, status=400, message=str(exc), param=getattr(exc, "param", None),
                code="invalid_value"))
            return
        detok = self.spec.detokenizer_addrs[detokenizer_for(req.request_id, len(self.spec.detokenizer_addrs))]
        # Registration first: the detokenizer buffers rows that overtake it anyway, but this keeps
        # the common case in order.
        self.replies.send(detok, wire.DetokRegister(
            request_id=req.request_id, reply_to=req.reply_to, n=params.n, sampling_params=params,
            num_prompt_tokens=len(ids), prompt_tail=ids[-PROMPT_TAIL_TOKENS:],
            prompt_token_ids=ids if req.return_prompt_token_ids else None, enable_thinking=req.enable_thinking,
            want_logprobs=req.want_logprobs))
        reasoning_first = starts_in_reasoning(self.spec.reasoning_parser, req.enable_thinking is not False)
        for i, child in enumerate(wire.child_ids(req.request_id, params.n)):
            seed = params.seed + i if params.seed is not None and params.n > 1 else params.seed
            child_params = params.clone(n=1, seed=seed) if params.n > 1 else params
            self.engine.send(wire.encode(EngineRequest(request_id=child, prompt_token_ids=ids,
                                                       sampling_params=child_params,
                                                       arrival_time=req.arrival_time, reply_to=detok,
                                                       client_id=req.client_id,
                                                       reasoning_first=reasoning_first)))

    def prompt_ids(self, req: wire.GenerateRequest) -> list[int]:
        tok = self.tokenizer
        if req.messages is not None:
            _, ids = chat_prompt(tok, req.messages, req.chat_template_kwargs, req.enable_thinking,
                                 req.add_generation_prompt, req.continue_final_message)
        elif req.prompt_token_ids is not None:
            ids = checked_ids(tok, req.prompt_token_ids)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise PromptError("prompt", "no prompt given")
        if not ids:
            raise PromptError("prompt" if req.messages is None else "messages", "the prompt is empty")
        return ids

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        if params.bad_words and not params.bad_words_token_ids:
            params = params.clone(bad_words_token_ids=bad_words_to_token_ids(self.tokenizer, params.bad_words))
        return params

    def serve(self) -> None:
        inbox = self.ctx.socket(zmq.PULL)
        inbox.bind(self.spec.tokenizer_addrs[self.index])
        report(self.spec, wire.Ready(name=self.name, pid=os.getpid()))
        while True:
            frame = wire.decode(inbox.recv())
            if isinstance(frame, wire.GenerateRequest):
                self.handle(frame)
            elif frame is not None:
                logger.error("%s: unexpected frame %s", self.name, type(frame).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastdeploy tokenizer worker (started by the api server)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    name = f"tokenizer-{args.index}"
    child_setup(name)
    try:
        worker = TokenizerWorker(spec, load_tokenizer(spec.model_path), args.index)
    except Exception as exc:  # noqa: BLE001
        logger.exception("%s failed to start", name)
        report(spec, wire.Failed(name=name, pid=os.getpid(), message=f"{type(exc).__name__}: {exc}"))
        return 1
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
