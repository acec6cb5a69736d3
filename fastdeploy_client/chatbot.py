"""ChatBot: the seed-000 Python client of the OpenAI-compatible chat endpoint.

Blocking by design (the seed's API is synchronous). Every failure is returned, or yielded as the
last item of a stream, as `{"error_msg", "error_code", "req_id"}`; see errors.py for the codes.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from fastdeploy_client.errors import ERR_BAD_RESPONSE, ClientError, error_dict
from fastdeploy_client.request import (GenerationArgs, Message, build_body, build_messages, encode_body,
                                       new_req_id)
from fastdeploy_client.sse import SSEDecoder
from fastdeploy_client.transport import Deadline, HttpResponse, post_json

CHAT_PATH = "/v1/chat/completions"


class ChatBot:
    """Client of one server at `hostname:port` (e.g. ChatBot("127.0.0.1", 8188))."""

    def __init__(self, hostname: str, port: int | str, model: str | None = None,
                 path: str = CHAT_PATH) -> None:
        # Accept "http://host" too, since FASTDEPLOY_MODEL_URL is often copied from a browser.
        host = hostname.strip().removeprefix("http://").rstrip("/")
        self.hostname = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.port = int(port)
        self.model = model
        self.path = path

    def stream_generate(self, message: Message, max_dec_len: int | None = 1024, min_dec_len: int | None = 2,
                        topp: float | None = 0.0, temperature: float | None = 1.0,
                        frequency_score: float | None = 0.0, penalty_score: float | None = 1.0,
                        presence_score: float | None = 0.0, eos_token_ids: int | Sequence[int] | None = None,
                        req_id: str | None = None, timeout: float | None = 300,
                        return_all_tokens: bool = False, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Yield `{"token", "is_end", "req_id"}` as text arrives; the last item has is_end 1.

        With return_all_tokens, yield a single item holding the whole text. On failure the last
        item is the error dict instead.
        """
        args = GenerationArgs(max_dec_len, min_dec_len, topp, temperature, frequency_score, penalty_score,
                              presence_score, eos_token_ids)
        rid = new_req_id(req_id)
        try:
            if return_all_tokens:
                text, finish = self._complete(message, args, rid, timeout, kwargs)
                yield {"token": text, "is_end": 1, "req_id": rid, "finish_reason": finish}
                return
            yield from self._stream(message, args, rid, timeout, kwargs)
        except ClientError as exc:
            yield error_dict(exc.code, exc.message, rid)

    def generate(self, message: Message, max_dec_len: int | None = 1024, min_dec_len: int | None = 2,
                 topp: float | None = 0.0, temperature: float | None = 1.0, frequency_score: float | None = 0.0,
                 penalty_score: float | None = 1.0, presence_score: float | None = 0.0,
                 eos_token_ids: int | Sequence[int] | None = None, req_id: str | None = None,
                 timeout: float | None = 300, **kwargs: Any) -> dict[str, Any]:
        """Return `{"results": text, "req_id", "finish_reason"}`, or the error dict."""
        kwargs.pop("return_all_tokens", None)  # meaningless here: generate always returns everything
        args = GenerationArgs(max_dec_len, min_dec_len, topp, temperature, frequency_score, penalty_score,
                              presence_score, eos_token_ids)
        rid = new_req_id(req_id)
        try:
            text, finish = self._complete(message, args, rid, timeout, kwargs)
        except ClientError as exc:
            return error_dict(exc.code, exc.message, rid)
        return {"results": text, "req_id": rid, "finish_reason": finish}

    def _complete(self, message: Message, args: GenerationArgs, rid: str, timeout: float | None,
                  extra: dict[str, Any]) -> tuple[str, str | None]:
        """One non-streaming request: (whole text, finish_reason)."""
        deadline = Deadline(timeout)
        resp = self._open(build_body(build_messages(message), args, rid, False, self.model, extra), deadline)
        try:
            return _parse_completion(resp.read_all())
        finally:
            resp.close()

    def _stream(self, message: Message, args: GenerationArgs, rid: str, timeout: float | None,
                extra: dict[str, Any]) -> Iterator[dict[str, Any]]:
        deadline = Deadline(timeout)
        resp = self._open(build_body(build_messages(message), args, rid, True, self.model, extra), deadline)
        # Closing the connection early (consumer stopped, timeout) is what makes the server abort.
        try:
            if resp.content_type == "application/json":
                # A server that ignored stream=true answered in one piece; still honour the contract.
                text, finish = _parse_completion(resp.read_all())
                yield {"token": text, "is_end": 1, "req_id": rid, "finish_reason": finish}
                return
            yield from _stream_items(resp, rid)
        finally:
            resp.close()

    def _open(self, body: dict[str, Any], deadline: Deadline) -> HttpResponse:
        accept = "text/event-stream" if body.get("stream") else "application/json"
        resp = post_json(self.hostname, self.port, self.path, encode_body(body), deadline, accept)
        if 200 <= resp.status < 300:
            return resp
        try:
            raw = resp.read_all()
        finally:
            resp.close()
        raise _http_error(resp.status, resp.reason, raw)


