"""Structured output on llguidance: a constraint compiled to a grammar, a matcher per sequence
that says which tokens may come next, and the vocabulary the matchers share.

llguidance walks the grammar over a token trie with an Earley parser and a lazy lexer, so a mask
costs tens of microseconds on this vocabulary. JSON mode (`response_format="json_object"`) is the
schema {"type": "object"}. The output is complete when the grammar can take nothing more; the
engine then ends the request ("stop").
"""
from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING

import numpy as np
from llguidance import LLMatcher, LLTokenizer, StructTag, TokenizerWrapper, grammar_from

if TYPE_CHECKING:
    from fastdeploy.engine.sampling_params import GuidedDecodingParams
    from fastdeploy.input.tokenizer import Tokenizer


JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,24}", "json_allow_general_unicode_escapes": True}
"""How JSON is spelled. Whitespace between two JSON tokens is bounded, so that a model cannot stall
in an endless run of newlines (a known failure of unbounded JSON whitespace), yet enough for
indented output. Every \\uXXXX escape RFC 8259 allows is allowed (llguidance's default takes
them for control characters only, which would cut off json.dumps-style ASCII output)."""


class GrammarError(ValueError):
    """The constraint does not compile (a bad schema, regex or grammar)."""


def compile_grammar(params: GuidedDecodingParams) -> str:
    """llguidance's grammar text for params; GrammarError says what is wrong with it."""
    return _compile(params.key())


@functools.lru_cache(maxsize=256)
def _compile(key: str) -> str:
    spec = json.loads(key)
    try:
        grammar = _grammar(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"not valid JSON text: {exc}") from None
    except KeyError as exc:
        raise GrammarError(f"missing field {exc}") from None
    except (ValueError, TypeError, AssertionError) as exc:
        raise GrammarError(str(exc)) from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error.strip())
    return grammar


def _grammar(spec: dict) -> str:
    if "json" in spec:
        schema = json.loads(spec["json"]) if isinstance(spec["json"], str) else spec["json"]
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if "json_object" in spec:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if "regex" in spec:
        return LLMatcher.grammar_from_regex(_without_anchors(spec["regex"]))
    if "choice" in spec:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec["choice"]))
    if "grammar" in spec:
        return grammar_from("grammar", spec["grammar"])  # GBNF is converted to Lark, Lark kept
    return _structural_tag(spec["structural_tag"])


def _without_anchors(regex: str) -> str:
    """The whole output must match, so a leading ^ and a final $ (also $ before a final newline,
    as Python's $ allows) say nothing; llguidance refuses them as lookarounds. FastDeploy's docs
    write regexes that way."""
    if regex.startswith("^"):
        regex = regex[1:]
    for tail in ("$", "$\\n", "$\n"):
        head = regex[:len(regex) - len(tail)]
        if regex.endswith(tail) and (len(head) - len(head.rstrip("\\"))) % 2 == 0:  # the $ is not escaped
            return head + tail[1:]
    return regex


def _structural_tag(text: str) -> str:
    """FastDeploy's structural_tag ({"structures": [{"begin", "schema", "end"}], "triggers"}) as
    llguidance tags: the trigger of a structure is the one its begin starts with."""
    spec = json.loads(text)
    triggers = spec.get("triggers") or []
    tags = []
    for item in spec["structures"]:
        begin = item["begin"]
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structure {begin!r} starts with none of the triggers {triggers}")
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=item.get("schema") or {}, end=item["end"]))
    if not tags:
        raise ValueError("structural_tag needs at least one structure")
    return StructTag.to_grammar(tags)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE vocabularies spell tokens in these)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes | None]:
    """Each token's bytes as it adds them to the text; None for special tokens and unused ids.
    Byte-level BPE pieces map through GPT-2's alphabet; SentencePiece pieces spell spaces as "▁"
    and raw bytes as "<0xNN>"."""
    backend = tokenizer.backend
    raw = getattr(backend, "raw", None)
    byte_level = raw is not None and "ByteLevel" in repr(raw.decoder)
    alphabet = _byte_level_alphabet()
    out: list[bytes | None] = []
    for t in range(vocab_size):
        piece = tokenizer.id_to_token(t) if t < tokenizer.vocab_size else None
        if piece is None or tokenizer.is_special(t):
            out.append(None)
        elif byte_level and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        elif (match := _BYTE_PIECE.fullmatch(piece)) is not None:
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


_THINK_CLOSE = b"</think>"


_LAYOUT_NEWLINES = 2
"""Newline tokens allowed right after `</think>` (template layout the reasoning parser strips)."""


