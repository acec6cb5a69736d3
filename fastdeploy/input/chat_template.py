"""Chat template rendering: Jinja2 in the sandbox Hugging Face uses, plus message validation.

Templates are data shipped with the model, so every failure while compiling or rendering one
(including the template's own ``raise_exception``) surfaces as ``ValueError``; callers turn that
into an HTTP 400.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

NO_TEMPLATE_MESSAGE = (
    "this model has no chat template; send a plain prompt to /v1/completions "
    "or start the server with a model that ships one"
)


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or rejected the conversation."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson escapes non-ASCII and HTML characters, which changes the prompt the
    # model was trained on; templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (Hugging Face marks assistant spans for
    training masks with it) and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the "generation" name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template once; the cache is keyed by the template text itself."""
    try:
        return _make_environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"invalid chat template (line {exc.lineno}): {exc.message}") from exc


def _content_to_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
        )
    texts: list[str] = []
    for part_index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"messages[{index}].content[{part_index}] must be {{\"type\": \"text\", \"text\": <string>}}; "
                "only text content is supported"
            )
        texts.append(part["text"])
    # Same convention as vLLM's string content format: parts are separate paragraphs.
    return "\n".join(texts)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the conversation shape and return copies with list contents joined into strings.

    An assistant message that carries ``tool_calls`` may have no content (OpenAI allows it).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    normalized: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}].role must be a non-empty string")
        copy = dict(message)
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):
                raise ValueError(f"messages[{index}].content is missing")
        else:
            copy["content"] = _content_to_text(content, index)
        normalized.append(copy)
    return normalized


def render_chat_template(
    source: str | None,
    messages: Any,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render ``messages`` with the template text ``source``; ``variables`` become template globals."""
    if not source:
        raise ValueError(NO_TEMPLATE_MESSAGE)
    template = compile_chat_template(source)
    context = dict(variables)
    context["messages"] = normalize_messages(messages)
    context["add_generation_prompt"] = add_generation_prompt
    try:
        return template.render(**context)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from exc
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
        # A template doing arithmetic or concatenation on a field the client left out or sent
        # with the wrong type: the request is at fault, not the server.
        raise ChatTemplateError(f"chat template could not render these messages: {exc}") from exc
