"""Hugging Face / Paddle safetensors directories → ModelArchConfig + float32 weights under canonical names.

Canonical names and layout are Hugging Face Llama's (``model.layers.{i}.self_attn.q_proj.weight`` …,
Linear weights ``[out_features, in_features]``). Supported ``config.json`` architectures:
``LlamaForCausalLM``, ``Qwen2ForCausalLM`` (q/k/v biases), and ERNIE 4.5 dense as
``Ernie4_5_ForCausalLM`` (the ``-Paddle`` checkpoints and the original ``-PT`` remote-code ones) or
``Ernie4_5ForCausalLM`` (the ``-PT`` checkpoints for transformers' native class).

Only ``*.safetensors`` files are read; pickle-based files (``.bin``, ``.pt``, ``.pdparams`` …) are never
opened. bf16 tensors are widened to float32 here because numpy has no bfloat16.

What ERNIE 4.5 dense (``baidu/ERNIE-4.5-0.3B-Paddle`` / ``-PT``) looks like, and where that comes from
------------------------------------------------------------------------------------------------
* Shape (config.json of the 0.3B, also transformers' ``Ernie4_5Config`` defaults): hidden_size 1024,
  intermediate_size 3072, num_hidden_layers 18, num_attention_heads 16, num_key_value_heads 2,
  head_dim 128 (so q is 2048 wide, wider than hidden), vocab_size 103424, rope_theta 500000,
  rms_norm_eps 1e-5, max_position_embeddings 131072, use_bias false, tie_word_embeddings true,
  bos 1 / eos 2 / pad 0, hidden_act silu. Paddle configs carry ``"dtype"`` plus training-only keys
  (``compression_ratio``, ``fuse_*``, ``use_flash_attention`` …); ``-PT`` configs carry ``"torch_dtype"``.
  Sources: huggingface/transformers ``models/ernie4_5/configuration_ernie4_5.py``; the -PT
  config.json as mirrored in github.com/Hchnr/early_exiting ``ERNIE45_03B_Base``; the key lists in
  PaddlePaddle/ERNIE ``tools/paddle2torch/tran_4_5t.py`` (``update_config_files``).
* ``-Paddle`` weight names and layout: prefix ``ernie.`` (PaddleFormers ``base_model_prefix = "ernie"``;
  FastDeploy ``ernie4_5_moe.py`` sets ``prefix_name = "ernie"``), ``lm_head.weight`` at top level.
  Attention is one fused ``self_attn.qkv_proj.weight`` and the MLP one fused ``mlp.up_gate_proj.weight``;
  ``o_proj``/``down_proj`` as usual. Every Linear is stored in Paddle's ``[in_features, out_features]``
  order: qkv_proj is ``[hidden, (heads + 2 * kv_heads) * head_dim]`` with q columns first, then k,
  then v; up_gate_proj is ``[hidden, 2 * intermediate]`` with the *gate* half first (the name notwithstanding;
  PaddleFormers ``nn/mlp.py`` does ``gate, x = up_gate_proj(x).chunk(2)``; silu(gate) * up).
  A dumped 300B-A47B -Paddle checkpoint shows the same: ``ernie.layers.16.self_attn.qkv_proj.weight``
  ``(8192, 10240)`` and ``down_proj`` ``(3584, 8192)`` (github.com/Hchnr/test ``load/safe_open.output.numpy``).
  Baidu's own converter (PaddlePaddle/ERNIE ``tools/paddle2torch/tran_4_5t.py``) confirms all of it:
  it renames ``ernie.`` → ``model.``, splits qkv along the last axis at ``[q, q + kv]``, splits
  up_gate into ``gate, up`` along the last axis, transposes every Linear (``o_proj``/``down_proj`` and the
  split pieces) and transposes ``lm_head.weight`` only when embeddings are *not* tied (a tied head is the
  ``[vocab, hidden]`` embedding). It applies no Q/K row permutation. The embedding is ``[vocab, hidden]``.
  bf16 tensors of Paddle exports may be typed ``U16`` (Paddle's numpy bridge stores bf16 as uint16; the
  converter above does ``if numpy_arr.dtype == np.uint16: view(torch.bfloat16)``), so U16 is read as bf16.
* ``-PT`` names and layout: prefix ``model.``, separate ``q_proj``/``k_proj``/``v_proj`` and
  ``gate_proj``/``up_proj``, torch ``[out, in]`` layout (the original remote-code
  ``modeling_ernie4_5.py`` and transformers' ``modular_ernie4_5.py`` both use plain ``nn.Linear``). The
  remote-code ``Ernie4_5_LMHead`` keeps an *untied* head as ``[hidden, vocab]``; the shape check below
  transposes that case. llama.cpp's ``convert_hf_to_gguf`` ``Ernie4_5Model`` also accepts ``ernie.``
  prefixes and fused ``qkv_proj``/``up_gate_proj`` (gate first), and does not permute Q/K either.
* Rotary: ERNIE 4.5 rotates *adjacent* lanes (pairs ``(2i, 2i+1)``), i.e. the GPT-J / "interleaved"
  convention, so ``rope_interleaved=True``. Sources: PaddleFormers ``RopeEmbedding.apply_rotary``
  (``stack([-q[..., 1::2], q[..., 0::2]])`` with sin/cos repeated pairwise), the -PT remote code (same),
  transformers ``apply_rotary_pos_emb`` in ``modular_ernie4_5.py`` (GLM ``rotate_half`` on ``0::2/1::2``
  and ``repeat_interleave`` of cos/sin), FastDeploy ``Attention(..., use_neox_rotary_style=False)``, vLLM
  ``ernie45.py`` (``rotary_emb.is_neox_style = False``). Weights are used as stored, never permuted.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from fastdeploy.model_executor.model_config import ModelArchConfig

logger = logging.getLogger("fastdeploy")

HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Ernie4_5_ForCausalLM": "ernie4_5",
    "Ernie4_5ForCausalLM": "ernie4_5",
}
"""config.json ``architectures`` entry → ModelArchConfig.architecture."""

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pdparams", ".pdopt", ".ckpt", ".pkl", ".pickle")
_INDEX_FILE = "model.safetensors.index.json"

# Per-architecture defaults for keys a config.json may omit (the transformers config class defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "ernie4_5": {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True},
}

# Tensors a checkpoint may carry that inference recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
}
_BF16_DTYPES = ("BF16", "U16")


# ----------------------------------------------------------------------------------------------
# config.json → ModelArchConfig
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _first_id(*values: Any) -> int | None:
    for value in values:
        ids = _as_id_list(value)
        if ids:
            return ids[0]
    return None


def _rope_theta(config: dict[str, Any], default: float) -> float:
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    params = config.get("rope_parameters")  # transformers >= 5 nests it here
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return default


def _check_rope_scaling(config: dict[str, Any]) -> None:
    """Reject rope scaling we do not implement rather than serving silently wrong logits."""
    for key in ("rope_scaling", "rope_parameters"):
        scaling = config.get(key)
        if not isinstance(scaling, dict):
            continue
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"config.json {key}={scaling!r}: only plain RoPE (rope_type 'default') is supported")


def arch_config_from_hf_config(
    config: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> ModelArchConfig:
    """Build a ModelArchConfig from a parsed config.json (and optional generation_config.json)."""
    declared = config.get("architectures") or []
    if isinstance(declared, str):
        declared = [declared]
    matches = [HF_ARCHITECTURES[a] for a in declared if a in HF_ARCHITECTURES]
    if not matches:
        raise ValueError(
            f"config.json architectures={declared!r} is not supported; supported architectures: "
            f"{', '.join(HF_ARCHITECTURES)}"
        )
    arch = matches[0]
    defaults = _DEFAULTS[arch]

    def required(key: str) -> int:
        if config.get(key) is None:
            raise ValueError(f"config.json lacks {key!r}, required for {declared[0]}")
        return int(config[key])

    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json hidden_act={act!r}: only silu (SwiGLU) MLPs are supported")
    _check_rope_scaling(config)

    hidden = required("hidden_size")
    heads = required("num_attention_heads")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)

    if arch == "qwen2":
        attention_bias = True
    elif arch == "llama":
        if config.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=true is not supported")
        attention_bias = bool(config.get("attention_bias", False))
    else:
        if config.get("use_bias"):
            # ERNIE's use_bias puts biases on every Linear (o_proj, MLP) and the norms, which the
            # canonical weight set has no slot for.
            raise ValueError("ERNIE 4.5 checkpoints with use_bias=true are not supported")
        attention_bias = False

    generation = generation_config or {}
    eos_ids = _as_id_list(generation.get("eos_token_id")) + _as_id_list(config.get("eos_token_id"))
    tie = config.get("tie_word_embeddings")

    return ModelArchConfig(
        architecture=arch,
        vocab_size=required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=required("intermediate_size"),
        num_hidden_layers=required("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps") or defaults["rms_norm_eps"]),
        rope_theta=_rope_theta(config, defaults["rope_theta"]),
        rope_interleaved=(arch == "ernie4_5"),
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(defaults["tie_word_embeddings"] if tie is None else tie),
        attention_bias=attention_bias,
        bos_token_id=_first_id(generation.get("bos_token_id"), config.get("bos_token_id")),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        pad_token_id=_first_id(generation.get("pad_token_id"), config.get("pad_token_id")),
    )


# ----------------------------------------------------------------------------------------------
# Reading safetensors files
# ----------------------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header dict) of one safetensors file."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: bf16 is the high half of an fp32 word."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _SafetensorsStore:
    """Name → tensor over several safetensors files; tensors are read on demand, each once."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for path in files:
            data_start, header = _read_header(path)
            for name, info in header.items():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name][0].name} and {path.name}")
                self._where[name] = (path, data_start, info)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._where[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        path, data_start, info = self._where[name]
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        if dtype in _BF16_DTYPES:
            begin, end = (int(x) for x in info["data_offsets"])
            count = (end - begin) // 2
            bits = np.fromfile(path, dtype="<u2", count=count, offset=data_start + begin)
            if bits.size != int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"{path.name}: tensor {name!r} is truncated")
            return bf16_bits_to_float32(bits).reshape(shape)
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16, F64")
        with safe_open(str(path), framework="numpy") as f:
            arr = f.get_tensor(name)
        return np.ascontiguousarray(arr, dtype=np.float32)


