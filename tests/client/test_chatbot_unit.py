"""Unit tests of fastdeploy_client (ChatBot, SSE decoding, the fdclient CLI).

The server is outside the unit under test, so a small fake OpenAI chat endpoint (aiohttp, in a
background thread, on 127.0.0.1 and a free port) stands in for it. Its behaviour is chosen by the
prompt text (`__stall__`, `__hold__`, ...). End-to-end tests against the real server live elsewhere.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fastdeploy_client import ChatBot
from fastdeploy_client.cli import parse_url
from fastdeploy_client.errors import ERR_BAD_RESPONSE, ERR_INVALID_ARGUMENT, ERR_TIMEOUT, ERR_UNREACHABLE
from fastdeploy_client.sse import SSEDecoder

REPO = Path(__file__).resolve().parents[2]
REPLY_TOKENS = ["你", "好", ",", " I am", " fake."]
REPLY = "".join(REPLY_TOKENS)
MAX_MODEL_LEN = 64  # the fake's "model limit": prompt characters + max_tokens


def _error_body(message: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _chunk(rid: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": rid, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


class FakeOpenAIServer:
    """Just enough of POST /v1/chat/completions: validation errors, duplicate ids, SSE, stalls."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.holding = threading.Event()  # set once a `__hold__` request is in flight
        self._in_flight: set[str] = set()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)

    # --- lifecycle (test thread) ---
    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "fake server did not start"

    def release_hold(self) -> None:
        self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        def finish() -> None:
            self._release.set()
            self._stop.set()
        self._loop.call_soon_threadsafe(finish)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._release = asyncio.Event()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=2)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        self._ready.set()

    # --- the endpoint (server thread) ---
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        rid = body.get("request_id") or "generated"
        prompt = body["messages"][-1]["content"]
        error = self._validate(body, rid)
        if error is not None:
            return error
        if prompt == "__plain_500__":
            return web.Response(status=500, text="internal boom")
        if prompt == "__stall__":
            await self._stop.wait()  # longer than any client timeout in these tests
            return web.Response(status=503)
        self._in_flight.add(rid)
        try:
            if prompt == "__hold__":
                self.holding.set()
                await self._release.wait()
            if body.get("stream") and prompt != "__ignores_stream__":
                return await self._stream(request, rid, prompt)
            message = {"role": "assistant", "content": REPLY}
            return web.json_response({"id": rid, "object": "chat.completion",
                                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        finally:
            self._in_flight.discard(rid)

    def _validate(self, body: dict[str, Any], rid: str) -> web.Response | None:
        if rid in self._in_flight:
            return web.json_response(_error_body(f"request_id {rid!r} is already in flight", "request_id"),
                                     status=409)
        top_p = body.get("top_p")
        if top_p is not None and not 0 < top_p <= 1:
            return web.json_response(_error_body("top_p must be in (0, 1]", "top_p"), status=400)
        prompt_len = sum(len(m["content"]) for m in body["messages"])
        if prompt_len + body.get("max_tokens", 0) > MAX_MODEL_LEN:
            msg = (f"prompt ({prompt_len} tokens) + max_tokens ({body['max_tokens']}) exceeds the model's "
                   f"maximum length {MAX_MODEL_LEN}")
            return web.json_response(_error_body(msg, "max_tokens"), status=400)
        return None

    async def _stream(self, request: web.Request, rid: str, prompt: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b": keep-alive comment\n\n")
            await resp.write(_chunk(rid, {"role": "assistant", "content": ""}))
            for i, token in enumerate(REPLY_TOKENS):
                data = _chunk(rid, {"content": token}, "stop" if prompt == "__fused__" and i == 4 else None)
                # Split inside the event (and inside a multi-byte character) to exercise reassembly.
                await resp.write(data[:9])
                await resp.write(data[9:])
                if i == 1 and prompt == "__stall_mid__":
                    await self._stop.wait()
                    return resp
                if i == 1 and prompt == "__mid_error__":
                    err = {"error": {"message": "engine failed", "type": "server_error", "code": 500}}
                    await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                    return resp
                if i == 1 and prompt == "__no_done__":
                    return resp
            if prompt != "__fused__":
                await resp.write(_chunk(rid, {}, "stop"))
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the client went away (its timeout): nothing left to send
        return resp


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def bot(server: FakeOpenAIServer) -> ChatBot:
    return ChatBot("127.0.0.1", server.port)


# --- parameter mapping ---

def test_every_parameter_maps_into_the_request(bot: ChatBot, server: FakeOpenAIServer) -> None:
    result = bot.generate("hi", max_dec_len=20, min_dec_len=3, topp=0.8, temperature=0.7, frequency_score=0.1,
                          penalty_score=1.2, presence_score=0.3, eos_token_ids=[2, 7], req_id="map-1", timeout=10)
    assert result == {"results": REPLY, "req_id": "map-1", "finish_reason": "stop"}
    assert server.requests[-1] == {
        "messages": [{"role": "user", "content": "hi"}], "stream": False, "request_id": "map-1",
        "max_tokens": 20, "min_tokens": 3, "top_p": 0.8, "temperature": 0.7, "frequency_penalty": 0.1,
        "presence_penalty": 0.3, "repetition_penalty": 1.2, "stop_token_ids": [2, 7],
    }


def test_seed_defaults(server: FakeOpenAIServer) -> None:
    bot = ChatBot("127.0.0.1", server.port)
    items = list(bot.stream_generate("hi", max_dec_len=30))
    body = server.requests[-1]
    rid = body.pop("request_id")
    assert len(rid) == 32 and all(item["req_id"] == rid for item in items)  # a random uuid hex
    # topp=0.0 (the seed's default) leaves top_p out; no eos_token_ids leaves stop_token_ids out.
    assert body == {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 30,
                    "min_tokens": 2, "temperature": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                    "repetition_penalty": 1.0}


def test_single_eos_id_min_clamp_model_and_kwargs(server: FakeOpenAIServer) -> None:
    bot = ChatBot("http://127.0.0.1/", server.port, model="default")
    result = bot.generate("hi", max_dec_len=1, eos_token_ids=5, topp=-1, stop=["\n"], top_k=4,
                          temperature=None, stream=True, timeout=10)
    assert result["results"] == REPLY
    body = server.requests[-1]
    assert body["model"] == "default" and body["stop_token_ids"] == [5]
    assert body["max_tokens"] == 1 and body["min_tokens"] == 1  # min_dec_len=2 clamped to max_dec_len
    assert body["stop"] == ["\n"] and body["top_k"] == 4
    assert body["stream"] is False  # a `stream` kwarg cannot override the method's own mode
    assert "top_p" not in body and "temperature" not in body


def test_turn_lists_and_message_dicts(bot: ChatBot, server: FakeOpenAIServer) -> None:
    bot.generate(["hi", "hello!", "who are you?"], max_dec_len=10)
    assert server.requests[-1]["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "who are you?"}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    bot.generate(msgs, max_dec_len=10)
    assert server.requests[-1]["messages"] == msgs


@pytest.mark.parametrize("message", [["hi", "hello"], [], ["hi", {"role": "user"}], 42])
def test_bad_message_is_a_returned_error(bot: ChatBot, server: FakeOpenAIServer, message: Any) -> None:
    before = len(server.requests)
    result = bot.generate(message, req_id="bad-msg")
    assert result["error_code"] == ERR_INVALID_ARGUMENT and result["req_id"] == "bad-msg" and result["error_msg"]
    items = list(bot.stream_generate(message))
    assert len(items) == 1 and items[0]["error_code"] == ERR_INVALID_ARGUMENT
    assert len(server.requests) == before  # nothing was sent


# --- results ---

def test_stream_generate_yields_tokens_then_is_end(bot: ChatBot) -> None:
    items = list(bot.stream_generate("你好?", max_dec_len=20, req_id="s-1"))
    assert [item["token"] for item in items] == [*REPLY_TOKENS, ""]
    assert [item["is_end"] for item in items] == [0, 0, 0, 0, 0, 1]
    assert all(item["req_id"] == "s-1" for item in items)
    assert items[-1]["finish_reason"] == "stop"


def test_finish_reason_on_the_last_token_marks_it_the_end(bot: ChatBot) -> None:
    items = list(bot.stream_generate("__fused__", max_dec_len=20))
    assert [item["token"] for item in items] == REPLY_TOKENS
    assert [item["is_end"] for item in items] == [0, 0, 0, 0, 1]


def test_return_all_tokens_yields_one_item(bot: ChatBot, server: FakeOpenAIServer) -> None:
    items = list(bot.stream_generate("hi", max_dec_len=20, req_id="all-1", return_all_tokens=True))
    assert items == [{"token": REPLY, "is_end": 1, "req_id": "all-1", "finish_reason": "stop"}]


def test_stream_answered_in_one_piece(bot: ChatBot) -> None:
    # A server that ignores stream=true and answers with JSON still ends the stream properly.
    items = list(bot.stream_generate("__ignores_stream__", max_dec_len=20, req_id="j-1"))
    assert items == [{"token": REPLY, "is_end": 1, "req_id": "j-1", "finish_reason": "stop"}]


def test_generate_returns_the_whole_text(bot: ChatBot) -> None:
    assert bot.generate("你好,你是谁?", max_dec_len=20, req_id="g-1") == {
        "results": REPLY, "req_id": "g-1", "finish_reason": "stop"}


def test_fastdeploy_client_alias() -> None:
    from fastdeploy.client import ChatBot as Reexported

    assert Reexported is ChatBot


# --- errors: always returned, never raised ---

def test_connection_refused() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but not listening: connecting is refused
        bot = ChatBot("127.0.0.1", closed.getsockname()[1])
        result = bot.generate("hi", req_id="r-1")
        items = list(bot.stream_generate("hi", req_id="r-2"))
    assert result["error_code"] == ERR_UNREACHABLE and result["req_id"] == "r-1"
    assert "cannot connect" in result["error_msg"]
    assert len(items) == 1 and items[0]["error_code"] == ERR_UNREACHABLE and items[0]["req_id"] == "r-2"


def test_http_400_error_body(bot: ChatBot) -> None:
    result = bot.generate("hi", topp=1.5, req_id="e-1")
    assert result == {"error_msg": "top_p must be in (0, 1]", "error_code": 400, "req_id": "e-1"}
    items = list(bot.stream_generate("hi", topp=1.5, req_id="e-2"))
    assert items == [{"error_msg": "top_p must be in (0, 1]", "error_code": 400, "req_id": "e-2"}]


def test_prompt_plus_max_dec_len_over_the_limit(bot: ChatBot) -> None:
    result = bot.generate("hello", max_dec_len=1000)
    assert result["error_code"] == 400 and "exceeds the model's maximum length" in result["error_msg"]
    items = list(bot.stream_generate("hello", max_dec_len=1000))
    assert len(items) == 1 and items[0]["error_code"] == 400


def test_duplicate_req_id_in_flight(bot: ChatBot, server: FakeOpenAIServer) -> None:
    first: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: first.append(bot.generate("__hold__", max_dec_len=20, req_id="dup-1", timeout=30)))
    worker.start()
    try:
        assert server.holding.wait(10), "the first request never reached the server"
        dup = bot.generate("hi", max_dec_len=20, req_id="dup-1", timeout=10)
        assert dup["error_code"] == 409 and dup["req_id"] == "dup-1" and "already in flight" in dup["error_msg"]
        streamed = list(bot.stream_generate("hi", max_dec_len=20, req_id="dup-1", timeout=10))
        assert len(streamed) == 1 and streamed[0]["error_code"] == 409
    finally:
        server.release_hold()
        worker.join(30)
    assert first == [{"results": REPLY, "req_id": "dup-1", "finish_reason": "stop"}]


def test_timeout_before_the_answer(bot: ChatBot) -> None:
    result = bot.generate("__stall__", max_dec_len=20, timeout=0.3, req_id="t-1")
    assert result["error_code"] == ERR_TIMEOUT and result["req_id"] == "t-1" and "timed out" in result["error_msg"]
    items = list(bot.stream_generate("__stall__", max_dec_len=20, timeout=0.3))
    assert len(items) == 1 and items[0]["error_code"] == ERR_TIMEOUT


def test_timeout_mid_stream(bot: ChatBot) -> None:
    items = list(bot.stream_generate("__stall_mid__", max_dec_len=20, timeout=0.5))
    assert [item.get("token") for item in items[:-1]] == REPLY_TOKENS[:2]
    assert items[-1]["error_code"] == ERR_TIMEOUT


def test_error_inside_the_stream(bot: ChatBot) -> None:
    items = list(bot.stream_generate("__mid_error__", max_dec_len=20, req_id="m-1"))
    assert [item.get("token") for item in items[:-1]] == REPLY_TOKENS[:2]
    assert items[-1] == {"error_msg": "engine failed", "error_code": 500, "req_id": "m-1"}


def test_stream_cut_short(bot: ChatBot) -> None:
    items = list(bot.stream_generate("__no_done__", max_dec_len=20))
    assert items[-1]["error_code"] == ERR_BAD_RESPONSE and len(items) == 3


def test_non_json_error_body(bot: ChatBot) -> None:
    result = bot.generate("__plain_500__", max_dec_len=20)
    assert result["error_code"] == 500 and result["error_msg"] == "internal boom"


# --- SSE decoding ---

def test_sse_decoder_reassembles_byte_by_byte() -> None:
    stream = ": ping\r\n\r\ndata: {\"a\": \"你\"}\r\n\r\nevent: x\ndata: line1\ndata:line2\n\ndata: [DONE]".encode()
    decoder = SSEDecoder()
    events: list[str] = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i:i + 1])
    events += decoder.close()
    assert events == ['{"a": "你"}', "line1\nline2", "[DONE]"]


