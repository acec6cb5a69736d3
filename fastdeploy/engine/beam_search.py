"""Beam search on top of the engine: every step expands each live beam by one token.

Each expansion is an ordinary one-token request whose prompt is the beam so far; prefix caching
makes the shared history almost free, so no special KV forking is needed. The beam width is
`best_of` (default `n`), as in seed 002; the n best finished beams are returned, best first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm import tqdm

from fastdeploy.engine.request import CompletionOutput, RequestMetrics, RequestOutput
from fastdeploy.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastdeploy.entrypoints.llm import LLM


@dataclass
class Beam:
    tokens: list[int]
    cum_logprob: float = 0.0
    finished: bool = False
    finish_reason: str = "length"
    logprobs: list[float] = field(default_factory=list)

    def score(self, num_prompt: int, length_penalty: float) -> float:
        length = max(1, len(self.tokens) - num_prompt)
        return self.cum_logprob / (length ** length_penalty)


def beam_search(llm: "LLM", prompt_ids: list[int], params: SamplingParams, eos_ids: list[int],
                max_tokens: int) -> list[Beam]:
    """All final beams of one prompt, sorted best first by length-penalised cumulative logprob."""
    width = params.best_of or params.n
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=min(20, 2 * width),
                                 repetition_penalty=params.repetition_penalty,
                                 presence_penalty=params.presence_penalty,
                                 frequency_penalty=params.frequency_penalty)
    n_prompt = len(prompt_ids)
    live = [Beam(list(prompt_ids))]
    done: list[Beam] = []
    for step in range(max_tokens):
        outs = llm._run([(None, b.tokens) for b in live], [step_params] * len(live), use_tqdm=False)
        candidates: list[Beam] = []
        for beam, out in zip(live, outs):
            for token, lp in (out.outputs.logprobs or [{}])[0].items():
                cand = Beam(beam.tokens + [token], beam.cum_logprob + lp, logprobs=beam.logprobs + [lp])
                if token in eos_ids and not params.ignore_eos and step + 1 >= params.min_tokens:
                    cand.finished, cand.finish_reason = True, "stop"
                candidates.append(cand)
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
        live = []
        for cand in candidates:
            if cand.finished:
                if len(done) < width:
                    done.append(cand)
            elif len(live) < width:
                live.append(cand)
        if not live or len(done) >= width:
            break
    final = done + live
    final.sort(key=lambda b: b.score(n_prompt, params.length_penalty), reverse=True)
    return final


def run_beam_search(llm: "LLM", encoded: list[tuple[str | None, list[int]]], params_list: list[SamplingParams],
                    use_tqdm: bool) -> list[RequestOutput]:
    """One RequestOutput per returned beam (n per prompt), in prompt order, best beam first."""
    results: list[RequestOutput] = []
    eos_ids = llm.engine.eos_token_ids
    for (text, ids), params in tqdm(list(zip(encoded, params_list)), desc="Beam search", disable=not use_tqdm):
        arrival = time.time()
        room = llm.engine.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room under max_model_len {llm.engine.max_model_len}")
        max_tokens = min(params.max_tokens or room, room)
        beams = beam_search(llm, ids, params, eos_ids, max_tokens)
        for index, beam in enumerate(beams[: params.n]):
            out_ids = beam.tokens[len(ids):]
            shown = out_ids[:-1] if beam.finish_reason == "stop" else out_ids
            completion = CompletionOutput(
                index=index, send_idx=len(out_ids), token_ids=out_ids,
                text=llm.tokenizer.decode(shown, skip_special_tokens=params.skip_special_tokens),
                cumulative_logprob=beam.cum_logprob, finish_reason=beam.finish_reason,
                logprobs=[{t: lp} for t, lp in zip(out_ids, beam.logprobs)])
            end = time.time()
            results.append(RequestOutput(
                request_id=f"beam-{len(results)}", prompt=text, prompt_token_ids=ids, outputs=completion,
                finished=True, metrics=RequestMetrics(arrival_time=arrival, model_execute_time=end - arrival)))
    return results
