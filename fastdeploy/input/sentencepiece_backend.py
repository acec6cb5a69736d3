"""Tokenizer backend over a SentencePiece ``tokenizer.model`` (directories without tokenizer.json).

Encoding is SentencePiece's own, after added/special tokens are cut out of the text (as Hugging
Face does). Decoding follows the decoder chain of Hugging Face's converted Llama tokenizers
(pieces with "▁" as space, byte pieces fused into UTF-8, one leading space dropped) so this backend
decodes exactly like a tokenizer rebuilt from the same vocabulary in GGUF.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

SPIECE_SPACE = "\u2581"

# sentencepiece ModelProto.SentencePiece.Type values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _byte_value(piece: str) -> int:
    # Byte pieces are spelled "<0xAB>".
    return int(piece[3:5], 16)


def _bytes_to_text(buffer: bytearray, count: int) -> str:
    try:
        return buffer.decode("utf-8")
    except UnicodeDecodeError:
        # One replacement character per byte piece, like the ByteFallback decoder of tokenizers.
        return "\ufffd" * count


class SentencePieceBackend:
    def __init__(
        self,
        model_file: str,
        added_tokens: Mapping[int, tuple[str, bool]],
        special_pieces: Sequence[str] = (),
        legacy: bool = True,
    ) -> None:
        """``added_tokens`` maps id → (content, special) for tokens matched whole in text; ids past the
        SentencePiece vocabulary extend it. ``special_pieces`` names vocabulary pieces that are special
        tokens (bos/eos/... from the config). ``legacy=False`` encodes text that follows an added token
        without SentencePiece's dummy-prefix space (Hugging Face's ``legacy`` flag)."""
        with open(model_file, "rb") as f:
            serialized = f.read()
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(serialized)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(serialized)
        self._sp_no_prefix: spm.SentencePieceProcessor | None = None
        add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        if not legacy and add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_no_prefix = spm.SentencePieceProcessor()
            self._sp_no_prefix.LoadFromSerializedProto(proto.SerializeToString())
        self._strip_leading_space = add_dummy_prefix

        size = len(proto.pieces)
        self._kinds: list[int] = [piece.type for piece in proto.pieces]
        self._pieces: list[str] = [piece.piece for piece in proto.pieces]
        self._texts: list[str] = [p.replace(SPIECE_SPACE, " ") for p in self._pieces]
        self._piece_ids: dict[str, int] = {}
        for i, piece in enumerate(self._pieces):
            self._piece_ids.setdefault(piece, i)

        added: dict[int, str] = {}
        special: set[int] = set()
        for i, kind in enumerate(self._kinds):
            if kind in (_CONTROL, _UNKNOWN) and self._pieces[i]:
                added[i] = self._pieces[i]
                special.add(i)
            elif kind == _USER_DEFINED:
                added[i] = self._pieces[i]
        for content in special_pieces:
            piece_id = self._piece_ids.get(content)
            if piece_id is not None:
                added[piece_id] = content
                special.add(piece_id)
        for token_id, (content, is_special) in added_tokens.items():
            if not content:
                continue
            added[token_id] = content
            if is_special:
                special.add(token_id)
            else:
                special.discard(token_id)
        self._added = added
        self._added_ids = {content: i for i, content in sorted(added.items(), reverse=True)}
        self.special_ids = frozenset(special)
        self.vocab_size = max([size, *(i + 1 for i in added)])
        # Longest first, so a token that is a prefix of another never wins the match.
        alternatives = sorted(self._added_ids, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._split.finditer(text):
            if match.start() > start:
                ids.extend(self._encode_segment(text[start : match.start()], start == 0))
            ids.append(self._added_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._encode_segment(text[start:], start == 0))
        return ids

    def _encode_segment(self, segment: str, at_text_start: bool) -> list[int]:
        if self._sp_no_prefix is not None and not at_text_start:
            return self._sp_no_prefix.encode(segment)
        return self._sp.encode(segment)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        pending = bytearray()
        pending_count = 0
        kinds, texts, added, special = self._kinds, self._texts, self._added, self.special_ids
        size = len(kinds)
        for token_id in ids:
            if token_id < 0 or token_id >= self.vocab_size:
                continue
            if token_id < size and kinds[token_id] == _BYTE:
                pending.append(_byte_value(self._pieces[token_id]))
                pending_count += 1
                continue
            if pending_count:
                out.append(_bytes_to_text(pending, pending_count))
                pending.clear()
                pending_count = 0
            content = added.get(token_id)
            if content is not None:
                if not (skip_special_tokens and token_id in special):
                    out.append(content)
            elif token_id < size:
                out.append(texts[token_id])
        if pending_count:
            out.append(_bytes_to_text(pending, pending_count))
        text = "".join(out)
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_token(self, token_id: int) -> str | None:
        content = self._added.get(token_id)
        if content is not None:
            return content
        if 0 <= token_id < len(self._pieces):
            return self._pieces[token_id]
        return None

    def token_to_id(self, token: str) -> int | None:
        token_id = self._added_ids.get(token)
        return token_id if token_id is not None else self._piece_ids.get(token)