# --- CLI ---

def _cli(args: list[str], url: str | None, module: str = "fastdeploy_client.cli") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTDEPLOY_MODEL_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONIOENCODING"] = "utf-8"
    if url is not None:
        env["FASTDEPLOY_MODEL_URL"] = url
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, encoding="utf-8", timeout=60)


def test_cli_stream_generate(server: FakeOpenAIServer) -> None:
    done = _cli(["stream_generate", "你好?", "--max-dec-len", "20"], f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == REPLY + "\n"


def test_cli_generate_via_package_main(server: FakeOpenAIServer) -> None:
    done = _cli(["generate", "你好,你是谁?", "--max-dec-len", "20", "--topp", "0.8", "--eos-token-ids", "2", "7",
                 "--req-id", "cli-1"], f"127.0.0.1:{server.port}", module="fastdeploy_client")
    assert done.returncode == 0, done.stderr
    assert done.stdout == REPLY + "\n"
    body = server.requests[-1]
    assert body["request_id"] == "cli-1" and body["top_p"] == 0.8 and body["stop_token_ids"] == [2, 7]


def test_cli_errors_go_to_stderr(server: FakeOpenAIServer) -> None:
    done = _cli(["generate", "hi", "--topp", "1.5"], f"127.0.0.1:{server.port}")
    assert done.returncode == 1 and done.stdout == ""
    assert "400" in done.stderr and "top_p must be in (0, 1]" in done.stderr
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        done = _cli(["stream_generate", "hi"], f"127.0.0.1:{closed.getsockname()[1]}")
    assert done.returncode == 1 and str(ERR_UNREACHABLE) in done.stderr


def test_cli_needs_a_server_address() -> None:
    done = _cli(["generate", "hi"], None)
    assert done.returncode == 2 and "FASTDEPLOY_MODEL_URL" in done.stderr
    done = _cli(["generate", "hi"], "no-port-here")
    assert done.returncode == 2 and "host:port" in done.stderr


def test_cli_help() -> None:
    done = _cli(["--help"], None)
    assert done.returncode == 0 and "stream_generate" in done.stdout and "FASTDEPLOY_MODEL_URL" in done.stdout


def test_parse_url() -> None:
    assert parse_url("10.0.0.1:8188") == ("10.0.0.1", 8188)
    assert parse_url("http://localhost:80/") == ("localhost", 80)
    assert parse_url("[::1]:9000") == ("::1", 9000)
    for bad in ("localhost", ":80", "host:http", "host:0"):
        with pytest.raises(ValueError):
            parse_url(bad)
