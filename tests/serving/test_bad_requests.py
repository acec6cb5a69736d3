"""Acceptance 1: malformed requests each get a 4xx with the OpenAI error body, and the server
keeps serving (a normal request succeeds right after each). Also --api-key (401) and
--max-concurrency (429)."""
from __future__ import annotations

import http.client
import json

import pytest

KEY = "sk-serving-test"
SERVER_ARGS = ["--api-key", KEY, "--max-concurrency", "2", "--max-request-bytes", "65536"]
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


def request(server, method: str, path: str, body: bytes | None, headers: dict | None = None
            ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        conn.request(method, path, body=body, headers=AUTH if headers is None else headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# (id, path, body: dict | bytes, expected status, expected param or None, headers or None)
CASES = [
    ("invalid-json", CHAT, b"{", 400, None, None),
    ("body-list", CHAT, b"[]", 400, None, None),
    ("body-string", CHAT, b'"hello"', 400, None, None),
    ("empty-body", CHAT, b"", 400, None, None),
    ("not-utf8", CHAT, b"\xff\xfe{", 400, None, None),
    ("messages-missing", CHAT, {"max_tokens": 2}, 400, "messages", None),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages", None),
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages", None),
    ("message-not-object", CHAT, {"messages": ["hi"]}, 400, "messages", None),
    ("role-missing", CHAT, {"messages": [{"content": "x"}]}, 400, "messages", None),
    ("role-unknown", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", None),
    ("content-int", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    ("content-null-user", CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages", None),
    ("content-image", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages", None),
    ("content-part-int", CHAT, {"messages": [{"role": "user", "content": [1]}]}, 400, "messages", None),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature", None),
    ("temperature-too-high", CHAT, chat(temperature=3), 400, "temperature", None),
    ("temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400,
     "temperature", None),
    ("top-p-zero", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top-p-too-high", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("top-k-negative", CHAT, chat(top_k=-2), 400, "top_k", None),
    ("top-k-float", CHAT, chat(top_k=1.5), 400, "top_k", None),
    ("min-p-too-high", CHAT, chat(min_p=2), 400, "min_p", None),
    ("presence-penalty", CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency-penalty", CHAT, chat(frequency_penalty=-5), 400, "frequency_penalty", None),
    ("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", None),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-string", CHAT, chat(max_tokens="10"), 400, "max_tokens", None),
    ("max-tokens-bool", CHAT, chat(max_tokens=True), 400, "max_tokens", None),
    ("max-tokens-over-model-len", CHAT, chat(max_tokens=100000), 400, "max_tokens", None),
    ("n-zero", CHAT, chat(n=0), 400, "n", None),
    ("n-too-large", CHAT, chat(n=1000), 400, "n", None),
    ("best-of-too-large", CHAT, chat(best_of=1000), 400, "best_of", None),
    ("best-of-beam", CHAT, chat(best_of=3), 400, "best_of", None),
    ("use-beam-search-string", CHAT, chat(use_beam_search="yes"), 400, "use_beam_search", None),
    ("num-beams-too-large", COMP, {"prompt": "x", "num_beams": 100}, 400, "num_beams", None),
    ("num-beams-below-n", COMP, {"prompt": "x", "num_beams": 2, "n": 3}, 400, "num_beams", None),
    ("seed-negative", CHAT, chat(seed=-1), 400, "seed", None),
    ("stop-int", CHAT, chat(stop=5), 400, "stop", None),
    ("stop-empty-string", CHAT, chat(stop=[""]), 400, "stop", None),
    ("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop", None),
    ("stop-token-ids-strings", CHAT, chat(stop_token_ids=["a"]), 400, "stop_token_ids", None),
    ("logit-bias-list", CHAT, chat(logit_bias=[1, 2]), 400, "logit_bias", None),
    ("logit-bias-key-word", CHAT, chat(logit_bias={"hello": 1}), 400, "logit_bias", None),
    ("logit-bias-key-negative", CHAT, chat(logit_bias={"-5": 1}), 400, "logit_bias", None),
    ("logit-bias-key-out-of-vocab", COMP, {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias", None),
    ("logit-bias-too-large", CHAT, chat(logit_bias={"28": 101}), 400, "logit_bias", None),
    ("logit-bias-string-value", CHAT, chat(logit_bias={"28": "up"}), 400, "logit_bias", None),
    ("logprobs-string", CHAT, chat(logprobs="yes"), 400, "logprobs", None),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=5), 400, "top_logprobs", None),
    ("top-logprobs-too-large", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    ("stream-string", CHAT, chat(stream="yes"), 400, "stream", None),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options",
     None),
    ("min-tokens-over-max", CHAT, chat(min_tokens=10, max_tokens=2), 400, "min_tokens", None),
    ("reasoning-max-tokens-zero", CHAT, chat(reasoning_max_tokens=0), 400, "reasoning_max_tokens", None),
    ("chat-template-kwargs-string", CHAT, chat(chat_template_kwargs="x"), 400, "chat_template_kwargs", None),
    ("enable-thinking-string", CHAT, chat(enable_thinking="yes"), 400, "enable_thinking", None),
    ("metadata-string", CHAT, chat(metadata="x"), 400, "metadata", None),
    ("unknown-model", CHAT, chat(model="gpt-4"), 404, "model", None),
    ("model-not-string", CHAT, chat(model=5), 400, "model", None),
    ("too-long-prompt", CHAT, {"messages": [{"role": "user", "content": "hello " * 3000}]}, 400, "messages", None),
    ("too-long-prompt-stream", CHAT, {"messages": [{"role": "user", "content": "hello " * 3000}], "stream": True},
     400, "messages", None),
    ("huge-body", CHAT, {"messages": [{"role": "user", "content": "x" * 100000}]}, 413, None, None),
    ("no-api-key", CHAT, chat(), 401, None, {"Content-Type": "application/json"}),
    ("wrong-api-key", CHAT, chat(), 401, None, {"Authorization": "Bearer nope", "Content-Type": "application/json"}),
    ("prompt-missing", COMP, {"max_tokens": 2}, 400, "prompt", None),
    ("prompt-empty-string", COMP, {"prompt": ""}, 400, "prompt", None),
    ("prompt-empty-list", COMP, {"prompt": []}, 400, "prompt", None),
    ("prompt-negative-id", COMP, {"prompt": [-1]}, 400, "prompt", None),
    ("prompt-id-out-of-vocab", COMP, {"prompt": [999999]}, 400, "prompt", None),
    ("prompt-empty-id-list", COMP, {"prompt": [[1, 2], []]}, 400, "prompt", None),
    ("prompt-object", COMP, {"prompt": {"a": 1}}, 400, "prompt", None),
    ("prompt-bool-ids", COMP, {"prompt": [True, False]}, 400, "prompt", None),
    ("echo-logprobs-beam", COMP, {"prompt": "x", "echo": True, "logprobs": 1, "num_beams": 2}, 400, "echo", None),
    ("continue-final-after-user", CHAT, chat(continue_final_message=True), 400, "continue_final_message", None),
    ("continue-final-with-generation-prompt", CHAT, {"messages": USER + [{"role": "assistant", "content": "Hel"}],
     "continue_final_message": True, "add_generation_prompt": True}, 400, "continue_final_message", None),
    ("add-generation-prompt-string", CHAT, chat(add_generation_prompt="no"), 400, "add_generation_prompt", None),
    ("response-format-schema-invalid", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     400, "response_format", None),
    ("response-format-schema-string", CHAT, chat(response_format={"type": "json_schema", "json_schema": "x"}), 400,
     "response_format", None),
    ("response-format-structural-tag-no-structures", CHAT, chat(response_format={"type": "structural_tag"}), 400,
     "response_format", None),
    ("guided-regex-invalid", CHAT, chat(guided_regex="a(b"), 400, "guided_regex", None),
    ("guided-regex-lookahead", COMP, {"prompt": "x", "guided_regex": "a(?=b)"}, 400, "guided_regex", None),
    ("guided-json-invalid-text", CHAT, chat(guided_json="{not json"), 400, "guided_json", None),
    ("guided-json-number", CHAT, chat(guided_json=5), 400, "guided_json", None),
    ("guided-choice-empty", CHAT, chat(guided_choice=[]), 400, "guided_choice", None),
    ("guided-choice-not-strings", CHAT, chat(guided_choice=[1, 2]), 400, "guided_choice", None),
    ("guided-grammar-invalid", CHAT, chat(guided_grammar="root ::= ("), 400, "guided_grammar", None),
    ("structured-outputs-choice-string", CHAT, chat(structured_outputs={"choice": "ab"}), 400, "structured_outputs",
     None),
    ("structured-outputs-regex-invalid", CHAT, chat(structured_outputs={"regex": "(("}), 400, "structured_outputs",
     None),
    ("guided-two-constraints", CHAT, chat(guided_regex="a+", guided_choice=["b"]), 400, "guided_choice", None),
    ("guided-with-json-mode", CHAT, chat(guided_regex="a+", response_format={"type": "json_object"}), 400,
     "response_format", None),
    ("guided-beam", COMP, {"prompt": "x", "num_beams": 2, "guided_choice": ["a", "b"]}, 400, "guided_choice", None),
    ("response-format-unknown", CHAT, chat(response_format={"type": "xml"}), 400, "response_format", None),
    ("response-format-string", CHAT, chat(response_format="json"), 400, "response_format", None),
    ("response-format-beam", COMP, {"prompt": "x", "num_beams": 2, "response_format": {"type": "json_object"}}, 400,
     "response_format", None),
    ("tokenize-no-prompt", "/tokenize", {}, 400, "prompt", None),
    ("tokenize-prompt-int", "/tokenize", {"prompt": 5}, 400, "prompt", None),
    ("tokenize-messages-string", "/tokenize", {"messages": "hi"}, 400, "messages", None),
    ("tokenize-unknown-model", "/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model", None),
    ("tokenize-no-api-key", "/tokenize", {"prompt": "x"}, 401, None, {"Content-Type": "application/json"}),
    ("detokenize-no-tokens", "/detokenize", {}, 400, "tokens", None),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [999999]}, 400, "tokens", None),
    ("detokenize-strings", "/detokenize", {"tokens": ["a"]}, 400, "tokens", None),
    ("completion-logprobs-too-large", COMP, {"prompt": "x", "logprobs": 50}, 400, "logprobs", None),
    ("completion-too-long", COMP, {"prompt": list(range(100, 2200))}, 400, "prompt", None),
]


def assert_error_body(raw: bytes, param: str | None) -> dict:
    body = json.loads(raw)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_normal_request_works(server) -> None:
    status, raw = request(server, "POST", CHAT, json.dumps(chat(max_tokens=1)).encode())
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == 1


def test_case_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, path, body, status, param, headers", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server, name, path, body, status, param, headers):
    raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, raw = request(server, "POST", path, raw_body, headers)
    assert got == status, raw[:500]
    assert_error_body(raw, param)
    assert_normal_request_works(server)


@pytest.mark.parametrize("method, path, status", [("GET", CHAT, 405), ("POST", "/v1/nope", 404)])
def test_wrong_route(server, method, path, status):
    got, raw = request(server, method, path, b"{}" if method == "POST" else None)
    assert got == status
    assert_error_body(raw, None)


def test_health_needs_no_key(server):
    got, _ = request(server, "GET", "/health", None, {})
    assert got == 200


def test_over_max_concurrency_gets_429(server):
    streams = []
    body = json.dumps({"messages": USER, "max_tokens": 1500, "min_tokens": 1500, "stream": True}).encode()
    try:
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
            conn.request("POST", CHAT, body=body, headers=AUTH)
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.readline().startswith(b"data: ")  # the stream is open and admitted
            streams.append(conn)
        got, raw = request(server, "POST", CHAT, json.dumps(chat()).encode())
        assert got == 429
        assert assert_error_body(raw, None)["code"] == "rate_limit_exceeded"
    finally:
        for conn in streams:
            conn.close()
    # Disconnected streams free their slots: once the server notices, requests succeed again.
    for _ in range(200):
        got, raw = request(server, "POST", CHAT, json.dumps(chat(max_tokens=1)).encode())
        if got == 200:
            break
        assert got == 429
    assert got == 200
