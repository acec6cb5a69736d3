"""The tokenizer every light process uses: one class over two backends, one loader for all formats.

Backends:
- ``TokenizersBackend`` wraps a ``tokenizers.Tokenizer`` (from tokenizer.json, or rebuilt from GGUF).
- ``SentencePieceBackend`` wraps a ``tokenizer.model`` (see sentencepiece_backend.py).

Backends never add BOS/EOS; ``Tokenizer.encode`` prepends BOS itself when asked, from the model
files' ``add_bos_token``. That keeps the rule in one place whatever post-processor a file carries.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import tokenizers

from fastdeploy.input.chat_template import render_chat_template


class TokenizerBackend(Protocol):
    """What ``Tokenizer`` needs from a concrete tokenization library."""

    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def token_to_id(self, token: str) -> int | None: ...


class TokenizersBackend:
    """A ``tokenizers.Tokenizer`` with its post-processor, padding and truncation out of the way."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self.vocab_size = max([tokenizer.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added)])

    @property
    def raw(self) -> tokenizers.Tokenizer:
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Negative ids would make the Rust side raise; ids past the vocabulary (a model's padded
        # embedding rows) are skipped by tokenizers itself.
        return self._tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id < 0:
            return None
        return self._tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def leading_ids_of_post_processor(self) -> list[int]:
        """Ids the file's own post-processor puts before the text (used to infer add_bos_token)."""
        return self._tokenizer.encode("", add_special_tokens=True).ids


class Tokenizer:
    """Text ↔ token ids, special-token facts and chat templating for one model."""

    def __init__(
        self,
        backend: TokenizerBackend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_token_ids))
        """All ids that end generation, the primary EOS first."""
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.chat_template = chat_template or None
        self.bos_token = bos_token if bos_token is not None else self._token_or_none(bos_token_id)
        first_eos = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = eos_token if eos_token is not None else self._token_or_none(first_eos)

    def _token_or_none(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def backend(self) -> TokenizerBackend:
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos_token:
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]  # add_bos_token implies an id
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._backend.special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render the conversation to prompt text. ``chat_template=`` overrides the model's template;
        every other keyword (``enable_thinking``, ``tools``...) becomes a template variable."""
        source = kwargs.pop("chat_template", None) or self.chat_template
        variables: dict[str, Any] = {}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update(kwargs)
        return render_chat_template(source, messages, add_generation_prompt, **variables)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos_ids={self.eos_token_ids}, "
            f"add_bos={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load the tokenizer of a ``.gguf`` file or of a model directory (tokenizer.json or tokenizer.model)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from fastdeploy.input.hf_tokenizer import load_directory_tokenizer

        return load_directory_tokenizer(path)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf") or _has_gguf_magic(path):
            from fastdeploy.input.gguf_tokenizer import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        raise ValueError(f"{path} is neither a .gguf file nor a model directory")
    raise FileNotFoundError(f"no tokenizer at {path}: not a file or directory")


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
