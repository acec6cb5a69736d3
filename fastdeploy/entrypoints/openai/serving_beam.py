"""Beam search for the server (seed 002's num_beams / use_beam_search), driven from the api worker.

Every step expands each live beam by one token: one ordinary greedy one-token request per beam
with top logprobs, all beams of a step submitted together so the engine batches them, and prefix
caching makes the shared history cheap. No engine changes are needed. The result is presented
as finished TextChunks, so the chat / completion formatting (streaming or not) is the same code.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.entrypoints import wire
from fastdeploy.entrypoints.openai.http_app import ApiWorker
from fastdeploy.entrypoints.openai.protocol import ApiError, ParsedRequest


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)
    """Generated tokens only."""
    cum_logprob: float = 0.0
    finish_reason: str | None = None

    def score(self, length_penalty: float) -> float:
        return self.cum_logprob / (max(1, len(self.tokens)) ** length_penalty)


class BeamResult:
    """Looks like a Submission to the formatters: request ids, arrival time and final chunks."""

    def __init__(self, request_ids: list[str], chunks: list[wire.TextChunk], arrival: float,
                 response_id: str | None = None) -> None:
        self.request_ids = request_ids
        self.response_id = response_id or request_ids[0]
        self.arrival = arrival
        self._chunks = chunks

    async def chunks(self) -> AsyncIterator[wire.TextChunk]:
        for chunk in self._chunks:
            yield chunk


async def _expand(worker: ApiWorker, step: ParsedRequest) -> list[list[wire.TextChunk]]:
    """Run one step (one request per prompt); chunks grouped by prompt, in prompt order."""
    async with worker.submit("beam", step) as sub:
        grouped: dict[str, list[wire.TextChunk]] = {rid: [] for rid in sub.request_ids}
        async for chunk in sub.chunks():
            grouped[chunk.request_id].append(chunk)
    return [grouped[rid] for rid in sub.request_ids]


def _candidates(beam: Beam, chunks: list[wire.TextChunk]) -> dict[int, float]:
    """Next-token logprobs of one beam: the sampled token plus the top alternatives."""
    options: dict[int, float] = {}
    for chunk in chunks:
        for entry in chunk.logprobs or []:
            options.update(zip(entry.top_ids, (lp for _, lp in entry.top)))
            options[entry.token_id] = entry.logprob
    return options


async def _search(worker: ApiWorker, parsed: ParsedRequest, first: ParsedRequest, width: int
                  ) -> tuple[list[int], list[Beam]]:
    eos = set(worker.model_eos_ids())
    params = parsed.params
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=min(20, 2 * width),
                                 repetition_penalty=params.repetition_penalty,
                                 presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
    # The expansion steps are internal requests: the client's request_id names the whole search only.
    [chunks] = await _expand(worker, replace(first, params=step_params, return_token_ids=True, logprobs=True,
                                             request_id=None))
    prompt_ids = next(c.prompt_token_ids for c in chunks if c.prompt_token_ids is not None)
    room = max(1, (worker.model.max_model_len or 1 << 30) - len(prompt_ids))
    max_tokens = min(params.max_tokens or room, room)
    live, done = [Beam()], []
    per_beam = [chunks]
    for step in range(max_tokens):
        pool: list[Beam] = []
        for beam, beam_chunks in zip(live, per_beam):
            for token, logprob in _candidates(beam, beam_chunks).items():
                cand = Beam(beam.tokens + [token], beam.cum_logprob + logprob)
                if token in eos and not params.ignore_eos and step + 1 > params.min_tokens:
                    cand.finish_reason = "stop"
                pool.append(cand)
        pool.sort(key=lambda b: b.cum_logprob, reverse=True)
        live = []
        for cand in pool:
            if cand.finish_reason and len(done) < width:
                done.append(cand)
            elif not cand.finish_reason and len(live) < width:
                live.append(cand)
        if not live or len(done) >= width or step + 1 == max_tokens:
            break
        step_req = ParsedRequest(kind="completion", model=parsed.model, params=step_params, logprobs=True,
                                 prompts=[prompt_ids + b.tokens for b in live])
        per_beam = await _expand(worker, step_req)
    for beam in live:
        beam.finish_reason = "length"
    final = sorted(done + live, key=lambda b: b.score(params.length_penalty), reverse=True)
    return prompt_ids, final[:params.n]


async def run_beam_search(worker: ApiWorker, parsed: ParsedRequest, prefix: str) -> BeamResult:
    tokenizer = await worker.tokenizer()
    arrival = time.time()
    firsts = [parsed] if parsed.kind == "chat" else [replace(parsed, prompts=[p]) for p in parsed.prompts]
    try:
        results = await asyncio.gather(*[_search(worker, parsed, f, parsed.beam_width) for f in firsts])
    except StopIteration:
        raise ApiError(500, "beam search got no prompt token ids back", code="engine_error") from None
    base = f"{prefix}-{os.urandom(12).hex()}"
    request_ids = [base if len(results) == 1 else f"{base}_{j}" for j in range(len(results))]
    chunks = []
    for rid, (prompt_ids, beams) in zip(request_ids, results):
        for index, beam in enumerate(beams):
            shown = beam.tokens[:-1] if beam.finish_reason == "stop" else beam.tokens
            text = tokenizer.decode(shown, skip_special_tokens=parsed.params.skip_special_tokens)
            chunks.append(wire.TextChunk(
                request_id=rid, index=index, text=text, token_ids=beam.tokens, finish_reason=beam.finish_reason,
                num_prompt_tokens=len(prompt_ids), num_output_tokens=len(beam.tokens),
                prompt_token_ids=prompt_ids if parsed.return_token_ids and index == 0 else None))
    return BeamResult(request_ids, chunks, arrival, response_id=parsed.request_id)
