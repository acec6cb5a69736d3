"""Load a tokenizer from a Hugging Face style model directory.

Files read (all optional except one of tokenizer.json / tokenizer.model): tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, chat_template.json, generation_config.json and
config.json (the last two only for EOS/BOS/PAD ids).
"""
from __future__ import annotations

import json
import os
from typing import Any

import tokenizers

from fastdeploy.input.tokenizer import Tokenizer, TokenizersBackend

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(directory: str, name: str) -> dict[str, Any]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens are written as a string or as a serialized AddedToken ({"content": ...})."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first_id(*values: Any) -> int | None:
    for value in values:
        ids = _id_list(value)
        if ids:
            return ids[0]
    return None


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) and template else None
    return None


def _chat_template(directory: str, config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read() or None
    template = _pick_chat_template(config.get("chat_template"))
    if template is None:
        template = _pick_chat_template(_read_json(directory, "chat_template.json").get("chat_template"))
    return template


def _config_added_tokens(config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    added: dict[int, tuple[str, bool]] = {}
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(token)
        if content is not None and str(key).isdigit():
            added[int(key)] = (content, bool(token.get("special", True)) if isinstance(token, dict) else True)
    return added


def _make_backend(directory: str, config: dict[str, Any], named_specials: list[str]) -> tuple[Any, bool | None]:
    """The backend for the directory and, for SentencePiece, the add_bos default (None: infer it)."""
    json_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(json_path):
        return TokenizersBackend(tokenizers.Tokenizer.from_file(json_path)), None
    model_path = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(model_path):
        from fastdeploy.input.sentencepiece_backend import SentencePieceBackend

        backend = SentencePieceBackend(
            model_path,
            _config_added_tokens(config),
            special_pieces=named_specials,
            legacy=config.get("legacy") is not False,
        )
        return backend, True  # Llama-style SentencePiece tokenizers prepend BOS by default
    raise FileNotFoundError(f"{directory} has neither tokenizer.json nor tokenizer.model")


def load_directory_tokenizer(directory: str) -> Tokenizer:
    config = _read_json(directory, "tokenizer_config.json")
    special_map = _read_json(directory, "special_tokens_map.json")
    generation = _read_json(directory, "generation_config.json")
    model_config = _read_json(directory, "config.json")

    def special(name: str) -> str | None:
        return _token_content(config.get(name)) or _token_content(special_map.get(name))

    named_specials = [c for c in map(special, _SPECIAL_NAMES) if c is not None]
    extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
    named_specials += [c for c in map(_token_content, extra) if c is not None]
    backend, default_add_bos = _make_backend(directory, config, named_specials)

    def token_id(name: str) -> int | None:
        content = special(name)
        return None if content is None else backend.token_to_id(content)

    bos_id = token_id("bos_token")
    if bos_id is None:
        bos_id = _first_id(generation.get("bos_token_id"), model_config.get("bos_token_id"))
    eos_ids: list[int] = []
    primary_eos = token_id("eos_token")
    if primary_eos is not None:
        eos_ids.append(primary_eos)
    eos_ids += _id_list(generation.get("eos_token_id")) + _id_list(model_config.get("eos_token_id"))
    pad_id = token_id("pad_token")
    if pad_id is None:
        pad_id = _first_id(generation.get("pad_token_id"), model_config.get("pad_token_id"))

    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        if default_add_bos is None:
            # No explicit flag: trust the post-processor shipped in tokenizer.json.
            leading = backend.leading_ids_of_post_processor()
            default_add_bos = bos_id is not None and leading[:1] == [bos_id]
        add_bos = default_add_bos

    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        add_bos_token=add_bos,
        chat_template=_chat_template(directory, config),
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
    )
