"""The OpenAI-compatible API against a real server: seeds 001/004 examples, the openai SDK
(sync, async, streaming), completions prompt forms, FastDeploy's extra fields, n > 1, stop
strings, metrics, and 32 concurrent streams with one api worker."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import urllib.request

import openai
import pydantic
import pytest

import fastdeploy
from stream_helpers import run_concurrent_streams

SERVER_ARGS = ["--workers", "1"]


def post(server, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sse_events(server, path: str, body: dict) -> list[dict | str]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    events: list[dict | str] = []
    with urllib.request.urlopen(req, timeout=300) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = resp.read().decode()
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---- seeds 001 and 004, as written (host and port changed) ------------------------------------
def test_seed_curl_example(server):
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{server.url}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-d", '{\n"messages": [\n{"role": "user", "content": "Hello!"}\n]\n}'],
        capture_output=True, text=True, timeout=300, check=True)
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] >= 1


SEED_001 = '''
import openai
import pydantic
ip = "127.0.0.1"
service_http_port = "{port}" # 服务配置的
client = openai.Client(base_url=f"http://{{ip}}:{{service_http_port}}/v1", api_key="EMPTY_API_KEY")
# 非流式对话
response = client.chat.completions.create(
model="default",
messages=[
{{"role": "system", "content": "You are a helpful AI assistant."}}, # system不是必需,可选
{{"role": "user", "content": "List 3 countries and their capitals."}},
],
temperature=1,
max_tokens=1024,
stream=False,
)
print(response)
# 流式对话,历史多轮
response = client.chat.completions.create(
model="default",
messages=[
{{"role": "system", "content": "You are a helpful AI assistant."}}, # system不是必需,可选
{{"role": "user", "content": "List 3 countries and their capitals."}},
{{"role": "assistant", "content": "China(Beijing), France(Paris), Australia(Canberra)."}},
{{"role": "user", "content": "OK, tell more."}},
],
temperature=1,
max_tokens=1024,
stream=True,
)
for chunk in response:
  if chunk.choices[0].delta is not None:
    print(chunk.choices[0].delta, end='')
print("\\n")
'''

SEED_004 = '''
import openai
import pydantic
host = "127.0.0.1"
port = "{port}"
client = openai.Client(base_url=f"http://{{host}}:{{port}}/v1", api_key="null")
response = client.chat.completions.create(
    model="null",
    messages=[
        {{"role": "system", "content": "I'm a helpful AI assistant."}},
        {{"role": "user", "content": "把李白的静夜思改写为现代诗"}},
    ],
    stream=True,
)
for chunk in response:
    if chunk.choices[0].delta:
        print(chunk.choices[0].delta.content, end='')
print('\\n')
'''


@pytest.mark.parametrize("script", [SEED_001, SEED_004], ids=["seed001", "seed004"])
def test_seed_python_examples(server, script):
    # The seeds' examples exactly as written (host and port replaced).
    code = textwrap.dedent(script).format(port=server.port)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    if script is SEED_001:
        assert "ChatCompletion(" in out.stdout and "ChoiceDelta(" in out.stdout


# ---- the openai SDK ----------------------------------------------------------------------------
def test_sdk_sync_chat_and_completion(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    comp = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4,
                                     temperature=0)
    assert comp.choices[0].text and comp.choices[0].finish_reason in ("stop", "length")
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]


def test_sdk_streaming_with_usage(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    stream = client.chat.completions.create(model="smollm2-135m-instruct",
                                            messages=[{"role": "user", "content": "Count to five."}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_sdk_async(server):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
        calls = [client.chat.completions.create(model="null", messages=[{"role": "user", "content": f"Number {i}"}],
                                                max_tokens=6, temperature=0) for i in range(4)]
        results = await asyncio.gather(*calls)
        await client.close()
        return [r.choices[0].message.content for r in results]

    texts = asyncio.run(run())
    assert len(texts) == 4 and all(texts)


# ---- FastDeploy fields and request forms -------------------------------------------------------
def test_stream_chunks_carry_fastdeploy_fields(server):
    events = sse_events(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True, "temperature": 0,
        "return_token_ids": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    token_ids = [t for c in chunks for t in c["choices"][0]["delta"].get("token_ids", [])]
    assert all("arrival_time" in c["choices"][0] for c in chunks)
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == len(token_ids) == 5
    assert "cached_tokens" in usage["prompt_tokens_details"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_prompt_forms_and_token_ids(server):
    status, text_resp = post(server, "/v1/completions", {"prompt": "Hello world", "max_tokens": 3,
                                                         "temperature": 0, "return_token_ids": True})
    assert status == 200
    ids = text_resp["choices"][0]["prompt_token_ids"]
    status, ids_resp = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 3, "temperature": 0})
    assert status == 200 and ids_resp["choices"][0]["text"] == text_resp["choices"][0]["text"]
    status, many = post(server, "/v1/completions", {"prompt": ["One", "Two", [ids[0]]], "max_tokens": 2, "n": 2})
    assert status == 200 and [c["index"] for c in many["choices"]] == list(range(6))
    assert many["usage"]["completion_tokens"] == sum(2 for c in many["choices"] if c["finish_reason"] == "length") \
        or many["usage"]["completion_tokens"] <= 12


def test_n_choices_and_prefix_cache(server):
    body = {"messages": [{"role": "user", "content": "Write a word." * 40}], "max_tokens": 4, "n": 3, "seed": 7}
    status, first = post(server, "/v1/chat/completions", body)
    assert status == 200 and len(first["choices"]) == 3
    assert first["usage"]["completion_tokens"] <= 12
    status, second = post(server, "/v1/chat/completions", body)
    assert status == 200
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_stop_string_cuts_output(server):
    status, free = post(server, "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0})
    text = free["choices"][0]["text"]
    assert status == 200 and len(text) > 4
    stop = text[3:5]
    status, cut = post(server, "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0,
                                                   "stop": [stop]})
    assert status == 200
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    events = sse_events(server, "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0,
                                                    "stop": [stop], "stream": True, "include_stop_str_in_output": True})
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == text[:text.index(stop) + len(stop)]


def test_logprobs(server):
    status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert status == 200
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)


def test_logit_bias_with_the_sdk(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    free = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4,
                                     temperature=0, extra_body={"return_token_ids": True})
    first = free.choices[0].model_extra["completion_token_ids"][0]
    # Banning the greedy first token changes it; a +100 bias makes a chosen token every token.
    banned = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4,
                                       temperature=0, logit_bias={str(first): -100},
                                       extra_body={"return_token_ids": True})
    assert banned.choices[0].model_extra["completion_token_ids"][0] != first
    forced = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0.8, seed=3, logit_bias={"28": 100},
                                            logprobs=True, extra_body={"return_token_ids": True})
    assert len(forced.choices[0].logprobs.content) == 3
    assert all(c.logprob > -1e-3 for c in forced.choices[0].logprobs.content)
    assert forced.choices[0].message.model_extra["completion_token_ids"] == [28, 28, 28]


def test_echo_with_logprobs_scores_the_prompt(server):
    # What evaluation harnesses send to score a text: echo, logprobs, one new token.
    prompt = "The capital of France is Paris."
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    comp = client.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                     logprobs=1, extra_body={"return_token_ids": True})
    choice = comp.choices[0]
    prompt_ids = choice.model_extra["prompt_token_ids"]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert len(lp.tokens) == len(prompt_ids) + 1 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens[:len(prompt_ids)]) == prompt
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] == len(prompt)
    # Streamed: the prompt and its logprobs come first, and the stream adds up to the same.
    events = sse_events(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                                    "echo": True, "logprobs": 1, "stream": True})
    chunks = [e["choices"][0] for e in events if isinstance(e, dict) and e["choices"]]
    assert chunks[0]["text"].startswith(prompt)
    assert chunks[0]["logprobs"]["token_logprobs"][:len(prompt_ids)] == lp.token_logprobs[:len(prompt_ids)]
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    assert "".join(tokens) == "".join(c["text"] for c in chunks)
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and len(offsets) == len(prompt_ids) + 3
    # max_tokens 0 scores the text alone.
    status, only = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert status == 200, only
    assert only["choices"][0]["text"] == prompt and only["choices"][0]["finish_reason"] == "length"
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp.token_logprobs[:len(prompt_ids)]
    assert only["usage"]["completion_tokens"] == 0 and only["usage"]["prompt_tokens"] == len(prompt_ids)
    events = sse_events(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2,
                                                    "stream": True, "stream_options": {"include_usage": True}})
    streamed = [e for e in events if isinstance(e, dict)]
    assert "".join(c["text"] for e in streamed for c in e["choices"]) == prompt
    assert streamed[-1]["usage"]["completion_tokens"] == 0
    status, err = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0})
    assert status == 400 and err["error"]["param"] == "max_tokens"
    # Token-id prompts are echoed as their text.
    status, by_ids = post(server, "/v1/completions", {"prompt": [prompt_ids, prompt_ids[:3]], "max_tokens": 1,
                                                      "echo": True, "temperature": 0})
    assert status == 200
    assert by_ids["choices"][0]["text"] == choice.text
    assert prompt.startswith(by_ids["choices"][1]["text"][:5])
    # Without logprobs, echo only prefixes the text.
    status, plain = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "echo": True})
    assert status == 200 and plain["choices"][0]["text"].startswith(prompt)
    assert plain["choices"][0]["logprobs"] is None


def test_tokenize_counts_what_usage_reports(server):
    messages = [{"role": "user", "content": "Count my tokens, please."}]
    status, chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert status == 200
    status, counted = post(server, "/tokenize", {"messages": messages})
    assert status == 200, counted
    assert counted["count"] == len(counted["tokens"]) == chat["usage"]["prompt_tokens"]
    assert counted["max_model_len"] > 0 and counted["token_strs"] is None
    status, bare = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert status == 200 and bare["count"] < counted["count"]
    prompt = "Tokenizers split text into pieces."
    status, comp = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    status, text_ids = post(server, "/tokenize", {"prompt": prompt, "return_token_strs": True})
    assert status == 200 and text_ids["count"] == comp["usage"]["prompt_tokens"]
    assert "".join(text_ids["token_strs"]) == prompt
    status, back = post(server, "/detokenize", {"tokens": text_ids["tokens"]})
    assert status == 200 and back == {"prompt": prompt}


def test_continue_final_message(server):
    begun = [{"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": "1. Red\n2."}]
    status, counted = post(server, "/tokenize", {"messages": begun, "continue_final_message": True})
    assert status == 200, counted
    status, text = post(server, "/detokenize", {"tokens": counted["tokens"]})
    assert text["prompt"].endswith("1. Red\n2.")  # the reply is carried on, not closed
    status, fresh = post(server, "/tokenize", {"messages": begun})
    assert fresh["count"] > counted["count"]  # a closed assistant turn and a new one opened
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    chat = client.chat.completions.create(model="default", messages=begun, max_tokens=6, temperature=0,
                                          extra_body={"continue_final_message": True})
    assert chat.choices[0].message.content
    assert chat.usage.prompt_tokens == counted["count"]


def test_response_format_json_object(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    ask = [{"role": "user", "content": "Describe a cat as JSON with keys name, age and color."}]
    chat = client.chat.completions.create(model="default", messages=ask, max_tokens=150, temperature=0,
                                          response_format={"type": "json_object"})
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    events = sse_events(server, "/v1/completions", {"prompt": "The cat, as a JSON object:", "max_tokens": 120,
                                                    "temperature": 0, "stream": True,
                                                    "response_format": {"type": "json_object"}})
    chunks = [e["choices"][0] for e in events if isinstance(e, dict) and e["choices"]]
    text = "".join(c["text"] for c in chunks)
    assert text.lstrip().startswith("{")
    if chunks[-1]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


BOOK_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["author", "title", "genre"],
               "properties": {"author": {"type": "string", "maxLength": 40},
                              "title": {"type": "string", "maxLength": 60},
                              "genre": {"enum": ["Romance", "Mystery", "Dystopian"]}}}


def test_structured_outputs(server):
    """FastDeploy's structured-output surface: response_format json_schema (also through the SDK's
    parse), guided_choice / guided_regex / guided_grammar in extra_body, streamed too."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    ask = [{"role": "user", "content": "Describe a famous novel as JSON: author, title and genre."}]
    chat = client.chat.completions.create(
        model="default", messages=ask, max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK_SCHEMA}})
    doc = json.loads(chat.choices[0].message.content)
    assert set(doc) == {"author", "title", "genre"} and doc["genre"] in ("Romance", "Mystery", "Dystopian")
    assert chat.choices[0].finish_reason == "stop"

    class Tower(pydantic.BaseModel):
        addr: str = pydantic.Field(max_length=60)
        height: int

    parsed = client.beta.chat.completions.parse(
        model="default", max_tokens=80, temperature=0, response_format=Tower,
        messages=[{"role": "user", "content": "The Oriental Pearl Tower is at No.1 Century Avenue, Shanghai, "
                                              "468 meters high. What is its address and height?"}])
    assert isinstance(parsed.choices[0].message.parsed, Tower)

    choices = ["positive", "negative"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Loved it!"}],
                                              extra_body=extra)
        assert chat.choices[0].message.content in choices
    # FastDeploy's docs anchor their regexes; the whole output must match anyway.
    chat = client.chat.completions.create(model="default", max_tokens=40,
                                          messages=[{"role": "user", "content": "A web address, please."}],
                                          extra_body={"guided_regex": r"^https:\/\/www\.[a-z]{1,12}\.com\/?$\n"})
    assert re.fullmatch(r"https://www\.[a-z]{1,12}\.com/?\n", chat.choices[0].message.content)
    grammar = 'root ::= "<h1>" [A-Za-z ]{1,20} "</h1>"'
    stream = client.completions.create(model="default", prompt="An HTML heading:", max_tokens=40, stream=True,
                                       extra_body={"guided_grammar": grammar})
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream if c.choices]
    assert re.fullmatch(r"<h1>[A-Za-z ]{1,20}</h1>", "".join(text for text, _ in pieces))
    assert pieces[-1][1] == "stop"


def test_health_ping_metrics(server):
    with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(server.url + "/ping", timeout=30) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(server.url + "/version", timeout=30) as resp:
        assert json.loads(resp.read())["version"] == fastdeploy.__version__
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    for name in ("fastdeploy:num_requests_running", "fastdeploy:num_requests_waiting",
                 "fastdeploy:gpu_cache_usage_perc", "fastdeploy:time_to_first_token_seconds_bucket",
                 "fastdeploy:time_per_output_token_seconds_bucket", "fastdeploy:e2e_request_latency_seconds_bucket",
                 "fastdeploy:request_prompt_tokens_bucket", "fastdeploy:request_generation_tokens_bucket",
                 "fastdeploy:prompt_tokens_total", "fastdeploy:generation_tokens_total",
                 "fastdeploy:request_success_total", "fastdeploy:hit_token_rate"):
        assert name in text, name


def test_32_concurrent_streams_one_worker(server):
    run_concurrent_streams(server.url)
