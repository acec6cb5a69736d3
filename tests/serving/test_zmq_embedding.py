"""The ZeroMQ embedding (`--zmq-bind`) with the real default model: EngineClient (asyncio and
blocking), aborts freeing KV blocks, duplicate ids, and frames that do not decode."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import msgspec
import pytest
import zmq

from fastdeploy.client import AsyncEngineClient, EngineClient, EngineClientError
from fastdeploy.engine.sampling_params import GuidedDecodingParams, SamplingParams
from fastdeploy.entrypoints import wire
from serving.conftest import free_port

ZMQ_PORT = free_port()
ADDR = f"tcp://127.0.0.1:{ZMQ_PORT}"
SERVER_ARGS = ["--zmq-bind", ADDR]
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def wait_idle(server, timeout: float = 60.0) -> None:
    """The engine publishes its gauges when idle; wait until it reports no running request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while metric(server, "fastdeploy:num_requests_running") > 0 or metric(server, "fastdeploy:num_requests_waiting") > 0:
        assert loop.time() < deadline, "the engine did not become idle"
        await asyncio.sleep(0.1)


async def test_eight_concurrent_requests_one_aborted_midway(server):
    total = metric(server, "fastdeploy:available_gpu_block_num")
    async with AsyncEngineClient(ADDR, timeout=120) as client:
        streams = [await client.submit(f"Count from 1 to 100, request {i}:", request_id=f"req-{i}",
                                       sampling_params=dict(max_tokens=48, ignore_eos=True, temperature=0.0))
                   for i in range(7)]
        victim = await client.submit("Write a very long story about the sea.", request_id="victim",
                                     sampling_params=LONG)

        async def consume(stream):
            return [chunk async for chunk in stream]

        async def abort_midway():
            seen, out, aborted = 0, [], False
            async for chunk in victim:
                out.append(chunk)
                seen += len(chunk.token_ids)
                if seen >= 5 and not aborted:
                    aborted = True
                    await victim.abort()
            return out

        results = await asyncio.gather(*(consume(s) for s in streams), abort_midway())
    for i, chunks in enumerate(results[:7]):
        assert chunks[-1].finish_reason == "length", f"req-{i} did not complete"
        assert sum(len(c.token_ids) for c in chunks) == 48
        assert {c.request_id for c in chunks} == {f"req-{i}"}
    victim_chunks = results[7]
    assert victim_chunks[-1].finish_reason == "abort"
    assert 5 <= sum(len(c.token_ids) for c in victim_chunks) < LONG["max_tokens"]
    await wait_idle(server)
    assert metric(server, "fastdeploy:free_gpu_block_num") == total


def test_blocking_client_generate_matches_stream(server):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    with EngineClient(ADDR, timeout=120) as client:
        whole = client.generate(messages=[{"role": "user", "content": "What is 2+2?"}], sampling_params=params)
        pieces = list(client.submit(messages=[{"role": "user", "content": "What is 2+2?"}], sampling_params=params))
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.text and whole.text == "".join(c.text for c in pieces)
    assert whole.num_prompt_tokens > 0


def test_blocking_client_n_choices_and_bad_values(server):
    with EngineClient(ADDR, timeout=120) as client:
        result = client.generate("The sky is", sampling_params=dict(n=2, max_tokens=4, seed=1))
        assert [c.index for c in result.choices] == [0, 1]
        assert all(len(c.token_ids) == 4 for c in result.choices)
        with pytest.raises(EngineClientError) as err:
            client.generate("x" * 10, sampling_params=dict(max_tokens=100000))
        assert err.value.status == 400 and err.value.param == "max_tokens"
        with pytest.raises(ValueError, match="top_p"):
            client.submit("hi", sampling_params=dict(top_p=5.0))
        with pytest.raises(ValueError, match="guided_decoding"):
            client.submit("hi", sampling_params=dict(guided_decoding={"regex": "a(b"}))
        # The client still works after the errors.
        assert client.generate("Hello", sampling_params=dict(max_tokens=2)).choices[0].token_ids


def test_structured_output_over_zmq(server):
    """GuidedDecodingParams crosses the wire inside SamplingParams (also given as a dict)."""
    ask = [{"role": "user", "content": "Is the sea wet? Answer yes or no."}]
    with EngineClient(ADDR, timeout=120) as client:
        for guided in (GuidedDecodingParams(choice=["yes", "no"]), {"choice": ["yes", "no"]}):
            result = client.generate(messages=ask, sampling_params=dict(max_tokens=8, guided_decoding=guided))
            assert result.text in ("yes", "no") and result.choices[0].finish_reason == "stop"
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                  "required": ["n"], "additionalProperties": False}
        result = client.generate(messages=[{"role": "user", "content": "Give a number as JSON."}],
                                 sampling_params=SamplingParams(max_tokens=60, temperature=0,
                                                                guided_decoding=GuidedDecodingParams(json=schema)))
        assert result.choices[0].finish_reason == "stop", result.text
        assert 0 <= json.loads(result.text)["n"] <= 999


async def test_duplicate_request_id_in_flight_is_refused(server):
    async with AsyncEngineClient(ADDR, timeout=120) as first, AsyncEngineClient(ADDR, timeout=120) as second:
        running = await first.submit("Tell me a story.", request_id="same-id", sampling_params=LONG)
        it = running.__aiter__()
        await it.__anext__()  # it is in the engine now
        with pytest.raises(EngineClientError) as err:
            await second.generate("Another prompt", request_id="same-id", sampling_params=dict(max_tokens=4))
        assert err.value.status == 409 and err.value.param == "request_id"
        await running.abort()
        rest = [chunk async for chunk in it]
        assert rest[-1].finish_reason == "abort"
        # Once it is done, the id is free again.
        again = await second.generate("Another prompt", request_id="same-id", sampling_params=dict(max_tokens=4))
        assert len(again.choices[0].token_ids) == 4


def test_undecodable_and_wrong_version_frames_get_error_replies(server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ADDR)
    try:
        def ask(parts: list[bytes]) -> wire.ErrorFrame:
            sock.send_multipart(parts)
            assert sock.poll(30000), "no reply"
            version, payload = sock.recv_multipart()
            assert version == str(wire.SCHEMA_VERSION).encode()
            frame = wire.decode(payload)
            assert isinstance(frame, wire.ErrorFrame), frame
            return frame

        version = str(wire.SCHEMA_VERSION).encode()
        assert ask([version, b"\xc1not msgpack"]).code == "bad_frame"
        assert ask([b"999", wire.encode(wire.AbortRequests(request_ids=["x"]))]).code == "unsupported_schema_version"
        assert ask([b"only one part"]).status == 400
        # A well-formed frame of the wrong kind is refused too.
        assert ask([version, wire.encode(wire.Ready(name="me", pid=1))]).code == "bad_frame"
        # Sampling parameters are validated on decode: the message names the field.
        # (GenerateRequest is an array: tag, request_id, reply_to, sampling_params (n, best_of,
        # presence, frequency, repetition, temperature), prompt.)
        bad = msgspec.msgpack.encode(["gen", "r", "", [1, None, 0.0, 0.0, 1.0, -1.0], "hi"])
        assert "temperature" in ask([version, bad]).message
    finally:
        sock.close()
        ctx.term()
    # The gateway still serves.
    with EngineClient(ADDR, timeout=120) as client:
        assert client.generate("Hi", sampling_params=dict(max_tokens=2)).choices[0].token_ids
