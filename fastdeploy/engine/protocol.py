"""Wire types that cross the engine boundary (token ids only, never text).

Rules (ARCHITECTURE.md): msgspec Structs, array_like, omit_defaults, gc=False; new fields go last;
no pickle. The serving layer's own frames live in fastdeploy/entrypoints/wire.py and reuse these.
"""
from __future__ import annotations

import msgspec

from fastdeploy.engine.sampling_params import SamplingParams

_STRUCT = dict(array_like=True, omit_defaults=True, gc=False)


class EngineRequest(msgspec.Struct, tag="req", **_STRUCT):
    """One sequence to generate (n > 1 is fanned out before the engine)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    reply_to: str = ""
    """Address the step outputs for this request go to (a detokenizer); empty in-process."""
    client_id: str = ""
    """The id the client chose (HTTP `request_id`, fdclient `req_id`); unique among requests in flight."""
    reasoning_first: bool = False
    """The reasoning parser takes the output as reasoning until `</think>` (output/reasoning.py's
    starts_in_reasoning): structured output starts after that tag."""


class AbortRequests(msgspec.Struct, tag="abort", **_STRUCT):
    request_ids: list[str]


class TokenLogprobs(msgspec.Struct, **_STRUCT):
    """Logprob of the sampled token and the top alternatives at one step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class StepOutput(msgspec.Struct, tag="step", **_STRUCT):
    """Columnar outputs of one engine step for one destination: row i describes request_ids[i]."""

    request_ids: list[str]
    new_token_ids: list[list[int]]
    finish_reasons: list[str | None]
    """None while running; "stop", "length", "abort" or "error" on the last message of a request."""
    num_prompt_tokens: list[int]
    num_cached_tokens: list[int]
    logprobs: list[list[TokenLogprobs] | None] = []
    first_scheduled_times: list[float] = []
    """Wall time the request was first scheduled (sent with every row; cheap and stateless)."""
    error_messages: list[str | None] = []
    step_time: float = 0.0
    prompt_logprobs: list[list[TokenLogprobs] | None] = []
    """Sent once, on the row of a request's first output token, when its params ask for them: one
    entry per prompt token (the first, which nothing predicts, has logprob 0 and no alternatives)."""


EngineInput = EngineRequest | AbortRequests


class EngineStats(msgspec.Struct, tag="stats", **_STRUCT):
    """Gauges and counters the engine owns (metrics and /health read these)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
