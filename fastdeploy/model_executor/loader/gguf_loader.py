"""GGUF files → ModelArchConfig + float32 weights under canonical (Hugging Face Llama) names.

llama.cpp's converter permutes the rows of Llama's attn_q/attn_k so that its "normal" (adjacent-pair)
rotary kernel can be used; we undo that so every architecture runs the HF half-split rotary.
Qwen2 and ERNIE 4.5 are stored unpermuted (NEOX rope for Qwen2, adjacent pairs for ERNIE).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from fastdeploy.gguf_file import GGUFTensor, open_gguf_index
from fastdeploy.model_executor.layers.grid4 import Grid4, from_q4_1_blocks
from fastdeploy.model_executor.model_config import ModelArchConfig

_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "ernie4_5": "ernie4_5"}

# llama.cpp tensor name suffix → canonical per-layer name.
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (pairs interleaved per head → halves per head)."""
    out_features = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out_features // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def arch_config_from_metadata(meta: dict[str, Any]) -> ModelArchConfig:
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCH:
        raise ValueError(f"GGUF general.architecture={arch!r} is not supported; supported: {sorted(_GGUF_ARCH)}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = [int(x) for x in (eos, eot) if x is not None]
    return ModelArchConfig(
        architecture=_GGUF_ARCH[arch],
        vocab_size=int(get("vocab_size", 0)) or 0,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_interleaved=(arch == "ernie4_5"),
        max_position_embeddings=int(get("context_length", 4096)),
        attention_bias=False,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


# GGML block types that wint8 (layers/linear.py: one affine 8-bit grid per 32 weights along K, GGUF's
# block size) holds exactly: Q8_0's symmetric grid and the min-based grids of the 4- and 5-bit types.
WINT8_EXACT_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                               GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0})


def matrix_types(path: str) -> set[GGMLQuantizationType]:
    """Storage types of the file's weight matrices (every 2-D tensor: the embedding, the output
    head and the linear layers; norms and biases are 1-D)."""
    return {GGMLQuantizationType(t.tensor_type) for t in open_gguf_index(path).tensors if len(t.shape) == 2}


def tensor_to_float32(tensor: GGUFTensor) -> np.ndarray:
    """Dequantize one GGUF tensor to float32 in [rows, cols] = [out, in] layout."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype == GGMLQuantizationType.F32:
        arr = np.asarray(tensor.data, dtype=np.float32)
    elif qtype == GGMLQuantizationType.F16:
        arr = np.asarray(tensor.data, dtype=np.float16).astype(np.float32)
    else:
        arr = dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the innermost dimension first
    return np.ascontiguousarray(arr.reshape(shape))


def load_gguf(path: str, keep_grids: bool = False) -> tuple[ModelArchConfig, dict[str, np.ndarray | Grid4]]:
    """Read a GGUF model file: architecture config and canonical weights, dequantized to float32,
    except with keep_grids the Q4_1 matrices, which stay on their grids (Grid4) for wint8 layers."""
    index = open_gguf_index(path)
    cfg = arch_config_from_metadata(index.metadata)
    # llama.cpp permutes Llama's q/k rows per head (module docstring).
    permuted_heads = {"attn_q.weight": cfg.num_attention_heads, "attn_q.bias": cfg.num_attention_heads,
                      "attn_k.weight": cfg.num_key_value_heads, "attn_k.bias": cfg.num_key_value_heads}
    weights: dict[str, np.ndarray | Grid4] = {}
    for tensor in index.tensors:
        name = tensor.name
        if name in _GLOBAL_TENSORS:
            canonical = _GLOBAL_TENSORS[name]
        elif name.startswith("blk."):
            _, idx, suffix = name.split(".", 2)
            if suffix not in _LAYER_TENSORS:
                continue  # e.g. rope_freqs: recomputed from metadata
            canonical = f"model.layers.{int(idx)}.{_LAYER_TENSORS[suffix]}"
        else:
            continue
        arr: np.ndarray | Grid4
        if keep_grids and tensor.tensor_type == GGMLQuantizationType.Q4_1 and len(tensor.shape) == 2:
            arr = from_q4_1_blocks(np.asarray(tensor.data))
        else:
            arr = tensor_to_float32(tensor)
        if cfg.architecture == "llama" and suffix_of(name) in permuted_heads:
            n_head = permuted_heads[suffix_of(name)]
            if isinstance(arr, Grid4):
                arr = arr.map_rows(lambda a, n=n_head: _unpermute_rows(a, n))
            else:
                arr = _unpermute_rows(arr, n_head)
        weights[canonical] = arr
    if "lm_head.weight" not in weights:
        cfg.tie_word_embeddings = True
    cfg.attention_bias = any(k.endswith("q_proj.bias") for k in weights)
    embed = weights.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{path}: GGUF has no token_embd.weight")
    cfg.vocab_size = cfg.vocab_size or embed.shape[0]
    _check_complete(cfg, weights, path)
    return cfg, weights


def suffix_of(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def _check_complete(cfg: ModelArchConfig, weights: dict[str, np.ndarray | Grid4], path: str) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        required += [f"model.layers.{i}.{v}" for k, v in _LAYER_TENSORS.items() if not k.endswith(".bias")]
    missing = [n for n in required if n not in weights]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
