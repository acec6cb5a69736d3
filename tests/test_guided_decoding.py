"""Structured output offline: SamplingParams(guided_decoding=GuidedDecodingParams(...)) with the
default model, greedy and sampled, and the token masks checked against the vocabulary walked by
hand. The HTTP side (response_format json_schema, guided_* fields) is in
tests/serving/test_openai_api.py and test_bad_requests.py."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from fastdeploy import LLM, SamplingParams
from fastdeploy.engine.guided_decoding import GuidedVocabulary
from fastdeploy.engine.sampling_params import GuidedDecodingParams

BOOK = {"type": "object", "additionalProperties": False, "required": ["author", "title", "genre", "year"],
        "properties": {"author": {"type": "string", "maxLength": 40}, "title": {"type": "string", "maxLength": 60},
                       "genre": {"enum": ["Romance", "Historical", "Adventure", "Mystery", "Dystopian"]},
                       "year": {"type": "integer", "minimum": 1000, "maximum": 2100}}}
ASK_BOOK = [{"role": "user", "content": "Describe a famous novel as JSON: author, title, genre and year."}]
SAMPLED = dict(temperature=0.9, seed=11)


def generate(llm, guided: GuidedDecodingParams, conversation=ASK_BOOK, **params):
    base = dict(temperature=0, max_tokens=120)
    base.update(params)
    return llm.chat(conversation, SamplingParams(guided_decoding=guided, **base), use_tqdm=False)[0].outputs


def assert_book(text: str) -> None:
    doc = json.loads(text)
    assert set(doc) == {"author", "title", "genre", "year"}, doc
    assert isinstance(doc["author"], str) and len(doc["author"]) <= 40
    assert isinstance(doc["title"], str) and len(doc["title"]) <= 60
    assert doc["genre"] in BOOK["properties"]["genre"]["enum"]
    assert isinstance(doc["year"], int) and 1000 <= doc["year"] <= 2100


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_json_schema(llm, sampling):
    for schema in (BOOK, json.dumps(BOOK)):  # a dict, or its JSON text
        out = generate(llm, GuidedDecodingParams(json=schema), max_tokens=160, **sampling)
        assert out.finish_reason == "stop", out.text
        assert_book(out.text)


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_regex_choice_and_grammar(llm, sampling):
    ask = [{"role": "user", "content": "Give me a phone number."}]
    out = generate(llm, GuidedDecodingParams(regex=r"\d{3}-\d{4}"), ask, **sampling)
    assert re.fullmatch(r"\d{3}-\d{4}", out.text) and out.finish_reason == "stop", out.text
    ask = [{"role": "user", "content": "Is this review positive or negative? 'I loved every minute.'"}]
    choices = ["positive", "negative", "mixed feelings"]
    out = generate(llm, GuidedDecodingParams(choice=choices), ask, **sampling)
    assert out.text in choices and out.finish_reason == "stop"
    gbnf = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{1,30} "."'
    out = generate(llm, GuidedDecodingParams(grammar=gbnf), [{"role": "user", "content": "Is the sky blue?"}],
                   **sampling)
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,30}\.", out.text), out.text
    lark = 'start: "Answer: " NUMBER\nNUMBER: /[0-9]{1,4}/'
    out = generate(llm, GuidedDecodingParams(grammar=lark), [{"role": "user", "content": "What is 6 times 7?"}],
                   **sampling)
    assert re.fullmatch(r"Answer: [0-9]{1,4}", out.text), out.text


def test_json_object_and_stop_before_max_tokens(llm):
    out = generate(llm, GuidedDecodingParams(json_object=True), max_tokens=300)
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.lstrip().startswith("{")
    # The request ends where the grammar does, even with EOS ignored and room left.
    out = generate(llm, GuidedDecodingParams(choice=["yes", "no"]), [{"role": "user", "content": "Yes or no?"}],
                   ignore_eos=True, max_tokens=50)
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_batch_mixes_constrained_and_free_requests(llm):
    prompts = [ASK_BOOK, [{"role": "user", "content": "Say hello."}], ASK_BOOK]
    params = [SamplingParams(temperature=0, max_tokens=160, guided_decoding=GuidedDecodingParams(json=BOOK)),
              SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=20, guided_decoding=GuidedDecodingParams(regex="[A-Z]{5}"))]
    outs = llm.chat(prompts, params, use_tqdm=False)
    assert_book(outs[0].outputs.text)
    free = llm.chat(prompts[1], params[1], use_tqdm=False)[0].outputs
    assert outs[1].outputs.token_ids == free.token_ids  # the free one is untouched by the others' masks
    assert re.fullmatch("[A-Z]{5}", outs[2].outputs.text)
    # n > 1: each choice follows the constraint on its own.
    outs = llm.chat([{"role": "user", "content": "Pick a colour."}],
                    SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10,
                                   guided_decoding=GuidedDecodingParams(choice=["red", "green", "blue"])),
                    use_tqdm=False)
    assert len(outs) == 4 and all(o.outputs.text in ("red", "green", "blue") for o in outs)


def test_logprobs_leave_out_masked_tokens(llm):
    out = generate(llm, GuidedDecodingParams(choice=["alpha", "beta"]), logprobs=20)
    assert out.text in ("alpha", "beta")
    first = out.logprobs[0]
    assert first and all(np.isfinite(v) for v in first.values())
    texts = [llm.tokenizer.decode([t]) for t in first]
    assert all("alpha".startswith(t) or "beta".startswith(t) for t in texts), texts
    if len(first) < 20:  # every allowed token is listed: they hold all of the mass
        assert sum(np.exp(v) for v in first.values()) == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def vocab(llm) -> tuple[GuidedVocabulary, list[bytes | None]]:
    guided = GuidedVocabulary(llm.tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    return guided, guided.pieces


def test_token_bytes_spell_what_decode_gives(vocab, llm):
    _, pieces = vocab
    tok = llm.tokenizer
    for t in random.Random(0).sample(range(tok.vocab_size), 3000):
        if pieces[t] is None:
            assert tok.is_special(t)
            continue
        try:
            text = pieces[t].decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: decode([t]) alone shows U+FFFD
        assert text == tok.decode([t], skip_special_tokens=False)
    assert all(pieces[t] is None for t in tok.eos_token_ids)


JSON_OBJECTS = [
    {"name": "Alice", "age": 30, "tags": ["a", "b\n"], "ok": True, "x": None, "f": -1.5e3, "z": 0, "e": 2E-7,
     "n": {"deep": [1, 2, {"k": "v"}, [], {}]}},
    {"quote": 'say "hi" \\ back', "unicode": "h\u00e9llo \u4e2d\u6587 \U0001f600", "tab": "\t"},
    {},
]
NOT_JSON_OBJECTS = ['[1, 2]', '"text"', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '{a: 1}', '{"a": tru}', '{"a": "x\ny"}',
                    '{"a": 1}}', '{"a": -}', '{"a": 1.}', '{"a": "\\q"}', '{"a": [1 2]}', '{' + ' ' * 25 + '}']


def test_json_mode_takes_every_object_and_nothing_else(vocab, llm):
    """JSON mode (response_format="json_object") is GuidedDecodingParams(json_object=True): each
    token of an object, however indented, is allowed, and the object's end completes the output;
    texts that are no object, or whose whitespace runs past 24 bytes, are cut off."""
    guided, _ = vocab
    tok = llm.tokenizer
    for doc in JSON_OBJECTS:
        for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, indent=4, ensure_ascii=False)):
            state = guided.start(GuidedDecodingParams(json_object=True), thinking=False)
            for t in tok.encode(text):
                assert guided.allowed(state)[t], (text, tok.decode([t]))
                assert not state.complete
                guided.advance(state, t)
            assert state.complete and not state.matcher.is_error(), text
    for text in NOT_JSON_OBJECTS:
        matcher = guided.matcher(GuidedDecodingParams(json_object=True))
        assert not matcher.consume_tokens(tok.encode(text)) or not matcher.is_accepting(), text


def test_masks_match_the_vocabulary_walked_by_hand(vocab, llm):
    """Every token is allowed exactly when its bytes extend the text towards [0-9]{3}-[0-9]{4}
    (ASCII digits: llguidance's \\d is Unicode's, whose digits' UTF-8 lead bytes would be allowed)."""
    guided, pieces = vocab
    prefix = re.compile(rb"[0-9]{0,3}|[0-9]{3}-[0-9]{0,4}")
    state = guided.start(GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}"), thinking=False)
    eos = set(llm.engine.eos_token_ids)
    text = b""
    for step in range(8):
        allowed = guided.allowed(state)
        want = np.array([p is not None and len(p) > 0 and prefix.fullmatch(text + p) is not None
                         for p in pieces])
        np.testing.assert_array_equal(allowed, want, err_msg=f"after {text!r}")
        # Take the longest allowed token, to walk the grammar in few steps.
        token = max(np.flatnonzero(allowed), key=lambda t: len(pieces[t] or b""))
        guided.advance(state, int(token))
        assert not state.matcher.is_error()
        text += pieces[token]
        if state.complete:
            break
    assert re.fullmatch(rb"[0-9]{3}-[0-9]{4}", text) and state.complete
    assert set(np.flatnonzero(guided.allowed(state))) <= eos  # complete: EOS alone may follow


def test_structural_tag_forces_the_structure_after_its_trigger(vocab, llm):
    guided, pieces = vocab
    tags = {"structures": [{"begin": "<function=get_time>", "end": "</function>",
                            "schema": {"type": "object", "properties": {"tz": {"type": "string"}},
                                       "required": ["tz"], "additionalProperties": False}}],
            "triggers": ["<function="]}
    state = guided.start(GuidedDecodingParams(structural_tag=json.dumps(tags)), thinking=False)
    assert state.matcher.consume_tokens(llm.tokenizer.encode("Sure. <function=get_time>"))
    allowed = guided.allowed(state)
    starts = {pieces[t].lstrip()[:1] for t in np.flatnonzero(allowed) if pieces[t] and pieces[t].strip()}
    assert starts == {b"{"}, starts  # the arguments must be the schema's object
    assert not state.matcher.consume_tokens(llm.tokenizer.encode("hello"))


def test_thinking_holds_the_constraint_until_the_tag_then_allows_layout_newlines(vocab, llm):
    guided, _ = vocab
    tok = llm.tokenizer
    state = guided.start(GuidedDecodingParams(choice=["yes"]), thinking=True)
    for t in tok.encode("Let me see. Yes.</think>"):  # the tag comes in three tokens: "</", "think", ">"
        assert state.thinking and guided.allowed(state) is None
        guided.advance(state, t)
    assert not state.thinking and not state.complete
    newline, yes = tok.encode("\n")[0], tok.encode("yes")[0]
    assert guided.allowed(state)[newline] and guided.allowed(state)[yes]
    guided.advance(state, newline)
    guided.advance(state, newline)
    allowed = guided.allowed(state)
    assert not allowed[newline] and allowed[yes]  # two layout newlines at most, then the constraint
    guided.advance(state, yes)
    assert state.complete and not state.matcher.is_error()


@pytest.mark.parametrize("kwargs, message", [
    (dict(regex="a(b"), "unclosed group"),
    (dict(json={"type": "nonsense"}), "nonsense"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(choice=[]), "non-empty"),
    (dict(grammar="root ::= ("), "grammar"),
    (dict(regex="a", choice=["b"]), "exactly one"),
    (dict(), "exactly one"),
])
def test_bad_constraints_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        GuidedDecodingParams(**kwargs)
    assert info.value.param == "guided_decoding"


def test_guided_decoding_refuses_beam_search_and_json_mode():
    guided = GuidedDecodingParams(regex="a+")
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(guided_decoding=guided, use_beam_search=True, n=1, best_of=2)
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(guided_decoding=guided, response_format="json_object")


def test_backend_off_refuses_structured_output_and_xgrammar_is_served(default_model_path):
    ask = [{"role": "user", "content": "Yes or no?"}]
    off = LLM(model=default_model_path, max_model_len=512, num_gpu_blocks_override=16,
              guided_decoding_backend="off")
    for params in (SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"])),
                   SamplingParams(response_format="json_object")):
        with pytest.raises(ValueError, match="--guided-decoding-backend off"):
            off.chat(ask, params, use_tqdm=False)
    assert off.chat(ask, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs.token_ids
    # FastDeploy's other backend name: the same constraints, served by llguidance.
    xgr = LLM(model=default_model_path, max_model_len=512, num_gpu_blocks_override=16,
              guided_decoding_backend="xgrammar")
    out = xgr.chat(ask, SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"])),
                   use_tqdm=False)[0].outputs
    assert out.text in ("yes", "no")


# The prompt leaves a think block open; few-shot, so that the model closes it first.
_SHOT = "Question: is fire hot?\n<think>\nok\n</think>\nyes\n\nQuestion: is ice hot?\n<think>\nok\n</think>\nno\n\n"
THINKING_PROMPT = _SHOT * 3 + "Question: is the sun hot?\n<think>\nok\n"


def test_constraint_starts_after_the_reasoning(default_model_path, llm):
    """With a reasoning parser that takes the output as reasoning from its start, the model first
    closes its think block freely (`</think>` is no answer the constraint allows), then answers
    within it; with thinking switched off, or no parser, the constraint holds from the first token."""
    yes_no = SamplingParams(temperature=0, max_tokens=30, guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))
    thinking = LLM(model=default_model_path, max_model_len=1024, num_gpu_blocks_override=32,
                   reasoning_parser="ernie-45-vl")
    out = thinking.generate(THINKING_PROMPT, yes_no, use_tqdm=False)[0].outputs
    whole = thinking.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    assert whole.startswith("</think>") and whole.endswith(out.text), whole
    assert not out.reasoning_content  # "ok" was in the prompt; nothing more was thought
    off = thinking.chat([{"role": "user", "content": "Is the sun hot?"}], yes_no, use_tqdm=False,
                        chat_template_kwargs={"enable_thinking": False})[0].outputs
    assert thinking.tokenizer.decode(off.token_ids, skip_special_tokens=False) in ("yes", "no")
    plain = llm.generate(THINKING_PROMPT, yes_no, use_tqdm=False)[0].outputs
    assert plain.text in ("yes", "no")
    assert llm.tokenizer.decode(plain.token_ids, skip_special_tokens=False) == plain.text


def test_preemption_keeps_the_constraint_state(default_model_path, llm):
    """A preempted sequence recomputes its K/V but keeps its matcher: its output is the one it
    gives alone, and it still follows the constraint."""
    words = GuidedDecodingParams(regex=r"([a-z]+ ){40}[a-z]+\.")
    asks = [[{"role": "user", "content": f"Write about {topic}."}] for topic in ("cats", "rain", "ships", "bread")]
    params = SamplingParams(temperature=0, max_tokens=200, guided_decoding=words)
    alone = [o.outputs.text for o in llm.chat(asks, params, use_tqdm=False)]  # the shared pool is large
    # 6 blocks of 64 tokens for four sequences of ~80 (two blocks each): some must be preempted.
    tight = LLM(model=default_model_path, max_model_len=1024, num_gpu_blocks_override=6, max_num_seqs=4)
    outs = [o.outputs for o in tight.chat(asks, params, use_tqdm=False)]
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_blocks
    assert [o.text for o in outs] == alone
    assert all(re.fullmatch(r"([a-z]+ ){40}[a-z]+\.", o.text) and o.finish_reason == "stop" for o in outs)
