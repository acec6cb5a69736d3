"""Chat template rendering: variables, filters, sandboxing, message validation."""
from __future__ import annotations

import copy
from datetime import datetime

import pytest
import tokenizers
from tokenizers import AddedToken, models, pre_tokenizers

from fastdeploy.input import Tokenizer
from fastdeploy.input.chat_template import compile_chat_template, normalize_messages, render_chat_template
from fastdeploy.input.tokenizer import TokenizersBackend

QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _tokenizer(chat_template: str | None) -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    raw = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(
        TokenizersBackend(raw),
        bos_token_id=1,
        eos_token_ids=[2],
        pad_token_id=None,
        add_bos_token=True,
        chat_template=chat_template,
    )


USER = [{"role": "user", "content": "hi"}]


def test_enable_thinking_is_passed_through() -> None:
    tok = _tokenizer(QWEN_LIKE)
    thinking = tok.apply_chat_template(USER)
    assert thinking == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(USER, enable_thinking=True) == thinking
    assert tok.apply_chat_template(USER, enable_thinking=False) == thinking + "<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(USER, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_bos_eos_and_override_template() -> None:
    tok = _tokenizer("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}")
    assert tok.apply_chat_template(USER) == "<s>hi</s>"
    assert tok.apply_chat_template(USER, bos_token="[B]") == "[B]hi</s>"
    assert tok.apply_chat_template(USER, chat_template="{{ messages | length }}") == "1"


def test_tojson_keeps_non_ascii_and_accepts_options() -> None:
    tools = [{"name": "météo", "description": "天气 🌤", "parameters": {"b": 1, "a": 2}}]
    out = render_chat_template("{{ tools | tojson }}", USER, tools=tools)
    assert out == '[{"name": "météo", "description": "天气 🌤", "parameters": {"b": 1, "a": 2}}]'
    out = render_chat_template("{{ tools[0].parameters | tojson(indent=2, sort_keys=True) }}", USER, tools=tools)
    assert out == '{\n  "a": 2,\n  "b": 1\n}'
    out = render_chat_template("{{ messages[0] | tojson }}", [{"role": "user", "content": "<b>&'\""}])
    assert out == '{"role": "user", "content": "<b>&\'\\""}'  # no HTML escaping either


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "user", "content": "ok"}, "oops"], "messages[1]"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": "ok"}, {"content": "x"}], "messages[2].role"),
        ([{"role": 5, "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 42}], "messages[1].content"),
        ([{"role": "user"}], "messages[0].content"),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[1].content[0]",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "messages[0].content[0]"),
    ],
)
def test_bad_messages_name_the_index(messages, needle: str) -> None:
    tok = _tokenizer(QWEN_LIKE)
    with pytest.raises(ValueError) as info:
        tok.apply_chat_template(messages)
    assert needle in str(info.value)


def test_text_parts_are_joined_and_input_is_not_mutated() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    before = copy.deepcopy(messages)
    assert render_chat_template("{{ messages[0].content }}", messages) == "one\ntwo"
    assert messages == before


def test_tool_call_message_without_content_is_accepted() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
    ]
    template = "{% for m in messages %}{{ m.role }}:{{ m.content if m.content is not none else m.tool_calls[0].function.name }};{% endfor %}"
    assert render_chat_template(template, messages) == "user:weather?;assistant:w;tool:sunny;"
    assert normalize_messages(messages)[1]["content"] is None


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutating methods
        "{% set x = messages[0] %}{{ x.update({'role': 'system'}) }}",
    ],
)
def test_sandbox_blocks_escapes(template: str) -> None:
    with pytest.raises(ValueError):
        render_chat_template(template, USER)


def test_sandbox_hides_dunder_attributes() -> None:
    assert render_chat_template("{{ ''.__class__ }}", USER) == ""


def test_raise_exception_becomes_value_error() -> None:
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    with pytest.raises(ValueError, match="first message must be system"):
        render_chat_template(template, USER)


def test_template_type_errors_become_value_errors() -> None:
    with pytest.raises(ValueError):
        render_chat_template("{{ messages[0].content + 1 }}", USER)


def test_strftime_now_and_loop_controls() -> None:
    years = {str(datetime.now().year)}
    out = render_chat_template("{{ strftime_now('%Y') }}", USER)
    years.add(str(datetime.now().year))
    assert out in years
    template = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    messages = [{"role": "user", "content": str(i)} for i in range(5)]
    assert render_chat_template(template, messages) == "01"


def test_generation_block_renders_its_body() -> None:
    template = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert render_chat_template(template, USER) == "<hi>"


def test_trim_and_lstrip_blocks() -> None:
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n"


def test_missing_or_broken_template() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        _tokenizer(None).apply_chat_template(USER)
    with pytest.raises(ValueError, match="invalid chat template"):
        _tokenizer("{% for m in messages %}").apply_chat_template(USER)


def test_templates_compile_once() -> None:
    source = "{{ messages | length }} compiled once"
    assert compile_chat_template(source) is compile_chat_template(source)
