"""Detokenizer worker: engine StepOutputs (token ids) → TextBatch frames for the api workers.

Requests are pinned here by a stable hash of their id (see tokenizer_worker.detokenizer_for).
Per request it keeps one RequestTextState per choice; a stop string found in the text aborts the
choice in the engine at once. State is freed on the terminal row of every choice, and the maps
that can grow without a terminal row (rows that overtook their registration, ids finished here
whose engine rows are still in flight) are bounded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from fastdeploy.engine.protocol import AbortRequests, StepOutput, TokenLogprobs
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.runtime import PushCache, RunSpec, child_setup, push_socket, read_spec, report
from fastdeploy.input.tokenizer import Tokenizer, load_tokenizer
from fastdeploy.output.detokenizer import RequestTextState

logger = logging.getLogger("fastdeploy")

MAX_ORPHAN_REQUESTS = 4096
"""Requests whose rows arrived before their registration (kept until it comes, oldest dropped)."""
MAX_RECENTLY_DONE = 16384
"""Requests finished here (stop string, error) whose late engine rows must be ignored."""


@dataclass
class _Choice:
    text: RequestTextState
    done: bool = False


@dataclass
class _Request:
    reg: wire.DetokRegister
    choices: list[_Choice]
    remaining: int
    sent_prompt_ids: bool = False
    cached: int = 0


@dataclass
class _Outgoing:
    """Chunks per api worker and aborts for the engine, sent once per input frame."""

    chunks: dict[str, list[wire.TextChunk]] = field(default_factory=dict)
    aborts: list[str] = field(default_factory=list)
    errors: list[tuple[str, wire.ErrorFrame]] = field(default_factory=list)


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, reasoning_parser: str | None) -> None:
        self.tokenizer = tokenizer
        self.reasoning_parser = reasoning_parser
        self.requests: dict[str, _Request] = {}
        self.orphans: OrderedDict[str, list[wire.Frame]] = OrderedDict()
        self.recently_done: OrderedDict[str, None] = OrderedDict()

    # ---- frames -----------------------------------------------------------------------------
    def on_register(self, reg: wire.DetokRegister, out: _Outgoing) -> None:
        if reg.request_id in self.recently_done:
            return
        choices = [_Choice(RequestTextState(self.tokenizer, reg.sampling_params, self.reasoning_parser,
                                            prompt_token_ids=reg.prompt_tail, enable_thinking=reg.enable_thinking))
                   for _ in range(reg.n)]
        self.requests[reg.request_id] = _Request(reg, choices, remaining=reg.n)
        for frame in self.orphans.pop(reg.request_id, []):
            self.on_frame(frame, out)

    def on_frame(self, frame: wire.Frame, out: _Outgoing) -> None:
        if isinstance(frame, wire.DetokRegister):
            self.on_register(frame, out)
        elif isinstance(frame, StepOutput):
            self.on_step(frame, out)
        elif isinstance(frame, wire.ErrorFrame):
            self.on_error(frame, out)
        else:
            logger.error("detokenizer: unexpected frame %s", type(frame).__name__)

    def _owner(self, child_id: str, frame: wire.Frame) -> _Request | None:
        """The registered request of a child id; buffers the frame if registration is still coming."""
        parent, _ = wire.parent_id(child_id)
        req = self.requests.get(parent)
        if req is None and parent not in self.recently_done:
            self.orphans.setdefault(parent, []).append(frame)
            while len(self.orphans) > MAX_ORPHAN_REQUESTS:
                dropped, _ = self.orphans.popitem(last=False)
                logger.warning("detokenizer: dropping rows of never-registered request %s", dropped)
        return req

    def on_step(self, step: StepOutput, out: _Outgoing) -> None:
        for i, child_id in enumerate(step.request_ids):
            req = self._owner(child_id, _row(step, i))
            if req is None:
                continue
            _, index = wire.parent_id(child_id)
            if index >= len(req.choices) or req.choices[index].done:
                continue
            self._row(req, index, step, i, out)

    def on_error(self, err: wire.ErrorFrame, out: _Outgoing) -> None:
        req = self._owner(err.request_id, err)
        if req is None:
            return
        parent = req.reg.request_id
        # One failed choice fails the request: abort its siblings, answer once.
        out.aborts.extend(wire.child_ids(parent, req.reg.n))
        out.errors.append((req.reg.reply_to, wire.ErrorFrame(
            request_id=parent, status=err.status, message=err.message, error_type=err.error_type,
            param=err.param, code=err.code)))
        self._forget(parent)

    # ---- one row ----------------------------------------------------------------------------
    def _row(self, req: _Request, index: int, step: StepOutput, i: int, out: _Outgoing) -> None:
        choice = req.choices[index]
        new_ids = step.new_token_ids[i]
        text, reasoning, stop_hit = choice.text.add_tokens(new_ids)
        finish = step.finish_reasons[i]
        if stop_hit and finish is None:
            finish = "stop"
            out.aborts.append(f"{req.reg.request_id}-{index}")
        if finish is not None:
            tail_text, tail_reasoning = choice.text.finish()
            text, reasoning = text + tail_text, reasoning + tail_reasoning
        logprobs = None
        if req.reg.want_logprobs and step.logprobs and step.logprobs[i]:
            logprobs = [self._logprob_entry(lp) for lp in step.logprobs[i]]  # type: ignore[union-attr]
        if not (text or reasoning or finish or new_ids):
            return
        chunk = wire.TextChunk(
            request_id=req.reg.request_id, index=index, text=text, reasoning=reasoning, token_ids=list(new_ids),
            finish_reason=finish, num_prompt_tokens=req.reg.num_prompt_tokens,
            num_cached_tokens=step.num_cached_tokens[i], num_output_tokens=len(choice.text.token_ids),
            logprobs=logprobs,
            error_message=step.error_messages[i] if step.error_messages else None)
        prompt_lps = step.prompt_logprobs[i] if step.prompt_logprobs else None
        if req.reg.want_logprobs and prompt_lps:
            chunk.prompt_logprobs = [self._logprob_entry(lp) for lp in prompt_lps]
        if not req.sent_prompt_ids and req.reg.prompt_token_ids is not None:
            chunk.prompt_token_ids = req.reg.prompt_token_ids
            req.sent_prompt_ids = True
        out.chunks.setdefault(req.reg.reply_to, []).append(chunk)
        if finish is not None:
            choice.done = True
            req.remaining -= 1
            if req.remaining == 0:
                self._forget(req.reg.request_id)

    def _logprob_entry(self, lp: TokenLogprobs) -> wire.LogprobEntry:
        decode = self.tokenizer.decode
        return wire.LogprobEntry(token=decode([lp.token_id], skip_special_tokens=False), logprob=lp.logprob,
                                 top=[(decode([t], skip_special_tokens=False), v) for t, v in lp.top],
                                 token_id=lp.token_id, top_ids=[t for t, _ in lp.top])

    def _forget(self, parent: str) -> None:
        self.requests.pop(parent, None)
        self.orphans.pop(parent, None)
        self.recently_done[parent] = None
        while len(self.recently_done) > MAX_RECENTLY_DONE:
            self.recently_done.popitem(last=False)


def _row(step: StepOutput, i: int) -> StepOutput:
    """Row i of a step as its own one-row StepOutput (for buffering ahead of registration)."""
    def one(column: list) -> list:
        return [column[i]] if column else []

    return StepOutput(request_ids=[step.request_ids[i]], new_token_ids=[step.new_token_ids[i]],
                      finish_reasons=[step.finish_reasons[i]], num_prompt_tokens=[step.num_prompt_tokens[i]],
                      num_cached_tokens=[step.num_cached_tokens[i]], logprobs=one(step.logprobs),
                      first_scheduled_times=one(step.first_scheduled_times),
                      error_messages=one(step.error_messages), step_time=step.step_time,
                      prompt_logprobs=one(step.prompt_logprobs))


def serve(spec: RunSpec, index: int, detok: Detokenizer) -> None:
    ctx = zmq.Context.instance()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(spec.detokenizer_addrs[index])
    engine = push_socket(ctx, spec.engine_addr)
    replies = PushCache(ctx)
    report(spec, wire.Ready(name=f"detokenizer-{index}", pid=os.getpid()))
    while True:
        out = _Outgoing()
        frame = wire.decode(inbox.recv())
        if frame is not None:
            detok.on_frame(frame, out)
        if out.aborts:
            engine.send(wire.encode(AbortRequests(request_ids=out.aborts)))
        for addr, chunks in out.chunks.items():
            replies.send(addr, wire.TextBatch(chunks=chunks))
        for addr, err in out.errors:
            replies.send(addr, err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastdeploy detokenizer worker (started by the api server)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    name = f"detokenizer-{args.index}"
    child_setup(name)
    try:
        detok = Detokenizer(load_tokenizer(spec.model_path), spec.reasoning_parser)
    except Exception as exc:  # noqa: BLE001
        logger.exception("%s failed to start", name)
        report(spec, wire.Failed(name=name, pid=os.getpid(), message=f"{type(exc).__name__}: {exc}"))
        return 1
    serve(spec, args.index, detok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
