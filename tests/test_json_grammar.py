"""JSON mode's recognizer and vocabulary masks (fastdeploy/engine/json_grammar.py), on the default
model's real vocabulary; the end-to-end runs are in test_json_mode.py."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fastdeploy.engine import json_grammar as jg

VALID = [
    {"name": "Alice", "age": 30, "tags": ["a", "b\n"], "ok": True, "x": None, "f": -1.5e3, "z": 0, "e": 2E-7,
     "n": {"deep": [1, 2, {"k": "v"}, [], {}]}},
    {"quote": 'say "hi" \\ back', "unicode": "h\u00e9llo \u4e2d\u6587 \U0001f600", "tab": "\t"},
    {},
]
INVALID = ['[1, 2]', '"text"', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '{a: 1}', '{"a": tru}', '{"a": "x\ny"}',
           '{"a": 1}}', '{"a": -}', '{"a": 1.}', '{"a": "\\q"}', '{"a": [1 2]}', '{' + ' ' * 17 + '}']


def feed_all(text: str) -> jg.JsonState | None:
    return jg.walk(jg.INITIAL, text.encode())


@pytest.mark.parametrize("doc", VALID)
def test_valid_objects_are_accepted_whole(doc):
    for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, ensure_ascii=False)):
        state = feed_all(text)
        assert state is not None and state.mode == jg.DONE, text
        for cut in range(len(text.encode())):  # every prefix is alive and unfinished
            prefix = jg.walk(jg.INITIAL, text.encode()[:cut])
            assert prefix is not None and prefix.mode != jg.DONE


@pytest.mark.parametrize("text", INVALID)
def test_invalid_texts_are_rejected(text):
    assert feed_all(text) is None, f"{text!r} should have been cut off"


@pytest.fixture(scope="module")
def vocab(default_model_path):
    from fastdeploy.input.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path)
    return tok, jg.JsonVocabulary(jg.token_bytes(tok, tok.vocab_size))


def test_token_bytes_spell_what_decode_gives(vocab):
    tok, v = vocab
    for t in random.Random(0).sample(range(tok.vocab_size), 3000):
        piece = v.pieces[t]
        if piece is None:
            assert tok.is_special(t)
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: decode([t]) alone shows U+FFFD
        assert text == tok.decode([t], skip_special_tokens=False)
    assert all(v.pieces[t] is None for t in tok.eos_token_ids)


def test_masks_equal_walking_every_token(vocab):
    tok, v = vocab
    ids = tok.encode(json.dumps(VALID[0], indent=2))
    states, state = [], jg.INITIAL
    for t in ids:
        states.append(state)
        state = v.advance(state, t)
    states += [jg.JsonState(jg.STRING, "oa", key=False), jg.JsonState(jg.ESCAPE, "o", key=True),
               jg.JsonState(jg.NUMBER, "oo", aux=jg.INT), jg.JsonState(jg.AFTER, "a" * 3, whitespace=15)]
    assert state.mode == jg.DONE
    for s in random.Random(1).sample(states, 12) + states[-4:]:
        brute = np.array([p is not None and len(p) > 0 and jg.walk(s, p) is not None for p in v.pieces])
        np.testing.assert_array_equal(v.allowed(s), brute, err_msg=str(s))


def test_every_token_of_a_tokenized_object_is_allowed(vocab):
    tok, v = vocab
    for doc in VALID:
        ids = tok.encode(json.dumps(doc, indent=2, ensure_ascii=False))
        state = jg.INITIAL
        for t in ids:
            assert v.allowed(state)[t], (tok.decode([t]), state)
            state = v.advance(state, t)
        assert state.mode == jg.DONE
        assert not v.allowed(state).any()
