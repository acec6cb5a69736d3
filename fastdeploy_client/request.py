"""Seed-000 call arguments → an OpenAI chat-completions request body (the mapping in docs/client.md).

Kept apart from ChatBot so the mapping is one readable function with no I/O.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastdeploy_client.errors import ERR_INVALID_ARGUMENT, ClientError

Message = str | Sequence[str] | Sequence[dict[str, Any]]

# Set by ChatBot itself per call; a kwarg with these names would break the call's own contract.
_RESERVED_KWARGS = ("stream", "messages", "request_id")


@dataclass(frozen=True)
class GenerationArgs:
    """The seed's sampling arguments, with its names and defaults."""

    max_dec_len: int | None = 1024
    min_dec_len: int | None = 2
    topp: float | None = 0.0
    temperature: float | None = 1.0
    frequency_score: float | None = 0.0
    penalty_score: float | None = 1.0
    presence_score: float | None = 0.0
    eos_token_ids: int | Sequence[int] | None = None


def new_req_id(req_id: str | None) -> str:
    return str(req_id) if req_id is not None and str(req_id) else uuid.uuid4().hex


def build_messages(message: Message) -> list[dict[str, Any]]:
    """A prompt string, alternating user/assistant turns (user first and last), or OpenAI messages."""
    if isinstance(message, str):
        return [{"role": "user", "content": message}]
    if not isinstance(message, Sequence) or not message:
        raise ClientError(ERR_INVALID_ARGUMENT,
                          "message must be a string or a non-empty list of turns or message dicts")
    if all(isinstance(turn, str) for turn in message):
        if len(message) % 2 == 0:
            # The model answers the last turn, so it must be the user's: user, assistant, ..., user.
            raise ClientError(ERR_INVALID_ARGUMENT,
                              "a list of turns alternates user/assistant and must end with a user turn "
                              f"(odd length), got {len(message)} turns")
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": turn}
                for i, turn in enumerate(message)]
    if all(isinstance(turn, dict) and "role" in turn for turn in message):
        return [dict(turn) for turn in message]
    raise ClientError(ERR_INVALID_ARGUMENT,
                      "message list must hold only strings or only dicts with a 'role' key")


def build_body(messages: list[dict[str, Any]], args: GenerationArgs, req_id: str, stream: bool,
               model: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, "stream": stream, "request_id": req_id}
    if model is not None:
        body["model"] = model
    if args.max_dec_len is not None:
        body["max_tokens"] = args.max_dec_len
    if args.min_dec_len is not None:
        min_tokens = args.min_dec_len
        if _is_number(args.max_dec_len) and _is_number(min_tokens):
            # The seed's default min_dec_len=2 must not turn max_dec_len=1 into a 400
            # (the server requires min_tokens <= max_tokens).
            min_tokens = min(min_tokens, args.max_dec_len)
        body["min_tokens"] = min_tokens
    # The seed's default topp=0.0 means "not set": the server's top_p range is (0, 1], and an
    # unset top_p samples from the whole distribution (1.0), shaped by temperature.
    if args.topp is not None and not (_is_number(args.topp) and args.topp <= 0):
        body["top_p"] = args.topp
    _put(body, "temperature", args.temperature)
    _put(body, "frequency_penalty", args.frequency_score)
    _put(body, "presence_penalty", args.presence_score)
    _put(body, "repetition_penalty", args.penalty_score)
    if args.eos_token_ids is not None:
        ids = args.eos_token_ids
        body["stop_token_ids"] = [ids] if isinstance(ids, int) else list(ids)
    for key, value in extra.items():
        # Extra keyword arguments are OpenAI/server fields passed through as is (stop, seed, top_k,
        # model, ...); they win over the mapped ones. None means "leave it out".
        if key in _RESERVED_KWARGS:
            continue
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def encode_body(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ClientError(ERR_INVALID_ARGUMENT, f"request is not JSON-serializable: {exc}") from None


def _put(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        body[key] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
