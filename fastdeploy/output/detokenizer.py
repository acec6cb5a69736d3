"""Token ids → streamed text: incremental detokenization, stop strings, and the per-request state.

Pure logic (no ZMQ, no HTTP): the server's detokenizer processes and the offline LLM use it alike.
`RequestTextState` is the one object both keep per generated sequence.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from fastdeploy.output.reasoning import ReasoningParser, get_reasoning_parser

REPLACEMENT = "\ufffd"
MAX_PENDING_TOKENS = 6
"""A UTF-8 character needs at most 4 byte tokens; past this many uncommitted tokens the bytes are
genuinely broken and are released as U+FFFD instead of stalling the stream (and making every later
step re-decode a growing window)."""
CONTEXT_TOKENS = 4
"""Committed (or prompt) tokens decoded ahead of the new ones, so decoders that treat the first
token specially (SentencePiece strips its leading space) agree with a full decode."""


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting half a character.

    Each call decodes only a short window (context + uncommitted tokens), so the cost per token
    stays constant however long the output grows.
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True,
                 prompt_tail: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._context = list(prompt_tail[-CONTEXT_TOKENS:]) if prompt_tail else []
        self.token_ids: list[int] = []
        """Generated ids only (the prompt context is kept apart)."""
        self._window: list[int] = list(self._context)
        self._prefix_offset = 0
        """Start of the decode window inside _window."""
        self._read_offset = len(self._window)
        """Tokens of _window before this index are already emitted as text."""

    def add(self, new_ids: Sequence[int]) -> str:
        """Add tokens; returns newly committed text (empty while a character is incomplete)."""
        self.token_ids.extend(new_ids)
        self._window.extend(new_ids)
        return self._commit(force=False)

    push = add  # name used by early callers

    def flush(self) -> str:
        """At the end of the stream: commit what is pending, broken bytes as U+FFFD."""
        return self._commit(force=True)

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._window[start:end], skip_special_tokens=self._skip_special)

    def _commit(self, force: bool) -> str:
        end = len(self._window)
        if self._read_offset >= end:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, end)
        stalled = end - self._read_offset > MAX_PENDING_TOKENS
        if not force and (text.endswith(REPLACEMENT) or len(text) <= len(prefix_text)):
            if not stalled:
                return ""
            # A broken byte sequence blocks the window: release the longest prefix that ends on a
            # whole character, so a character still arriving behind it is not broken as well.
            for cut in range(end - 1, self._read_offset, -1):
                candidate = self._decode(self._prefix_offset, cut)
                if not candidate.endswith(REPLACEMENT) and len(candidate) > len(prefix_text):
                    end, text = cut, candidate
                    break
        delta = text[len(prefix_text):]
        self._read_offset = end
        self._prefix_offset = max(self._prefix_offset, end - CONTEXT_TOKENS)
        # Drop what no window will look at again, so memory stays bounded by the window too.
        if self._prefix_offset > 256:
            del self._window[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta


class StopChecker:
    """Finds stop strings in a text stream and never releases text that might begin one.

    Only the longest suffix that is a prefix of some stop string is held back (at most
    max(len(stop)) - 1 characters), so unrelated text is not delayed.
    """

    def __init__(self, stop: Sequence[str] | None, include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in (stop or []) if s]
        self._include = include_stop_str_in_output
        self._max_len = max((len(s) for s in self._stops), default=0)
        self.text = ""
        """Everything accepted so far (cut at the stop string once one is found)."""
        self._emitted = 0
        self.stopped: str | None = None
        """The stop string that ended the stream, if any."""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was found)."""
        if self.stopped is not None:
            return "", True
        if not self._stops:
            self.text += delta
            self._emitted = len(self.text)
            return delta, False
        # A new match must end inside the new text, so it starts at most max_len - 1 chars back.
        search_from = max(0, len(self.text) - self._max_len + 1)
        self.text += delta
        hit = self._find(search_from)
        if hit is not None:
            pos, stop = hit
            self.text = self.text[:pos + len(stop) if self._include else pos]
            self.stopped = stop
            return self.flush(), True
        safe = len(self.text) - self._held_suffix_len()
        out = self.text[self._emitted:safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return out, False

    def flush(self) -> str:
        """At the end of the stream a held partial stop string is just text."""
        out = self.text[self._emitted:]
        self._emitted = len(self.text)
        return out

    def _find(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = self.text.find(stop, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _held_suffix_len(self) -> int:
        text = self.text
        for k in range(min(self._max_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


class RequestTextState:
    """Per-sequence output processing: ids → text → stop strings → (content, reasoning) split.

    add_tokens(ids) -> (delta_text, delta_reasoning, stop_hit). Once stop_hit is True the caller
    aborts the request in the engine and reports finish_reason "stop"; later calls return nothing.
    finish() -> (delta_text, delta_reasoning) flushes held-back text; call it once at the end
    (also after a stop hit: it returns the reasoning parser's tail, if any).
    `text` / `reasoning_text` accumulate what was returned; `token_ids` the generated ids.
    """

    def __init__(self, tokenizer: _Decoder, params: Any, reasoning_parser: str | ReasoningParser | None = None,
                 prompt_token_ids: Sequence[int] = (), enable_thinking: bool | None = None) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, getattr(params, "skip_special_tokens", True),
                                                  prompt_token_ids)
        self.stop = StopChecker(getattr(params, "stop", None), getattr(params, "include_stop_str_in_output", False))
        if isinstance(reasoning_parser, str):
            reasoning_parser = get_reasoning_parser(reasoning_parser, enable_thinking is not False)
        self.reasoning: ReasoningParser | None = reasoning_parser
        self.text = ""
        """Content returned so far (the answer, without reasoning)."""
        self.reasoning_text = ""
        """Reasoning returned so far."""
        self.stop_hit = False
        self.finished = False

    @property
    def token_ids(self) -> list[int]:
        return self.detokenizer.token_ids

    @property
    def stopped(self) -> bool:
        return self.stop_hit

    @property
    def output_text(self) -> str:
        """All generated text accepted so far, before the reasoning split."""
        return self.stop.text

    def add_tokens(self, new_ids: Sequence[int]) -> tuple[str, str, bool]:
        if self.stop_hit or self.finished:
            return "", "", self.stop_hit
        raw = self.detokenizer.add(new_ids)
        if not raw:
            return "", "", False
        safe, self.stop_hit = self.stop.feed(raw)
        content, reasoning = self._split(safe, final=False)
        return content, reasoning, self.stop_hit

    def finish(self) -> tuple[str, str]:
        if self.finished:
            return "", ""
        self.finished = True
        tail = ""
        if not self.stop_hit:
            tail, self.stop_hit = self.stop.feed(self.detokenizer.flush())
            if not self.stop_hit:
                tail += self.stop.flush()
        return self._split(tail, final=True)

    def _split(self, safe: str, final: bool) -> tuple[str, str]:
        if self.reasoning is None:
            self.text += safe
            return safe, ""
        content, reasoning = self.reasoning.feed(safe, final)
        self.text += content
        self.reasoning_text += reasoning
        return content, reasoning