def _find_weight_files(root: Path) -> list[Path]:
    index_path = root / _INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no weight_map")
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shards that do not exist: {missing}")
        return files
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{root} holds only pickle-based weights ({', '.join(pickles[:4])}); these are never loaded "
            "because unpickling can run arbitrary code. Safetensors is required: convert the checkpoint to "
            "*.safetensors (e.g. save_pretrained(..., safe_serialization=True))."
        )
    raise FileNotFoundError(f"{root} has no *.safetensors weight files")


# ----------------------------------------------------------------------------------------------
# Checkpoint names/layout → canonical names/layout
# ----------------------------------------------------------------------------------------------


class _CanonicalMapper:
    """Turns one checkpoint's tensors into canonical ones, tracking which stored tensors it consumed."""

    def __init__(self, cfg: ModelArchConfig, store: _SafetensorsStore, root: Path) -> None:
        self.cfg = cfg
        self.store = store
        self.root = root
        # Strip the base-model prefix: "model." (HF, -PT) or "ernie." (-Paddle). lm_head stays top level.
        self.stored: dict[str, str] = {}
        prefixes = {name.split(".", 1)[0] for name in store.names() if name.startswith(("model.", "ernie."))}
        for name in store.names():
            short = name.split(".", 1)[1] if name.split(".", 1)[0] in prefixes else name
            self.stored[short] = name
        # Paddle saves nn.Linear weights as [in, out]; its checkpoints are the ones under "ernie.".
        self.paddle_layout = "ernie" in prefixes
        self.prefix = "ernie." if self.paddle_layout else ("model." if prefixes else "")
        # A checkpoint fuses projections in every layer or in none; a missing fused tensor is named as such.
        self.fused_qkv = any(s.endswith("self_attn.qkv_proj.weight") for s in self.stored)
        self.fused_up_gate = any(s.endswith("mlp.up_gate_proj.weight") for s in self.stored)
        self.used: set[str] = set()

    def has(self, short: str) -> bool:
        return short in self.stored

    def read(self, short: str) -> np.ndarray:
        if short not in self.stored:
            full = short if short.startswith("lm_head.") else self.prefix + short
            raise ValueError(f"{self.root}: missing tensor {full!r} required by {self.cfg.architecture}")
        self.used.add(short)
        return self.store.get(self.stored[short])

    def vector(self, short: str, size: int) -> np.ndarray:
        arr = self.read(short)
        if arr.shape != (size,):
            raise ValueError(f"{self.root}: tensor {self.stored[short]!r} has shape {arr.shape}, expected ({size},)")
        return arr

    def linear(self, short: str, out_features: int, in_features: int) -> np.ndarray:
        """A Linear weight as [out, in], whatever the checkpoint's orientation."""
        arr = self.read(short)
        stored = (in_features, out_features) if self.paddle_layout else (out_features, in_features)
        if arr.shape == stored:
            return np.ascontiguousarray(arr.T) if self.paddle_layout else arr
        if arr.shape == stored[::-1]:
            # The other orientation, unambiguous since out != in (e.g. -PT's untied [hidden, vocab] head).
            return arr if self.paddle_layout else np.ascontiguousarray(arr.T)
        raise ValueError(
            f"{self.root}: tensor {self.stored[short]!r} has shape {arr.shape}, expected {stored} "
            f"for {self.cfg.architecture} with the dimensions in config.json"
        )

    def embedding(self, short: str) -> np.ndarray:
        arr = self.read(short)
        want = (self.cfg.vocab_size, self.cfg.hidden_size)
        if arr.shape != want:
            raise ValueError(f"{self.root}: tensor {self.stored[short]!r} has shape {arr.shape}, expected {want}")
        return arr

    def leftovers(self) -> list[str]:
        ignored = [s for s in self.stored if s.endswith(_IGNORED_SUFFIXES)]
        if self.cfg.tie_word_embeddings and "lm_head.weight" in self.stored:
            ignored.append("lm_head.weight")  # tied: the head is the embedding (Paddle may store a copy)
        return [self.stored[s] for s in self.stored if s not in self.used and s not in ignored]


