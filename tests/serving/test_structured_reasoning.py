"""Structured output behind a reasoning parser, through the server's tokenizer workers: a parser
that takes the output as reasoning from its start (ernie-45-vl) holds the constraint back until
the model's `</think>`; with enable_thinking off the constraint holds from the first token. The
offline side is in tests/test_guided_decoding.py."""
from __future__ import annotations

import openai

SERVER_ARGS = ["--reasoning-parser", "ernie-45-vl", "--max-model-len", "1024"]
# The prompt leaves a think block open; few-shot, so that the model closes it first.
_SHOT = "Question: is fire hot?\n<think>\nok\n</think>\nyes\n\nQuestion: is ice hot?\n<think>\nok\n</think>\nno\n\n"
THINKING_PROMPT = _SHOT * 3 + "Question: is the sun hot?\n<think>\nok\n"
YES_NO = {"guided_choice": ["yes", "no"], "return_token_ids": True}


def test_constraint_waits_for_the_end_of_reasoning(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    done = client.completions.create(model="default", prompt=THINKING_PROMPT, max_tokens=30, temperature=0,
                                     extra_body=YES_NO)
    choice = done.choices[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    assert len(choice.model_extra["completion_token_ids"]) > 1  # "</think>" came first, unconstrained
    off = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Is the sun hot?"}],
                                         max_tokens=30, temperature=0,
                                         extra_body={**YES_NO, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content in ("yes", "no")
    assert len(off.choices[0].message.model_extra["completion_token_ids"]) == 1
