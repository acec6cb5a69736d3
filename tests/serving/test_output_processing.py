"""Unit tests of fastdeploy.output: incremental detokenization, stop strings, reasoning split.

Run against the real default model's byte-level BPE tokenizer, where a CJK character really is
split over several byte tokens.
"""
from __future__ import annotations

import pytest

from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.output.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer, RequestTextState, StopChecker
from fastdeploy.output.reasoning import check_reasoning_parser, get_reasoning_parser, starts_in_reasoning


class CountingTokenizer:
    """Wraps the real tokenizer and records how many ids each decode call saw."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok(default_model_path):
    from fastdeploy.input.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path)


def _single_byte_ids(tok, text: str) -> list[int]:
    """Token ids that each carry exactly one UTF-8 byte of `text` (checked by decoding them all)."""
    gpt2_bytes = _gpt2_byte_map()
    ids = []
    for byte in text.encode("utf-8"):
        token_id = tok.token_to_id(gpt2_bytes[byte])
        assert token_id is not None
        ids.append(token_id)
    assert tok.decode(ids) == text
    return ids


def _gpt2_byte_map() -> dict[int, str]:
    """The byte → printable character map of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def test_cjk_split_one_byte_per_token_comes_out_whole(tok):
    text = "你好,世界"
    ids = _single_byte_ids(tok, text)
    assert len(ids) == len(text.encode("utf-8"))
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # Each CJK character is released in one piece, on its last byte.
    assert [d for d in deltas if d] == ["你", "好", ",", "世", "界"]


def test_stray_byte_does_not_stall_and_window_stays_bounded(tok):
    stray = _single_byte_ids(tok, "世")[:1]  # first byte of a 3-byte character, never completed
    words = tok.encode(" the quick brown fox jumps over the lazy dog" * 10)
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    out = detok.add(tok.encode("Hello"))
    out += detok.add(stray)
    released_after = None
    for n, token in enumerate(words, start=1):
        out += detok.add([token])
        if released_after is None and "quick" in out:
            released_after = n
    out += detok.flush()
    assert released_after is not None and released_after <= MAX_PENDING_TOKENS + 2
    assert out.startswith("Hello\ufffd")
    assert out.endswith("lazy dog")
    # The decode window is bounded: no call saw the whole (growing) output.
    assert max(counting.decoded_lengths) <= MAX_PENDING_TOKENS + 8


def test_stray_byte_before_a_cjk_char_does_not_break_it(tok):
    ids = _single_byte_ids(tok, "界")
    stray = _single_byte_ids(tok, "世")[:1]
    filler = tok.encode(" a b c d e")
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.add([i]) for i in stray + filler + ids) + detok.flush()
    assert out.endswith("界")
    assert out.count("\ufffd") == 1


def test_incremental_equals_full_decode(tok):
    text = "Paris is the capital of France. 東京 is in Japan! 😀 émigré\n  indented"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids) == text


@pytest.mark.parametrize("chunks, stops, include, expected", [
    (["Hello wor", "ld STOP", " more"], ["STOP"], False, "Hello world "),
    (["Hello wor", "ld STOP", " more"], ["STOP"], True, "Hello world STOP"),
    (["a", "b", "S", "T", "O", "P", "c"], ["STOP"], False, "ab"),
    (["xx ST", "ART yy"], ["STOP"], False, "xx START yy"),
    (["one\n\ntwo"], ["\n\n", "two"], False, "one"),
])
def test_stop_checker(chunks, stops, include, expected):
    checker = StopChecker(stops, include)
    streamed = []
    hit = False
    for chunk in chunks:
        out, hit = checker.feed(chunk)
        streamed.append(out)
        if hit:
            break
    if not hit:
        streamed.append(checker.flush())
    assert "".join(streamed) == expected
    # Never stream any prefix of a stop string that later turned out to be one.
    running = ""
    for piece in streamed:
        running += piece
        if not include:
            assert not any(s in running for s in stops)


def test_partial_stop_string_is_never_streamed(tok):
    params = SamplingParams(stop=["</answer>"])
    state = RequestTextState(tok, params)
    ids = tok.encode("The answer is 42.</answer> trailing")
    seen = []
    for i in ids:
        text, _, hit = state.add_tokens([i])
        seen.append(text)
        assert "<" not in "".join(seen)
        if hit:
            break
    assert hit
    rest, _ = state.finish()
    assert "".join(seen) + rest == "The answer is 42." == state.text


def test_held_back_text_is_released_at_finish(tok):
    state = RequestTextState(tok, SamplingParams(stop=["<end>"]))
    streamed = "".join(state.add_tokens([i])[0] for i in tok.encode("value <en"))
    tail, _ = state.finish()
    assert streamed + tail == "value <en"
    assert not streamed.endswith("<en")


@pytest.mark.parametrize("name, text, content, reasoning", [
    ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", "Paris.", "Let me see.\n"),
    ("qwen3", "Paris.", "Paris.", ""),
    ("deepseek-r1", "Let me see.</think>Paris.", "Paris.", "Let me see."),
    ("ernie-45-vl", "<think>hmm</think>\n\nOK", "OK", "hmm"),
    ("ernie_x1", "no end tag at all", "", "no end tag at all"),
])
def test_reasoning_split_streaming(name, text, content, reasoning):
    for step in (1, 2, 3, len(text)):
        parser = get_reasoning_parser(name)
        got_c, got_r = "", ""
        for i in range(0, len(text), step):
            c, r = parser.feed(text[i:i + step])
            got_c, got_r = got_c + c, got_r + r
            assert "</" not in got_r and "<think" not in got_c
        c, r = parser.finish()
        assert (got_c + c, got_r + r) == (content, reasoning)


def test_reasoning_disabled_thinking_gives_content_only():
    assert get_reasoning_parser("deepseek-r1", enable_thinking=False) is None
    assert get_reasoning_parser(None) is None


def test_which_outputs_start_in_reasoning():
    """What the engine is told (EngineRequest.reasoning_first) to hold structured output back."""
    assert starts_in_reasoning("deepseek-r1") and starts_in_reasoning("ernie-x1", enable_thinking=True)
    assert not starts_in_reasoning("deepseek-r1", enable_thinking=False)
    assert not starts_in_reasoning("qwen3")  # the output itself opens the think block, or does not
    assert not starts_in_reasoning(None)


def test_unknown_reasoning_parser_is_an_error():
    with pytest.raises(ValueError, match="unknown"):
        check_reasoning_parser("no-such-parser")


def test_request_text_state_with_reasoning(tok):
    state = RequestTextState(tok, SamplingParams(), reasoning_parser="qwen3")
    content, reasoning = "", ""
    for i in tok.encode("<think>step one</think>The result."):
        c, r, hit = state.add_tokens([i])
        content, reasoning = content + c, reasoning + r
        assert not hit
    c, r = state.finish()
    assert (content + c, reasoning + r) == ("The result.", "step one")
    assert state.text == "The result." and state.reasoning_text == "step one"
