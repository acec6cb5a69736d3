"""Rebuild a model's tokenizer from the vocabulary stored in GGUF metadata.

Two vocabulary kinds exist in GGUF files:
- ``gpt2``: byte-level BPE (vocab + merges). The pre-tokenizer is not stored, only a name for it
  (``tokenizer.ggml.pre``), so each supported name maps to the split rule of the original
  tokenizer.json.
- ``llama``: a SentencePiece vocabulary (pieces, scores, piece types). SentencePiece BPE models
  store the merge order as scores (-rank), so merges are derived from them; unigram models carry
  log-probabilities and are rebuilt as a unigram lattice. Either way byte fallback is on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from fastdeploy.file_cache import FileCache
from fastdeploy.input.tokenizer import Tokenizer, TokenizersBackend

logger = logging.getLogger(__name__)

# Token types as written by llama.cpp's converters (same numbering as SentencePiece piece types).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SPIECE_SPACE = "\u2581"

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_ALIASES = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "phi-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}

# End-of-turn markers that stop generation even when the file names a different EOS id
# (llama.cpp treats these control tokens the same way).
_END_OF_TURN_TOKENS = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>"}
)


@dataclass
class GGUFVocab:
    """The ``tokenizer.*`` metadata of a GGUF file."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_token_id: int | None
    eos_token_id: int | None
    extra_eos_ids: list[int]
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool | None
    add_space_prefix: bool | None
    chat_template: str | None


def read_gguf_vocab(path: str) -> GGUFVocab:
    """The file's tokenizer metadata, from the vocabulary cache when this version of the file was
    read before: gguf's reader takes seconds over a chat model's ~100k strings, and every tokenizer
    and detokenizer process of a server reads them."""
    return _VOCAB_CACHE.get(path, lambda: _parse_gguf_vocab(path))


# Version: bumped when GGUFVocab or its parsing changes, so older entries are never decoded as new.
_VOCAB_CACHE = FileCache("gguf-vocab", version=1, value_type=GGUFVocab)


