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
                enable_thinking: bool | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> tuple[str, list[int]]:
    """The chat template's text for `messages` and its ids. The template writes the special tokens
    itself, so none are added on encoding. A template error is the messages' fault (400).

    continue_final_message (vLLM's, after HF's apply_chat_template): the last message is the
    assistant's reply begun by the client; the text is cut right after its content, so the model
    carries on inside that turn instead of opening a new one."""
    final = _final_message(messages, add_generation_prompt) if continue_final_message else None
    kwargs = dict(chat_template_kwargs or {})
    if enable_thinking is not None:
        kwargs.setdefault("enable_thinking", enable_thinking)
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except ValueError as exc:
        raise PromptError("messages", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a user's template is the request's fault
        raise PromptError("messages", f"the chat template failed on these messages: {exc}") from None
    if final is not None:
        # Templates often strip a message's whitespace, so the stripped text is what is looked for.
        end = text.rfind(final)
        if end < 0:
            raise PromptError("messages", "the chat template does not reproduce the final message's text, "
                                          "so it cannot be continued")
        text = text[:end + len(final)]
    return text, tok.encode(text, add_special_tokens=False)


def _final_message(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    if add_generation_prompt:
        raise PromptError("continue_final_message", "cannot be combined with add_generation_prompt")
    last = messages[-1] if messages else {}
    content = last.get("content")
    if last.get("role") != "assistant" or not isinstance(content, str) or not content.strip():
        raise PromptError("continue_final_message", "the last message must be the assistant's, with text to continue")
    return content.strip()


def checked_ids(tok: Tokenizer, ids: list[int]) -> list[int]:
    """ids, if every one is in the tokenizer's vocabulary."""
    bad = [t for t in ids if not 0 <= t < tok.vocab_size]
    if bad:
        raise PromptError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
    return list(ids)