def _map_attention(m: _CanonicalMapper, i: int, out: dict[str, np.ndarray]) -> None:
    cfg = m.cfg
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    src, dst = f"layers.{i}.self_attn", f"model.layers.{i}.self_attn"
    if m.fused_qkv:
        fused = m.linear(f"{src}.qkv_proj.weight", q_dim + 2 * kv_dim, cfg.hidden_size)
        q, k, v = np.split(fused, [q_dim, q_dim + kv_dim], axis=0)
    else:
        q = m.linear(f"{src}.q_proj.weight", q_dim, cfg.hidden_size)
        k = m.linear(f"{src}.k_proj.weight", kv_dim, cfg.hidden_size)
        v = m.linear(f"{src}.v_proj.weight", kv_dim, cfg.hidden_size)
    out[f"{dst}.q_proj.weight"] = np.ascontiguousarray(q)
    out[f"{dst}.k_proj.weight"] = np.ascontiguousarray(k)
    out[f"{dst}.v_proj.weight"] = np.ascontiguousarray(v)
    out[f"{dst}.o_proj.weight"] = m.linear(f"{src}.o_proj.weight", cfg.hidden_size, q_dim)
    if cfg.attention_bias:
        if m.fused_qkv:
            qb, kb, vb = np.split(m.vector(f"{src}.qkv_proj.bias", q_dim + 2 * kv_dim), [q_dim, q_dim + kv_dim])
        else:
            qb = m.vector(f"{src}.q_proj.bias", q_dim)
            kb = m.vector(f"{src}.k_proj.bias", kv_dim)
            vb = m.vector(f"{src}.v_proj.bias", kv_dim)
        out[f"{dst}.q_proj.bias"] = np.ascontiguousarray(qb)
        out[f"{dst}.k_proj.bias"] = np.ascontiguousarray(kb)
        out[f"{dst}.v_proj.bias"] = np.ascontiguousarray(vb)


