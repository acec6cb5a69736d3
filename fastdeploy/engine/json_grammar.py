"""JSON mode (`response_format: {"type": "json_object"}`): which tokens keep the output a valid
prefix of one JSON object.

A byte-level recognizer for RFC 8259 text whose top-level value is an object walks each
candidate token's bytes from the current state; a token is allowed when no byte is rejected.
Masks are cached per state, since a generation revisits few states (inside a string at the same
depth, after a value in the same container, ...). Whitespace outside strings is allowed in runs of
at most MAX_WHITESPACE bytes, so a model cannot stall in an endless run of newlines. The output is
complete once the top-level object closes; the engine then ends the request ("stop").
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MAX_WHITESPACE = 16
MAX_DEPTH = 64
_CACHE_SIZE = 512

# Modes. OBJ_OPEN / ARR_OPEN: right after "{" / "[", where the container may close at once.
START, OBJ_OPEN, KEY, COLON, VALUE, ARR_OPEN, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(13)
# Number sub-states (aux): after "-", a leading 0, integer digits, ".", fraction digits, "e",
# exponent sign, exponent digits. A number may end in ZERO, INT, FRAC or EXP_DIGITS.
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(8)
_NUMBER_ENDS = frozenset((ZERO, INT, FRAC, EXP_DIGITS))
_WHITESPACE = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}


class JsonState(NamedTuple):
    mode: int
    stack: str = ""
    """Open containers, innermost last: "o" object, "a" array."""
    key: bool = False
    """In a string (or its escape): whether it is an object key."""
    aux: int | bytes = 0
    """UNICODE: hex digits left; NUMBER: sub-state; LITERAL: the bytes still to come."""
    whitespace: int = 0
    """Whitespace bytes in the current run outside strings."""


INITIAL = JsonState(START)


def _close(state: JsonState, byte: int) -> JsonState | None:
    want = "o" if byte == ord("}") else "a"
    if not state.stack or state.stack[-1] != want:
        return None
    stack = state.stack[:-1]
    return JsonState(DONE) if not stack else JsonState(AFTER, stack)


def _value(state: JsonState, byte: int) -> JsonState | None:
    """A value starting with byte, in the container state.stack."""
    stack = state.stack
    if byte == ord('"'):
        return JsonState(STRING, stack)
    if byte == ord("{") or byte == ord("["):
        if len(stack) >= MAX_DEPTH:
            return None
        return JsonState(OBJ_OPEN, stack + "o") if byte == ord("{") else JsonState(ARR_OPEN, stack + "a")
    if byte == ord("-"):
        return JsonState(NUMBER, stack, aux=MINUS)
    if byte == ord("0"):
        return JsonState(NUMBER, stack, aux=ZERO)
    if byte in _DIGITS:
        return JsonState(NUMBER, stack, aux=INT)
    rest = _LITERALS.get(byte)
    return JsonState(LITERAL, stack, aux=rest) if rest is not None else None


def _number(state: JsonState, byte: int) -> JsonState | None:
    sub, stack = state.aux, state.stack
    digit = byte in _DIGITS
    if sub == MINUS:
        nxt = ZERO if byte == ord("0") else INT if digit else None
    elif sub in (ZERO, INT, FRAC) and byte in b"eE":
        nxt = EXP
    elif sub == INT and digit:
        nxt = INT
    elif sub in (ZERO, INT) and byte == ord("."):
        nxt = DOT
    elif sub in (DOT, FRAC) and digit:
        nxt = FRAC
    elif sub == EXP and byte in b"+-":
        nxt = EXP_SIGN
    elif sub in (EXP, EXP_SIGN, EXP_DIGITS) and digit:
        nxt = EXP_DIGITS
    elif sub in _NUMBER_ENDS:
        return step(JsonState(AFTER, stack), byte)  # the byte ends the number and belongs to what follows
    else:
        nxt = None
    return None if nxt is None else JsonState(NUMBER, stack, aux=nxt)


def _in_string(state: JsonState, byte: int) -> JsonState | None:
    mode, stack, key = state.mode, state.stack, state.key
    if mode == STRING:
        if byte == ord('"'):
            return JsonState(COLON, stack) if key else JsonState(AFTER, stack)
        if byte == ord("\\"):
            return JsonState(ESCAPE, stack, key)
        return state if byte >= 0x20 else None
    if mode == ESCAPE:
        if byte == ord("u"):
            return JsonState(UNICODE, stack, key, 4)
        return JsonState(STRING, stack, key) if byte in _ESCAPES else None
    if byte not in _HEX:  # UNICODE
        return None
    left = state.aux - 1  # type: ignore[operator]
    return JsonState(STRING, stack, key) if left == 0 else JsonState(UNICODE, stack, key, left)


def step(state: JsonState, byte: int) -> JsonState | None:
    """The state after one more byte, or None if the byte cannot continue a JSON object."""
    mode = state.mode
    if mode in (STRING, ESCAPE, UNICODE):
        return _in_string(state, byte)
    if mode == NUMBER:
        return _number(state, byte)
    if mode == LITERAL:
        rest = state.aux
        if byte != rest[0]:  # type: ignore[index]
            return None
        if len(rest) == 1:  # type: ignore[arg-type]
            return JsonState(AFTER, state.stack)
        return JsonState(LITERAL, state.stack, aux=rest[1:])  # type: ignore[index]
    if mode == DONE:
        return None
    if byte in _WHITESPACE:
        if state.whitespace >= MAX_WHITESPACE:
            return None
        return state._replace(whitespace=state.whitespace + 1)
    if mode == START:
        return JsonState(OBJ_OPEN, "o") if byte == ord("{") else None
    if mode in (OBJ_OPEN, KEY):
        if byte == ord('"'):
            return JsonState(STRING, state.stack, key=True)
        return _close(state, byte) if mode == OBJ_OPEN and byte == ord("}") else None
    if mode == COLON:
        return JsonState(VALUE, state.stack) if byte == ord(":") else None
    if mode in (VALUE, ARR_OPEN):
        if mode == ARR_OPEN and byte == ord("]"):
            return _close(state, byte)
        return _value(state, byte)
    # AFTER a value inside a container
    if byte == ord(","):
        return JsonState(KEY, state.stack) if state.stack[-1] == "o" else JsonState(VALUE, state.stack)
    if byte == ord("}") or byte == ord("]"):
        return _close(state, byte)
    return None


def walk(state: JsonState, data: bytes) -> JsonState | None:
    for byte in data:
        nxt = step(state, byte)
        if nxt is None:
            return None
        state = nxt
    return state


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


def token_bytes(tokenizer: object, vocab_size: int) -> list[bytes | None]:
    """Each token's bytes as it adds them to the text; None for special tokens and unused ids.
    Byte-level BPE pieces map through GPT-2's alphabet; SentencePiece pieces spell spaces as "▁"
    and raw bytes as "<0xNN>"."""
    backend = tokenizer.backend  # type: ignore[attr-defined]
    raw = getattr(backend, "raw", None)
    byte_level = raw is not None and "ByteLevel" in repr(raw.decoder)
    alphabet = _byte_level_alphabet()
    out: list[bytes | None] = []
    for t in range(vocab_size):
        piece = tokenizer.id_to_token(t) if t < tokenizer.vocab_size else None  # type: ignore[attr-defined]
        if piece is None or tokenizer.is_special(t):  # type: ignore[attr-defined]
            out.append(None)
        elif byte_level and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        elif (match := _BYTE_PIECE.fullmatch(piece)) is not None:
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


_BLANK_NEUTRAL = frozenset((START, OBJ_OPEN, KEY, COLON, VALUE, ARR_OPEN, AFTER))
"""Modes where whitespace only lengthens the current run (it ends a number or literal instead)."""


class JsonVocabulary:
    """Per recognizer state, the mask of tokens that may come next (cached, least recently used out).

    The cache is keyed by the state with its whitespace run cleared: the run only limits how much
    whitespace a token may start with, a per-token constant filtered afterwards."""

    def __init__(self, pieces: Sequence[bytes | None]) -> None:
        self.pieces = list(pieces)
        self.vocab_size = len(self.pieces)
        # Inside a string most tokens are plain text: precomputed once. The rest (quotes,
        # backslashes) are walked per state; other control bytes never fit.
        self._plain = np.array([bool(p) and all(b >= 0x20 and b not in b'"\\' for b in p)  # type: ignore[union-attr]
                                for p in self.pieces], dtype=bool)
        self._string_special = [t for t, p in enumerate(self.pieces)
                                if p and not self._plain[t] and all(b >= 0x20 or b in _WHITESPACE for b in p)]
        self._lead_blank = np.zeros(self.vocab_size, dtype=np.int32)
        self._by_first: list[list[int]] = [[] for _ in range(256)]
        self._by_first_solid: list[list[int]] = [[] for _ in range(256)]  # by the first non-whitespace byte
        self._blank: list[int] = []  # all whitespace
        for t, p in enumerate(self.pieces):
            if not p:
                continue
            self._by_first[p[0]].append(t)
            solid = p.lstrip(b" \t\n\r")
            self._lead_blank[t] = len(p) - len(solid)
            (self._by_first_solid[solid[0]] if solid else self._blank).append(t)
        self._cache: OrderedDict[JsonState, np.ndarray] = OrderedDict()

    def allowed(self, state: JsonState) -> np.ndarray:
        """Bool mask over the vocabulary; do not modify it (it may be shared through the cache)."""
        key = state._replace(whitespace=0)
        mask = self._cache.get(key)
        if mask is None:
            mask = self._compute(key)
            mask.flags.writeable = False
            self._cache[key] = mask
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if state.whitespace and state.mode in _BLANK_NEUTRAL:
            mask = mask & (self._lead_blank <= MAX_WHITESPACE - state.whitespace)
        return mask

    def _compute(self, state: JsonState) -> np.ndarray:
        if state.mode == STRING:
            mask = self._plain.copy()
            candidates: list[int] = self._string_special
        else:
            mask = np.zeros(self.vocab_size, dtype=bool)
            if state.mode in _BLANK_NEUTRAL:
                solid = [b for b in range(256) if b not in _WHITESPACE and step(state, b) is not None]
                candidates = self._blank + [t for b in solid for t in self._by_first_solid[b]]
            else:
                candidates = [t for b in range(256) if step(state, b) is not None for t in self._by_first[b]]
        for t in candidates:
            if walk(state, self.pieces[t]) is not None:  # type: ignore[arg-type]
                mask[t] = True
        return mask

    def advance(self, state: JsonState, token: int) -> JsonState | None:
        """The state after token (None: it does not fit, or it has no bytes)."""
        piece = self.pieces[token] if 0 <= token < self.vocab_size else None
        return walk(state, piece) if piece else None
