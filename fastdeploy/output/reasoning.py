"""Reasoning parsers: split `<think>...</think>` output into reasoning_content and content, streaming.

Tags may arrive split across deltas ("</th" + "ink>"), so a parser holds back the longest suffix of
its input that could still become the tag it is looking for, and releases it once it cannot.
"""
from __future__ import annotations

_THINK_START = "<think>"
_THINK_END = "</think>"


def _partial_suffix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningParser:
    """Splits a text stream into (content, reasoning) deltas.

    starts_in_reasoning: the prompt already opened the think block (DeepSeek-R1, ERNIE thinking
    models), so output is reasoning until `</think>`. Otherwise (Qwen3) reasoning happens only
    when the output itself begins with `<think>`.
    """

    def __init__(self, starts_in_reasoning: bool) -> None:
        # "start": nothing but whitespace seen yet, an opening tag may still come.
        self._state = "start"
        self._starts_in_reasoning = starts_in_reasoning
        self._pending = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Returns (content_delta, reasoning_delta) that are safe to emit now; final flushes."""
        self._pending += delta
        content: list[str] = []
        reasoning: list[str] = []
        while self._pending:
            if not self._step(content, reasoning):
                break
        if final:
            c, r = self.finish()
            content.append(c)
            reasoning.append(r)
        return "".join(content), "".join(reasoning)

    def finish(self) -> tuple[str, str]:
        """Flush whatever was held back (an unterminated tag prefix is plain text after all)."""
        rest, self._pending = self._pending, ""
        if self._state in ("reasoning", "after_open") or (self._state == "start" and self._starts_in_reasoning):
            return "", rest.lstrip("\n") if self._state == "after_open" else rest
        if self._state == "after_think":
            return rest.lstrip("\n"), ""
        return rest, ""

    # One transition per call; False means "wait for more text".
    def _step(self, content: list[str], reasoning: list[str]) -> bool:
        text = self._pending
        if self._state == "start":
            stripped = text.lstrip()
            if stripped.startswith(_THINK_START):
                self._state = "after_open"
                self._pending = stripped[len(_THINK_START):]
                return True
            if not stripped or _THINK_START.startswith(stripped):
                return False  # only whitespace or a partial "<think>" so far
            self._state = "reasoning" if self._starts_in_reasoning else "content"
            return True
        if self._state in ("after_open", "after_think"):
            # Newlines right after either tag are template layout, not part of the text.
            self._pending = text.lstrip("\n")
            if not self._pending:
                return False
            self._state = "reasoning" if self._state == "after_open" else "content"
            return True
        if self._state == "content":
            content.append(text)
            self._pending = ""
            return True
        end = text.find(_THINK_END)
        if end >= 0:
            reasoning.append(text[:end])
            self._state = "after_think"
            self._pending = text[end + len(_THINK_END):]
            return True
        keep = _partial_suffix_len(text, _THINK_END)
        reasoning.append(text[:len(text) - keep])
        self._pending = text[len(text) - keep:]
        return False


# Parser name → whether the model's output starts inside the think block.
_PARSERS: dict[str, bool] = {
    "qwen3": False,
    "deepseek-r1": True,
    "deepseek_r1": True,
    "ernie-45-vl": True,
    "ernie_45_vl": True,
    "ernie-x1": True,
    "ernie_x1": True,
}


def reasoning_parser_names() -> list[str]:
    return sorted(_PARSERS)


def check_reasoning_parser(name: str | None) -> None:
    """Raise ValueError at start-up for an unknown parser name rather than on the first request."""
    if name is not None and name not in _PARSERS:
        raise ValueError(f"--reasoning-parser {name!r} is unknown; choose one of {', '.join(reasoning_parser_names())}")


def starts_in_reasoning(name: str | None, enable_thinking: bool = True) -> bool:
    """Whether the parser takes a request's output as reasoning from its first token (until
    `</think>`): the engine then holds structured output back until that tag."""
    if name is None:
        return False
    check_reasoning_parser(name)
    return _PARSERS[name] and enable_thinking


def get_reasoning_parser(name: str | None, enable_thinking: bool = True) -> ReasoningParser | None:
    """A fresh per-request parser, or None when there is nothing to split."""
    if name is None:
        return None
    check_reasoning_parser(name)
    starts_in = _PARSERS[name]
    if not enable_thinking and starts_in:
        # Thinking switched off: the template closed the think block already, all output is content.
        return None
    return ReasoningParser(starts_in_reasoning=starts_in)
