"""Tiny random-weight models on disk, in every format the loaders read.

All builders are deterministic (seeded) and fast, and the models stay well under 1 MB:

* ``make_tiny_weights`` – a ModelArchConfig and canonical float32 weights (HF Llama names/layout).
* ``write_safetensors_dir`` – a Hugging Face style directory (config.json, safetensors shards, tokenizer,
  generation config). ERNIE 4.5 is written as the published ``-Paddle`` checkpoint is (``ernie.`` prefix,
  fused ``qkv_proj``/``up_gate_proj``, Paddle's [in, out] Linear layout) or as the ``-PT`` one.
* ``write_gguf`` – a GGUF file laid out as llama.cpp's ``convert_hf_to_gguf`` would write it.
* ``train_bpe_tokenizer`` – a byte-level BPE tokenizer.json with ChatML special tokens.
"""
from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fastdeploy.model_executor.model_config import ModelArchConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Trained first, so they get ids 0, 1, 2."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 384

# Token ids per architecture, in the style of the real models (SmolLM2, Qwen2.5-Instruct, ERNIE 4.5).
_TOKEN_IDS: dict[str, dict[str, Any]] = {
    "llama": {"bos": 1, "eos": [2], "pad": 2},
    "qwen2": {"bos": None, "eos": [2, 0], "pad": 0},
    "ernie4_5": {"bos": 1, "eos": [2], "pad": 0},
}
_ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0, "ernie4_5": 500000.0}
_RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "ernie4_5": 1e-5}
_TIED = {"llama": False, "qwen2": True, "ernie4_5": True}


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def make_tiny_weights(
    arch: str,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    inter: int = 128,
    tie_word_embeddings: bool | None = None,
) -> tuple[ModelArchConfig, dict[str, np.ndarray]]:
    """A random model of ``arch`` ("llama", "qwen2", "ernie4_5") as (config, canonical weights)."""
    ids = _TOKEN_IDS[arch]
    cfg = ModelArchConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_RMS_EPS[arch],
        rope_theta=_ROPE_THETA[arch],
        rope_interleaved=(arch == "ernie4_5"),
        max_position_embeddings=512,
        tie_word_embeddings=_TIED[arch] if tie_word_embeddings is None else tie_word_embeddings,
        attention_bias=(arch == "qwen2"),
        bos_token_id=ids["bos"],
        eos_token_ids=list(ids["eos"]),
        pad_token_id=ids["pad"],
    )
    rng = np.random.default_rng(seed)

    def linear(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    embed = rng.standard_normal((vocab_size, hidden)).astype(np.float32)
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": embed}
    for i in range(layers):
        p = f"model.layers.{i}"
        w[f"{p}.self_attn.q_proj.weight"] = linear(q_dim, hidden)
        w[f"{p}.self_attn.k_proj.weight"] = linear(kv_dim, hidden)
        w[f"{p}.self_attn.v_proj.weight"] = linear(kv_dim, hidden)
        w[f"{p}.self_attn.o_proj.weight"] = linear(hidden, q_dim)
        if cfg.attention_bias:
            for name, size in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                w[f"{p}.self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(size)).astype(np.float32)
        w[f"{p}.mlp.gate_proj.weight"] = linear(inter, hidden)
        w[f"{p}.mlp.up_proj.weight"] = linear(inter, hidden)
        w[f"{p}.mlp.down_proj.weight"] = linear(hidden, inter)
        w[f"{p}.input_layernorm.weight"] = norm()
        w[f"{p}.post_attention_layernorm.weight"] = norm()
    w["model.norm.weight"] = norm()
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = linear(vocab_size, hidden)
    return cfg, w


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    words = (
        "the quick brown fox jumps over the lazy dog while a serving engine schedules requests in "
        "continuous batches and pages its key value cache into blocks of sixteen tokens each"
    ).split()
    rng = np.random.default_rng(1234)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(200)]
    # Pseudo-words from syllables give the trainer enough distinct pairs for a few thousand merges.
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    made_up = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(1500)]
    lines += [" ".join(rng.choice(made_up, size=10)) for _ in range(600)]
    lines += [
        "Hello, world! How are you today? I am fine, thank you.",
        "def add(a, b):\n    return a + b\n",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
        "你好，世界。今天天气很好。",
        "user assistant system content role message",
    ] * 20
    return lines


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise AssertionError(f"trained {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return tok.to_str()


def train_bpe_tokenizer(path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write a byte-level BPE tokenizer.json with ``vocab_size`` tokens (the corpus supports ~2500 at most)."""
    path = Path(path)
    path.write_text(_trained_tokenizer_json(vocab_size), encoding="utf-8")
    return path


def _tokenizer_config(cfg: ModelArchConfig) -> dict[str, Any]:
    def token(i: int | None) -> str | None:
        return SPECIAL_TOKENS[i] if i is not None and i < len(SPECIAL_TOKENS) else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(cfg.bos_token_id),
        "eos_token": token(cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        "pad_token": token(cfg.pad_token_id),
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                     "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


# ----------------------------------------------------------------------------------------------
# safetensors directories
# ----------------------------------------------------------------------------------------------


def _hf_config(cfg: ModelArchConfig, dtype: str) -> dict[str, Any]:
    common = {
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.architecture == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "head_dim": cfg.head_dim,
            "attention_bias": cfg.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "rope_scaling": None,
        }
    if cfg.architecture == "qwen2":
        out = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **common,
            "attention_dropout": 0.0,
            "max_window_layers": cfg.num_hidden_layers,
            "rope_scaling": None,
            "sliding_window": cfg.max_position_embeddings,
            "use_sliding_window": False,
        }
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            out["head_dim"] = cfg.head_dim
        return out
    raise ValueError(cfg.architecture)


def _ernie_config(cfg: ModelArchConfig, dtype: str, variant: str) -> dict[str, Any]:
    out = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "ernie4_5",
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_hidden_layers,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": False,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "use_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if variant == "paddle":
        # Paddle configs name the dtype "dtype" and keep training knobs the -PT export drops.
        return {"architectures": ["Ernie4_5_ForCausalLM"], **out, "dtype": dtype,
                "compression_ratio": 1.0, "use_flash_attention": True, "use_rmsnorm": True,
                "fuse_rms_norm": False, "fuse_swiglu": False, "max_sequence_length": cfg.max_position_embeddings}
    return {"architectures": ["Ernie4_5ForCausalLM"], **out, "torch_dtype": dtype}


def _ernie_paddle_tensors(cfg: ModelArchConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical weights → the -Paddle checkpoint's names and [in, out] Linear layout."""
    if cfg.attention_bias:
        raise ValueError("ERNIE 4.5 fixtures have no biases")
    t: dict[str, np.ndarray] = {"ernie.embed_tokens.weight": w["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        c, p = f"model.layers.{i}", f"ernie.layers.{i}"
        qkv = np.concatenate([w[f"{c}.self_attn.{n}_proj.weight"] for n in "qkv"], axis=0)
        t[f"{p}.self_attn.qkv_proj.weight"] = qkv.T
        t[f"{p}.self_attn.o_proj.weight"] = w[f"{c}.self_attn.o_proj.weight"].T
        gate_up = np.concatenate([w[f"{c}.mlp.gate_proj.weight"], w[f"{c}.mlp.up_proj.weight"]], axis=0)
        t[f"{p}.mlp.up_gate_proj.weight"] = gate_up.T
        t[f"{p}.mlp.down_proj.weight"] = w[f"{c}.mlp.down_proj.weight"].T
        t[f"{p}.input_layernorm.weight"] = w[f"{c}.input_layernorm.weight"]
        t[f"{p}.post_attention_layernorm.weight"] = w[f"{c}.post_attention_layernorm.weight"]
    t["ernie.norm.weight"] = w["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = w["lm_head.weight"].T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def _write_raw_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write a safetensors file by hand (BF16 or U16-typed bf16 bits; numpy and so safetensors.numpy lack bf16)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, arr in tensors.items():
        if dtype in ("BF16", "U16"):
            data = float32_to_bf16_bits(arr).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def write_safetensors_dir(
    directory: str | Path,
    cfg: ModelArchConfig,
    weights: dict[str, np.ndarray],
    tokenizer: str | None = "bpe",
    dtype: str = "float32",
    shards: int = 1,
    write_index: bool = True,
    ernie_variant: str = "paddle",
) -> Path:
    """Write a model directory the way its publisher would.

    dtype: "float32" or "bfloat16" (typed BF16, or "uint16" for the U16 typing some Paddle exports use).
    shards > 1 splits the tensors over ``model-0000k-of-0000n.safetensors`` files, with
    ``model.safetensors.index.json`` unless ``write_index`` is False.
    ernie_variant: "paddle" (``baidu/ERNIE-4.5-0.3B-Paddle`` layout) or "pt" (``-PT`` layout).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if cfg.architecture == "ernie4_5":
        config = _ernie_config(cfg, "bfloat16" if dtype != "float32" else "float32", ernie_variant)
        tensors = _ernie_paddle_tensors(cfg, weights) if ernie_variant == "paddle" else dict(weights)
    else:
        config = _hf_config(cfg, "bfloat16" if dtype != "float32" else "float32")
        tensors = dict(weights)
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    generation = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.8}
    if cfg.eos_token_ids:
        generation["eos_token_id"] = cfg.eos_token_ids if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")

    names = list(tensors)
    groups = [names[k::shards] for k in range(shards)] if shards > 1 else [names]
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in group}
        if dtype == "float32":
            save_file(part, str(root / fname), metadata={"format": "pt"})
        elif dtype in ("bfloat16", "uint16"):
            _write_raw_safetensors(root / fname, part, "BF16" if dtype == "bfloat16" else "U16")
        else:
            raise ValueError(f"dtype {dtype!r}")
        weight_map.update({n: fname for n in group})
    if shards > 1 and write_index:
        total = sum(int(t.size) * (4 if dtype == "float32" else 2) for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")

    if tokenizer == "bpe":
        train_bpe_tokenizer(root / "tokenizer.json", cfg.vocab_size)
        (root / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(cfg), indent=2), encoding="utf-8")
        (root / "special_tokens_map.json").write_text(json.dumps({
            "eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}), encoding="utf-8")
    elif tokenizer is not None:
        raise ValueError(f"tokenizer {tokenizer!r}")
    return root


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: per head, half-split rotary lanes → adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(canonical: str) -> str:
    if canonical in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[canonical]
    _, _, idx, rest = canonical.split(".", 3)
    return f"blk.{idx}.{_GGUF_LAYER_NAMES[rest]}"


def _gguf_tokenizer_arrays(tokenizer_json_path: str | Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    data = json.loads(Path(tokenizer_json_path).read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids beyond vocab_size={vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED padding rows, as llama.cpp marks them
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = 3 if text in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(
    path: str | Path,
    cfg: ModelArchConfig,
    weights: dict[str, np.ndarray],
    tokenizer_json_path: str | Path,
    qtype: str = "F32",
) -> Path:
    """Write a GGUF file as llama.cpp's converter would (qtype: "F32", "F16", "Q8_0" or "Q4_1").

    Llama's attn_q/attn_k rows get llama.cpp's permutation; Qwen2 and ERNIE 4.5 tensors are stored as is
    (llama.cpp runs those with NEOX resp. normal rope on unpermuted weights). 1-D tensors stay F32, and the
    block types fall back to F32 for rows not a multiple of 32, like llama.cpp.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    arch = cfg.architecture
    path = Path(path)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(int(file_type))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    tokens, types, merges = _gguf_tokenizer_arrays(tokenizer_json_path, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        writer.add_eos_token_id(cfg.eos_token_ids[0])
    if len(cfg.eos_token_ids) > 1:
        writer.add_eot_token_id(cfg.eos_token_ids[1])
    if cfg.pad_token_id is not None:
        writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for canonical, arr in weights.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arch == "llama" and ".self_attn.q_proj." in canonical:
            arr = _llamacpp_permute(arr, cfg.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in canonical:
            arr = _llamacpp_permute(arr, cfg.num_key_value_heads)
        name = _gguf_name(canonical)
        if arr.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, arr)
        elif qtype == "F16":
            writer.add_tensor(name, arr.astype(np.float16))
        elif arr.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(arr, Q[qtype]), raw_dtype=Q[qtype])
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