class GuidedState:
    """One sequence's structured-output progress.

    When the reasoning parser takes the output as reasoning from its start (DeepSeek-R1 and ERNIE
    thinking models), the constraint starts after the model's `</think>`, as vLLM's does, rather
    than forcing the structure into the reasoning. Up to _LAYOUT_NEWLINES newline tokens may come
    between the two, as templates lay them out. (A parser that waits for the output to open a
    think block, Qwen3's, gets the constraint at once: no thinking under structured output.)"""

    def __init__(self, matcher: LLMatcher, thinking: bool) -> None:
        self.matcher = matcher
        self.thinking = thinking
        self.layout = _LAYOUT_NEWLINES if not thinking else 0
        """Newline tokens taken since `</think>`; at _LAYOUT_NEWLINES, or once the constraint
        started, no more are allowed outside it."""
        self.tail = b""
        """The last output bytes while thinking, to find a `</think>` split across tokens."""

    @property
    def complete(self) -> bool:
        """The output is complete (or a token outside the mask broke it: bans had left none)."""
        return not self.thinking and (self.matcher.is_stopped() or self.matcher.is_error())


class GuidedVocabulary:
    """The model's tokens as llguidance sees them, and the matchers built on them.

    llguidance marks a special token by a leading 0xFF byte, so that text never matches one; ids
    past the tokenizer's vocabulary (padding rows of the embedding) are empty and never allowed."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.pieces = token_bytes(tokenizer, vocab_size)
        """Each token's bytes; None for special tokens and unused ids."""
        specials = [t for t, p in enumerate(self.pieces) if p is None and tokenizer.is_special(t)]
        self.tokens = [p if p is not None else b"" for p in self.pieces]
        """Each token's bytes, a special token's as 0xFF and its name."""
        for t in specials:
            self.tokens[t] = b"\xff" + (tokenizer.id_to_token(t) or "").encode()
        self.tokenizer = LLTokenizer(TokenizerWrapper(_Vocab(self.tokens, specials, eos_token_ids)),
                                     n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._newlines = np.array([bool(p) and not p.strip(b"\n") for p in self.tokens], dtype=bool)

    def matcher(self, params: GuidedDecodingParams) -> LLMatcher:
        """A fresh matcher at the start of the output; GrammarError if it cannot be built."""
        matcher = LLMatcher(self.tokenizer, compile_grammar(params), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def start(self, params: GuidedDecodingParams, thinking: bool) -> GuidedState:
        """A new sequence's state; thinking: the output is reasoning until `</think>` comes."""
        return GuidedState(self.matcher(params), thinking)

    def allowed(self, state: GuidedState) -> np.ndarray | None:
        """Bool per token: may it come next (EOS once the output is complete); None while thinking."""
        if state.thinking:
            return None
        bits = np.frombuffer(state.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little", count=self.vocab_size).astype(bool)
        if state.layout < _LAYOUT_NEWLINES:
            allowed |= self._newlines
        return allowed

    def advance(self, state: GuidedState, token: int) -> None:
        """Take the sampled token; outside the mask it leaves the matcher in error (`complete`)."""
        if state.thinking:
            tail = state.tail + self.tokens[token]
            state.thinking = _THINK_CLOSE not in tail
            state.tail = tail[-len(_THINK_CLOSE):]
        elif (state.layout < _LAYOUT_NEWLINES and self._newlines[token]
              and not state.matcher.validate_tokens([token])):  # layout, unless the constraint takes it
            state.layout += 1
        else:
            state.layout = _LAYOUT_NEWLINES
            state.matcher.consume_token(token)


class _Vocab:
    """What llguidance's TokenizerWrapper reads off a tokenizer object: the tokens' bytes, the
    special and EOS ids, and a tokenize function.

    llguidance infers from that function how the tokenizer treats the start of a text, so it must
    spell its input exactly. A sentencepiece tokenizer's encode prepends a space ("\u2581"), after
    which llguidance would allow only a space first. So the function here is a greedy longest
    match over the tokens' bytes: exact, if not always the tokenizer's own split, which nothing
    here relies on (the engine never asks llguidance to tokenize)."""

    def __init__(self, tokens: list[bytes], special_ids: list[int], eos_token_ids: list[int]) -> None:
        self.tokens = tokens
        self.special_token_ids = special_ids
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.bos_token_id = None
        self._ids: dict[bytes, int] = {}
        specials = set(special_ids)
        for t, piece in enumerate(tokens):
            if piece and t not in specials:
                self._ids.setdefault(piece, t)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        out, i = [], 0
        while i < len(data):
            for size in range(min(self._longest, len(data) - i), 0, -1):
                t = self._ids.get(data[i:i + size])
                if t is not None:
                    out.append(t)
                    i += size
                    break
            else:
                i += 1  # a byte no token spells (a vocabulary without byte fallback): left out
        return out
