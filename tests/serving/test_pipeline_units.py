"""Unit tests of the serving plumbing without processes: wire frames, step-output splitting and
the detokenizer worker's per-request state (ordering, stop strings, errors, bounded maps)."""
from __future__ import annotations

import pytest

from fastdeploy.engine.engine_process import split_step_output
from fastdeploy.engine.protocol import AbortRequests, EngineRequest, StepOutput
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.entrypoints import detokenizer_worker, wire
from fastdeploy.entrypoints.detokenizer_worker import Detokenizer, _Outgoing


@pytest.fixture(scope="module")
def tok(default_model_path):
    from fastdeploy.input.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path)


def step(rows: list[tuple[str, list[int], str | None]]) -> StepOutput:
    return StepOutput(request_ids=[r[0] for r in rows], new_token_ids=[r[1] for r in rows],
                      finish_reasons=[r[2] for r in rows], num_prompt_tokens=[3] * len(rows),
                      num_cached_tokens=[0] * len(rows), step_time=1.0)


def register(rid: str, n: int = 1, **params) -> wire.DetokRegister:
    return wire.DetokRegister(request_id=rid, reply_to="ipc://api-0", n=n, sampling_params=SamplingParams(**params),
                              num_prompt_tokens=3)


def test_every_frame_round_trips():
    frames = [
        wire.GenerateRequest(request_id="r", reply_to="ipc://a", sampling_params=SamplingParams(n=2, stop=["x"]),
                             messages=[{"role": "user", "content": "hi"}], chat_template_kwargs={"k": 1}),
        register("r", 2),
        wire.TextBatch(chunks=[wire.TextChunk(request_id="r", index=1, text="hé", token_ids=[1, 2],
                                              logprobs=[wire.LogprobEntry("a", -0.5, [("b", -1.0)], 7)])]),
        wire.ErrorFrame(request_id="r", status=400, message="bad", param="prompt"),
        wire.Ready(name="engine", pid=1, max_model_len=2048, eos_token_ids=[2]),
        wire.Failed(name="engine", pid=1, message="boom"),
        wire.ProcessDied(name="engine", pid=1, exitcode=-9),
        EngineRequest(request_id="r-0", prompt_token_ids=[1, 2], sampling_params=SamplingParams()),
        AbortRequests(request_ids=["r-0"]),
        step([("r-0", [5], None)]),
    ]
    for frame in frames:
        assert wire.decode(wire.encode(frame)) == frame


@pytest.mark.parametrize("data", [b"", b"\x00", b"garbage", b"\x92\xa3zzz\x01", b"\x91\xa3gen"])
def test_undecodable_frames_are_none_not_crashes(data):
    assert wire.decode(data) is None


def test_split_step_output_by_destination():
    out = step([("a-0", [1], None), ("b-0", [2], "stop"), ("a-1", [3], None)])
    parts = split_step_output(out, {"a-0": "ipc://d0", "a-1": "ipc://d0", "b-0": "ipc://d1"})
    assert parts["ipc://d0"].request_ids == ["a-0", "a-1"]
    assert parts["ipc://d0"].new_token_ids == [[1], [3]]
    assert parts["ipc://d1"].finish_reasons == ["stop"]
    assert split_step_output(out, {})[""] is out


def test_rows_before_registration_are_replayed(tok):
    d = Detokenizer(tok, None)
    ids = tok.encode("Hello world")
    out = _Outgoing()
    d.on_frame(step([("r-0", ids, None)]), out)
    assert not out.chunks and "r" in d.orphans
    d.on_frame(register("r"), out)
    d.on_frame(step([("r-0", [], "length")]), out)
    chunks = out.chunks["ipc://api-0"]
    assert "".join(c.text for c in chunks) == "Hello world"
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == len(ids)
    assert not d.requests and not d.orphans


def test_stop_string_aborts_in_engine_and_frees_state(tok):
    d = Detokenizer(tok, None)
    out = _Outgoing()
    d.on_frame(register("r", stop=["world"]), out)
    d.on_frame(step([("r-0", tok.encode("Hello world and more"), None)]), out)
    assert out.aborts == ["r-0"]
    [chunk] = out.chunks["ipc://api-0"]
    assert chunk.text == "Hello " and chunk.finish_reason == "stop"
    assert not d.requests
    late = _Outgoing()
    d.on_frame(step([("r-0", [], "abort")]), late)  # the engine's answer to our abort
    assert not late.chunks and not d.orphans


def test_engine_error_fails_request_once_and_aborts_siblings(tok):
    d = Detokenizer(tok, None)
    out = _Outgoing()
    d.on_frame(register("r", n=3), out)
    d.on_frame(wire.ErrorFrame(request_id="r-1", status=400, message="too long", param="prompt"), out)
    d.on_frame(wire.ErrorFrame(request_id="r-2", status=400, message="too long", param="prompt"), out)
    assert [e.request_id for _, e in out.errors] == ["r"]
    assert out.aborts == ["r-0", "r-1", "r-2"]
    assert not d.requests


def test_aborted_requests_are_freed_and_maps_are_bounded(tok, monkeypatch):
    monkeypatch.setattr(detokenizer_worker, "MAX_ORPHAN_REQUESTS", 3)
    monkeypatch.setattr(detokenizer_worker, "MAX_RECENTLY_DONE", 5)
    d = Detokenizer(tok, None)
    out = _Outgoing()
    for i in range(20):
        d.on_frame(register(f"r{i}", n=2), out)
        d.on_frame(step([(f"r{i}-0", [], "abort"), (f"r{i}-1", [], "abort")]), out)
    assert not d.requests and len(d.recently_done) == 5
    for i in range(10):
        d.on_frame(step([(f"ghost{i}-0", [1], None)]), out)
    assert len(d.orphans) == 3