def _stream_items(resp: HttpResponse, rid: str) -> Iterator[dict[str, Any]]:
    """Turn SSE chat-completion chunks into seed items. is_end 1 goes on the item that carries the
    finish_reason (or on an empty item at [DONE] if the server never sent one)."""
    ended = False
    for payload in _sse_payloads(resp):
        if payload.strip() == "[DONE]":
            if not ended:
                yield {"token": "", "is_end": 1, "req_id": rid, "finish_reason": None}
            return
        if ended:
            continue  # e.g. a usage-only chunk after the finish: read on to [DONE] so the exchange ends cleanly
        chunk = _json_object(payload)
        if "error" in chunk:
            raise _body_error(chunk["error"], default_code=500)
        token, finish = _delta(chunk)
        if finish is not None:
            ended = True
            yield {"token": token, "is_end": 1, "req_id": rid, "finish_reason": finish}
        elif token:
            yield {"token": token, "is_end": 0, "req_id": rid}
    if not ended:
        raise ClientError(ERR_BAD_RESPONSE, "the stream ended before the answer was complete")


def _sse_payloads(resp: HttpResponse) -> Iterator[str]:
    decoder = SSEDecoder()
    for chunk in resp.iter_chunks():
        yield from decoder.feed(chunk)
    yield from decoder.close()


def _delta(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """(content, finish_reason) of the first choice; the client always asks for n=1."""
    try:
        choices = chunk.get("choices") or []
        if not choices:
            return "", None
        choice = choices[0]
        return (choice.get("delta") or {}).get("content") or "", choice.get("finish_reason")
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ClientError(ERR_BAD_RESPONSE, f"unexpected stream chunk: {json.dumps(chunk)[:200]}") from None


def _parse_completion(raw: bytes) -> tuple[str, str | None]:
    data = _json_object(raw)
    if "error" in data:
        raise _body_error(data["error"], default_code=500)
    try:
        choice = data["choices"][0]
        return choice["message"].get("content") or "", choice.get("finish_reason")
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ClientError(ERR_BAD_RESPONSE, f"unexpected completion body: {raw[:200]!r}") from None


def _json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        shown = raw[:200] if isinstance(raw, str) else raw[:200].decode("utf-8", errors="replace")
        raise ClientError(ERR_BAD_RESPONSE, f"server sent invalid JSON: {shown!r}")
    return value


def _http_error(status: int, reason: str, raw: bytes) -> ClientError:
    """The HTTP status is the code; the message comes from the OpenAI error body when there is one."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return _body_error(body["error"], default_code=status, status=status)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return ClientError(status, body["message"])
    text = raw.decode("utf-8", errors="replace").strip()[:500]
    return ClientError(status, text or f"HTTP {status} {reason}".strip())


def _body_error(error: Any, default_code: int, status: int | None = None) -> ClientError:
    """An OpenAI `error` object (or a bare string) → ClientError. Inside a 200 stream there is no
    HTTP status, so a numeric `code` in the object is used when it looks like one."""
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "server error")
        code = error.get("code")
    else:
        message, code = str(error), None
    if status is None and isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return ClientError(code, message)
    return ClientError(status if status is not None else default_code, message)
