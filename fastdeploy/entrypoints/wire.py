"""Every frame the serving processes exchange, in one schema (ARCHITECTURE.md "Messages").

msgspec Structs, array_like + omit_defaults + gc=False, one tagged union decoded by one decoder:
an unknown or malformed frame decodes to None (and is logged), never to a crash or to pickle.
New fields go last so older peers keep decoding. Engine-boundary types (token ids only) come
from fastdeploy.engine.protocol and are members of the same union.
"""
from __future__ import annotations

import logging
from typing import Any, Union

import msgspec

from fastdeploy.engine.protocol import AbortRequests, EngineRequest, EngineStats, StepOutput
from fastdeploy.engine.sampling_params import SamplingParams

logger = logging.getLogger("fastdeploy")

SCHEMA_VERSION = 1
"""Bumped on any incompatible change; every process reports it in Ready and the launcher checks it."""

_STRUCT = dict(array_like=True, omit_defaults=True, gc=False)


class GenerateRequest(msgspec.Struct, tag="gen", **_STRUCT):
    """Api worker → tokenizer worker: one prompt to run n times."""

    request_id: str
    reply_to: str
    """ipc address of the api worker's PULL socket that gets the text and errors."""
    sampling_params: SamplingParams
    """Already validated by the api worker (bad 400s never travel further)."""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    arrival_time: float = 0.0
    enable_thinking: bool | None = None
    return_prompt_token_ids: bool = False
    want_logprobs: bool = False
    client_id: str = ""
    """The id the client chose; the engine rejects it while another request holds it (409)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokRegister(msgspec.Struct, tag="reg", **_STRUCT):
    """Tokenizer worker → detokenizer: what it needs to turn a request's token ids into text."""

    request_id: str
    reply_to: str
    n: int
    sampling_params: SamplingParams
    num_prompt_tokens: int
    prompt_tail: list[int] = []
    """Last prompt tokens: decode context for the first output token."""
    prompt_token_ids: list[int] | None = None
    """Sent back with the first chunk when the client asked for them."""
    enable_thinking: bool | None = None
    want_logprobs: bool = False


class LogprobEntry(msgspec.Struct, **_STRUCT):
    """One generated token's logprob with its text and the top alternatives (token text, logprob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = []
    token_id: int = 0
    top_ids: list[int] = []
    """Token ids of `top`, same order (beam search expands by id)."""


class TextChunk(msgspec.Struct, **_STRUCT):
    """New text of one choice of one request (usage counts are cumulative, so the last is exact)."""

    request_id: str
    index: int
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[LogprobEntry] | None = None
    prompt_token_ids: list[int] | None = None
    error_message: str | None = None
    prompt_logprobs: list[LogprobEntry] | None = None
    """With the first token, when asked for (completions' echo + logprobs): one entry per prompt
    token; the first, which nothing predicts, has logprob 0 and no alternatives."""


class TextBatch(msgspec.Struct, tag="text", **_STRUCT):
    """Detokenizer → api worker: all chunks for one api worker from one engine step."""

    chunks: list[TextChunk]


class ErrorFrame(msgspec.Struct, tag="err", **_STRUCT):
    """A request failed before or during generation; `status` is the HTTP status to answer with."""

    request_id: str
    status: int
    message: str
    error_type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class Ready(msgspec.Struct, tag="ready", **_STRUCT):
    """Any child → launcher once it serves; the engine fills the model facts."""

    name: str
    pid: int
    schema_version: int = SCHEMA_VERSION
    max_model_len: int = 0
    eos_token_ids: list[int] = []
    vocab_size: int = 0
    served_model_name: str = ""
    num_blocks: int = 0
    metrics_port: int = 0


class Failed(msgspec.Struct, tag="failed", **_STRUCT):
    """Any child → launcher: it cannot start or continue (the message says why)."""

    name: str
    pid: int
    message: str


class ProcessDied(msgspec.Struct, tag="died", **_STRUCT):
    """Launcher → api workers: a process of the pipeline is gone, answer 503 from now on."""

    name: str
    pid: int
    exitcode: int | None = None


Frame = Union[GenerateRequest, DetokRegister, TextBatch, ErrorFrame, Ready, Failed, ProcessDied,
              EngineRequest, AbortRequests, StepOutput, EngineStats]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def decode(data: bytes) -> Frame | None:
    """The frame, or None (logged) for bytes that are not a frame of this schema."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        # A SamplingParams that fails validation raises ValueError from __post_init__.
        logger.error("dropping undecodable frame (%d bytes): %s", len(data), exc)
        return None


def parent_id(child_request_id: str) -> tuple[str, int]:
    """Engine requests of one prompt are "<request_id>-<choice index>"."""
    base, _, index = child_request_id.rpartition("-")
    return base, int(index) if index.isdigit() else 0


def child_ids(request_id: str, n: int) -> list[str]:
    return [f"{request_id}-{i}" for i in range(n)]
