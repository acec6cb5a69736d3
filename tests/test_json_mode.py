"""SamplingParams(response_format="json_object"): the default model's output is one JSON object,
greedy or sampled, and the request ends when the object closes. The HTTP side (response_format on
both endpoints) is in tests/serving/test_openai_api.py; the masks in test_guided_decoding.py."""
from __future__ import annotations

import json

import pytest

from fastdeploy import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Describe a cat as JSON with keys name, age and color."}],
    [{"role": "user", "content": "List three fruits."}],  # nothing here asks for JSON
]


def test_outputs_are_json_objects(llm):
    params = [SamplingParams(temperature=0, max_tokens=200, response_format="json_object"),
              SamplingParams(temperature=0.9, seed=5, max_tokens=200, response_format="json_object")]
    for conversation in PROMPTS:
        for p in params:
            out = llm.chat(conversation, p, use_tqdm=False)[0].outputs
            assert out.finish_reason in ("stop", "length")
            if out.finish_reason == "stop":
                assert isinstance(json.loads(out.text), dict), out.text
            else:  # cut by max_tokens: still a prefix of one
                assert out.text.lstrip().startswith("{")
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_greedy_object_closes(llm):
    conversation = PROMPTS[0]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=200, response_format="json_object"),
                   use_tqdm=False)[0].outputs
    assert out.finish_reason == "stop"
    doc = json.loads(out.text)
    assert isinstance(doc, dict) and doc


@pytest.mark.parametrize("value", ["json", "json_schema", 1])
def test_response_format_validation(value):
    with pytest.raises(ValueError, match="response_format"):
        SamplingParams(response_format=value)


def test_json_mode_refuses_beam_search():
    with pytest.raises(ValueError, match="response_format"):
        SamplingParams(response_format="json_object", use_beam_search=True, n=1, best_of=2)
