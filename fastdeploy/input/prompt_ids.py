"""Prompts to token ids, the way every entry point does it (tokenizer workers, /tokenize, LLM.chat)."""
from __future__ import annotations

from typing import Any

from fastdeploy.input.tokenizer import Tokenizer


class PromptError(ValueError):
    """A prompt the tokenizer cannot take; `param` names the request field at fault."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def chat_prompt(tok: Tokenizer, messages: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None,
                enable_thinking: bool | None = None, add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """The chat template's text for `messages` and its ids. The template writes the special tokens
    itself, so none are added on encoding. A template error is the messages' fault (400)."""
    kwargs = dict(chat_template_kwargs or {})
    if enable_thinking is not None:
        kwargs.setdefault("enable_thinking", enable_thinking)
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except ValueError as exc:
        raise PromptError("messages", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a user's template is the request's fault
        raise PromptError("messages", f"the chat template failed on these messages: {exc}") from None
    return text, tok.encode(text, add_special_tokens=False)


def checked_ids(tok: Tokenizer, ids: list[int], param: str = "prompt") -> list[int]:
    """ids, if every one is in the tokenizer's vocabulary."""
    bad = [t for t in ids if not 0 <= t < tok.vocab_size]
    if bad:
        raise PromptError(param, f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
    return list(ids)