def _parse_gguf_vocab(path: str) -> GGUFVocab:
    from fastdeploy.gguf_file import open_gguf

    reader = open_gguf(path)

    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    token_types = value("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    extra_eos = [value(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    return GGUFVocab(
        model=value("tokenizer.ggml.model", "llama"),
        pre=value("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        scores=value("tokenizer.ggml.scores"),
        merges=value("tokenizer.ggml.merges"),
        bos_token_id=value("tokenizer.ggml.bos_token_id"),
        eos_token_id=value("tokenizer.ggml.eos_token_id"),
        extra_eos_ids=[int(i) for i in extra_eos if i is not None],
        pad_token_id=value("tokenizer.ggml.padding_token_id"),
        unk_token_id=value("tokenizer.ggml.unknown_token_id"),
        add_bos_token=value("tokenizer.ggml.add_bos_token"),
        add_space_prefix=value("tokenizer.ggml.add_space_prefix"),
        chat_template=value("tokenizer.chat_template"),
    )


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    duplicates = 0
    for i, token in enumerate(tokens):
        if token in vocab:
            duplicates += 1
        else:
            vocab[token] = i
    if duplicates:
        logger.warning("GGUF vocabulary repeats %d token strings; the repeats keep no text", duplicates)
    return vocab


def _byte_level_pre_tokenizer(pre: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """Return (pre-tokenizer, ignore_merges) for a ``tokenizer.ggml.pre`` name."""
    kind = _PRE_ALIASES.get(pre or "default")
    if kind is None:
        logger.warning("unknown GGUF pre-tokenizer %r; using the GPT-2 split, tokenization may differ", pre)
        kind = "gpt2"
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if kind == "digits":
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            False,
        )
    pattern = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # Llama 3 matches whole pre-tokens against the vocabulary before merging (its tokenizer.json
    # sets ignore_merges, and llama.cpp does the same for this pre-tokenizer).
    return pre_tokenizers.Sequence([split, byte_level]), kind == "llama3"


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ValueError(f"malformed GGUF merge {merge!r}")
    return left, right


def build_byte_level_bpe(vocab: GGUFVocab) -> tokenizers.Tokenizer:
    if not vocab.merges:
        raise ValueError("GGUF gpt2 vocabulary has no merges (tokenizer.ggml.merges)")
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(vocab.pre)
    model = models.BPE(
        vocab=_vocab_dict(vocab.tokens),
        merges=[_split_merge(m) for m in vocab.merges],
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=ignore_merges,
    )
    tokenizer = tokenizers.Tokenizer(model)
    if _PRE_ALIASES.get(vocab.pre or "default") == "qwen2":
        tokenizer.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes to NFC
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    _add_marked_tokens(tokenizer, vocab)
    return tokenizer


def _looks_like_bpe_scores(vocab: GGUFVocab) -> bool:
    """SentencePiece BPE scores normal pieces by -rank (whole numbers); unigram by log-probability."""
    assert vocab.scores is not None
    normal = [s for s, t in zip(vocab.scores, vocab.token_types) if t == TOKEN_NORMAL]
    if not normal:
        return True
    whole = sum(1 for s in normal if float(s).is_integer())
    return whole >= 0.99 * len(normal)


def _spm_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked like SentencePiece BPE ranks them:
    by the merged piece's score, highest first."""
    assert vocab.scores is not None
    mergeable = {}
    for i, (piece, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == TOKEN_NORMAL and piece not in mergeable:
            mergeable[piece] = i
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_id = mergeable.get(left)
            right_id = mergeable.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-vocab.scores[piece_id], piece_id, left_id, right_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_equivalent(vocab: GGUFVocab) -> tokenizers.Tokenizer:
    if vocab.scores is None or len(vocab.scores) != len(vocab.tokens):
        raise ValueError("GGUF llama vocabulary needs one score per token (tokenizer.ggml.scores)")
    unk_id = vocab.unk_token_id
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(vocab.token_types) if t == TOKEN_UNKNOWN), 0)
    if _looks_like_bpe_scores(vocab):
        model: models.Model = models.BPE(
            vocab=_vocab_dict(vocab.tokens),
            merges=_spm_merges(vocab),
            unk_token=vocab.tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    else:
        # SentencePiece never matches byte, control or unused pieces against text; push them out
        # of reach of the lattice instead of leaving them at their stored score of 0. (tokenizers
        # prices an unknown character below the lowest score, so a literal "<0x41>" still wins
        # when "<" or ">" themselves would need byte fallback; real vocabularies have both.)
        floor = min(s for s, t in zip(vocab.scores, vocab.token_types) if t == TOKEN_NORMAL) - 1000.0
        pieces = [
            (piece, float(score) if kind in (TOKEN_NORMAL, TOKEN_USER_DEFINED) else floor)
            for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types)
        ]
        model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=True)
    tokenizer = tokenizers.Tokenizer(model)
    add_prefix = True if vocab.add_space_prefix is None else bool(vocab.add_space_prefix)
    steps: list[normalizers.Normalizer] = [normalizers.Prepend(SPIECE_SPACE)] if add_prefix else []
    steps.append(normalizers.Replace(" ", SPIECE_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps: list[decoders.Decoder] = [
        decoders.Replace(SPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    _add_marked_tokens(tokenizer, vocab)
    return tokenizer


def _add_marked_tokens(tokenizer: tokenizers.Tokenizer, vocab: GGUFVocab) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens.

    Both kinds are matched whole in input text before the model runs (so ``<|im_start|>`` in a
    rendered chat template is one id). User-defined tokens (``<think>``, ``<tool_call>``) are not
    special: decoding with skip_special_tokens keeps them, as Hugging Face does.
    """
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for token, kind in zip(vocab.tokens, vocab.token_types):
        if not token:
            continue
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if plain:
        tokenizer.add_tokens(plain)


def _eos_ids(vocab: GGUFVocab) -> list[int]:
    ids = [] if vocab.eos_token_id is None else [int(vocab.eos_token_id)]
    ids.extend(vocab.extra_eos_ids)
    ids.extend(
        i
        for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types))
        if kind == TOKEN_CONTROL and token in _END_OF_TURN_TOKENS
    )
    return ids


def tokenizer_from_gguf_vocab(vocab: GGUFVocab) -> Tokenizer:
    if vocab.model == "gpt2":
        raw = build_byte_level_bpe(vocab)
        default_add_bos = False
    elif vocab.model == "llama":
        raw = build_sentencepiece_equivalent(vocab)
        default_add_bos = True
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {vocab.model!r} (supported: gpt2, llama)")
    add_bos = default_add_bos if vocab.add_bos_token is None else bool(vocab.add_bos_token)
    return Tokenizer(
        TokenizersBackend(raw),
        bos_token_id=None if vocab.bos_token_id is None else int(vocab.bos_token_id),
        eos_token_ids=_eos_ids(vocab),
        pad_token_id=None if vocab.pad_token_id is None else int(vocab.pad_token_id),
        add_bos_token=add_bos,
        chat_template=vocab.chat_template,
    )


def load_gguf_tokenizer(path: str) -> Tokenizer:
    return tokenizer_from_gguf_vocab(read_gguf_vocab(path))