def _map_mlp(m: _CanonicalMapper, i: int, out: dict[str, np.ndarray]) -> None:
    cfg = m.cfg
    inter, hidden = cfg.intermediate_size, cfg.hidden_size
    src, dst = f"layers.{i}.mlp", f"model.layers.{i}.mlp"
    if m.fused_up_gate:
        # ERNIE's fused projection: gate rows first, then up (see module docstring).
        fused = m.linear(f"{src}.up_gate_proj.weight", 2 * inter, hidden)
        gate, up = fused[:inter], fused[inter:]
    else:
        gate = m.linear(f"{src}.gate_proj.weight", inter, hidden)
        up = m.linear(f"{src}.up_proj.weight", inter, hidden)
    out[f"{dst}.gate_proj.weight"] = np.ascontiguousarray(gate)
    out[f"{dst}.up_proj.weight"] = np.ascontiguousarray(up)
    out[f"{dst}.down_proj.weight"] = m.linear(f"{src}.down_proj.weight", hidden, inter)


def map_to_canonical(cfg: ModelArchConfig, store: _SafetensorsStore, root: Path) -> dict[str, np.ndarray]:
    m = _CanonicalMapper(cfg, store, root)
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": m.embedding("embed_tokens.weight")}
    for i in range(cfg.num_hidden_layers):
        _map_attention(m, i, out)
        _map_mlp(m, i, out)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = m.vector(f"layers.{i}.{norm}.weight", cfg.hidden_size)
    out["model.norm.weight"] = m.vector("norm.weight", cfg.hidden_size)
    if not cfg.tie_word_embeddings:
        if not m.has("lm_head.weight"):
            raise ValueError(
                f"{root}: missing tensor 'lm_head.weight' (config.json says tie_word_embeddings=false)"
            )
        out["lm_head.weight"] = m.linear("lm_head.weight", cfg.vocab_size, cfg.hidden_size)
    leftovers = m.leftovers()
    if leftovers:
        # Never drop weights silently: an unknown tensor means a model variant we would run wrongly.
        shown = ", ".join(sorted(leftovers)[:6])
        raise ValueError(f"{root}: tensors not supported for {cfg.architecture}: {shown}"
                         f"{' ...' if len(leftovers) > 6 else ''}")
    return out


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def load_safetensors_dir(path: str | os.PathLike[str]) -> tuple[ModelArchConfig, dict[str, np.ndarray]]:
    """Load a model directory (config.json + *.safetensors): its config and canonical float32 weights."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} has no config.json; a safetensors model directory needs one")
    config = _read_json(config_path)
    generation_path = root / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else None
    cfg = arch_config_from_hf_config(config, generation)
    store = _SafetensorsStore(_find_weight_files(root))
    weights = map_to_canonical(cfg, store, root)
    logger.info("loaded %s safetensors model from %s (%d tensors)", cfg.architecture, root, len(weights))
    return cfg, weights
