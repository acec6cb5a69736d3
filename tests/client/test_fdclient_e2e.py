"""Issue 5 acceptance 1–2 (partial): the seed 000 commands and Python examples against a real server
with the default model, and the client-side error cases that return an error dict."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from serving.conftest import free_port, start_server, stop_server

from fastdeploy_client.chatbot import ChatBot


@pytest.fixture(scope="module")
def server(default_model_path):
    srv = start_server([])
    yield srv
    assert stop_server(srv) == 0


def fdclient(server, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTDEPLOY_MODEL_URL=f"127.0.0.1:{server.port}")
    return subprocess.run([sys.executable, "-m", "fastdeploy_client", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_seed_cli_stream_generate(server):
    out = fdclient(server, "stream_generate", "你好?", "--max-dec-len", "32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_seed_cli_generate_literal(server):
    out = fdclient(server, "generate", "你好,你是谁?")  # the seed's literal command, default max_dec_len
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_seed_python_examples(server):
    hostname, port = "127.0.0.1", server.port
    chatbot = ChatBot(hostname=hostname, port=port)
    stream_result = chatbot.stream_generate("你好", topp=0.8, max_dec_len=32)
    results = list(stream_result)
    assert results and all("token" in r and r["is_end"] in (0, 1) for r in results)
    assert results[-1]["is_end"] == 1 and all(r["is_end"] == 0 for r in results[:-1])
    chatbot = ChatBot(hostname=hostname, port=port)
    result = chatbot.generate("你好", topp=0.8, max_dec_len=32)
    assert isinstance(result["results"], str) and result["results"]


def test_multi_turn_message_list(server):
    bot = ChatBot("127.0.0.1", server.port)
    result = bot.generate(["Hi", "Hello! How can I help?", "Tell me a joke."], max_dec_len=16, temperature=0.01)
    assert result["results"]


def test_unreachable_server_returns_error_dict():
    bot = ChatBot("127.0.0.1", free_port())
    result = bot.generate("hello", max_dec_len=4)
    assert "error_msg" in result and result["error_code"] == 503
    items = list(bot.stream_generate("hello", max_dec_len=4))
    assert items[-1]["error_code"] == 503


def test_too_long_returns_error_dict(server):
    bot = ChatBot("127.0.0.1", server.port)
    result = bot.generate("hello " * 50, max_dec_len=5000)
    assert result.get("error_code") == 400 and "max" in result["error_msg"].lower()


def test_timeout_returns_error_dict(server):
    bot = ChatBot("127.0.0.1", server.port)
    result = bot.generate("Write a very long story about the sea.", max_dec_len=900, min_dec_len=900,
                          timeout=0.5)
    assert result.get("error_code") == 408
    # The server keeps serving afterwards.
    assert "results" in bot.generate("Hi", max_dec_len=4)


def test_duplicate_req_id_in_flight_returns_error_dict(server):
    bot = ChatBot("127.0.0.1", server.port)
    running = bot.stream_generate("Write a very long story about the sea.", max_dec_len=900, min_dec_len=900,
                                  req_id="fd-dup-1")
    first = next(running)  # the first request is generating now
    assert first["is_end"] == 0 and first["req_id"] == "fd-dup-1"
    try:
        result = bot.generate("Hi", max_dec_len=4, req_id="fd-dup-1")
        assert result["error_code"] == 409, result
        assert "fd-dup-1" in result["error_msg"] and result["req_id"] == "fd-dup-1"
        items = list(bot.stream_generate("Hi", max_dec_len=4, req_id="fd-dup-1"))
        assert items[-1]["error_code"] == 409
        # Another id is served meanwhile.
        assert "results" in bot.generate("Hi", max_dec_len=4, req_id="fd-dup-2")
    finally:
        running.close()  # closes the connection: the server aborts the long request


def test_req_id_is_the_response_id(server):
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "request_id": "my-own-id"}).encode()
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["id"] == "my-own-id"
    bad = urllib.request.Request(f"{server.url}/v1/chat/completions",
                                 json.dumps({"messages": [{"role": "user", "content": "Hi"}], "request_id": 5}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=120)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == "request_id"
