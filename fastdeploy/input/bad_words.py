"""bad_words (strings) → token id sequences the sampler bans, as the model would spell them."""
from __future__ import annotations

from typing import Protocol


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


def bad_words_to_token_ids(tokenizer: _Encoder, words: list[str] | None) -> list[list[int]] | None:
    """Each word is banned both at the start of a word (leading space) and glued to the previous text."""
    if not words:
        return None
    sequences: list[list[int]] = []
    for word in words:
        for variant in (word, " " + word.lstrip()):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences or None
