"""Seed 002's curl examples as written (host and port changed), against a server started the way
the seed starts its own: --served-model-name chinese-llama-alpaca-2. Includes its beam search
example (num_beams: 4). A short --max-model-len bounds the chat examples, which set no max_tokens
(chat then generates up to the model limit, FastDeploy's default)."""
from __future__ import annotations

import json
import subprocess

SERVER_ARGS = ["--served-model-name", "chinese-llama-alpaca-2", "--max-model-len", "512", "--block-size", "16",
               "--reasoning-parser", "qwen3"]


def curl(server, path: str, data: str) -> dict:
    out = subprocess.run(["curl", "-s", f"{server.url}{path}", "-H", "Content-Type: application/json", "-d", data],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def test_completion_example(server):
    body = curl(server, "/v1/completions", '''{
    "model": "chinese-llama-alpaca-2",
    "prompt": "告诉我中国的首都在哪里"
  }''')
    assert body["object"] == "text_completion" and body["model"] == "chinese-llama-alpaca-2"
    assert isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] <= 16  # the OpenAI default max_tokens for completions


def test_beam_search_completion_example(server):
    body = curl(server, "/v1/completions", '''{
    "model": "chinese-llama-alpaca-2",
    "prompt": "告诉我中国和美国分别各有哪些优点缺点",
    "max_tokens": 90,
    "temperature": 0.7,
    "num_beams": 4,
    "top_k": 40
  }''')
    [choice] = body["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
    assert 1 <= body["usage"]["completion_tokens"] <= 90


def test_chat_examples(server):
    one = curl(server, "/v1/chat/completions", '''{
    "model": "chinese-llama-alpaca-2",
    "messages": [
      {"role": "user","content": "给我讲一些有关杭州的故事吧"}
    ]
  }''')
    assert one["choices"][0]["message"]["role"] == "assistant"
    # The qwen3 parser is on; this model never opens <think>, so everything is content.
    assert one["choices"][0]["message"]["reasoning_content"] is None
    multi = curl(server, "/v1/chat/completions", '''{
    "model": "chinese-llama-alpaca-2",
    "messages": [
      {"role": "user","content": "给我讲一些有关杭州的故事吧"},
      {"role": "assistant","content": "好的,请问您对杭州有什么特别的偏好吗?"},
      {"role": "user","content": "我比较喜欢和西湖,可以给我讲一下西湖吗"}
    ],
    "repetition_penalty": 1.0
  }''')
    assert multi["choices"][0]["finish_reason"] in ("stop", "length")
    assert multi["usage"]["total_tokens"] <= 512


def test_beam_search_chat_n_best_and_stream(server):
    data = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "use_beam_search": True,
            "n": 2, "best_of": 3, "max_tokens": 8, "return_token_ids": True}
    body = curl(server, "/v1/chat/completions", json.dumps(data))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"]["content"] != body["choices"][1]["message"]["content"]
    assert body["usage"]["completion_tokens"] == sum(len(c["message"]["completion_token_ids"])
                                                     for c in body["choices"])
    out = subprocess.run(["curl", "-sN", f"{server.url}/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps({**data, "stream": True})], capture_output=True, text=True, timeout=600)
    events = [block[6:] for block in out.stdout.split("\n\n") if block]
    assert events[-1] == "[DONE]"
    finished = [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finished) == [0, 1]
