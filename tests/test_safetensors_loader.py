"""safetensors directories (Llama, Qwen2, ERNIE 4.5 -Paddle/-PT) and GGUF files → canonical weights."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    make_tiny_weights,
    write_gguf,
    write_safetensors_dir,
)
from safetensors import safe_open
from safetensors.numpy import save_file

from fastdeploy.model_executor.loader.safetensors_loader import (
    arch_config_from_hf_config,
    bf16_bits_to_float32,
    load_safetensors_dir,
)

try:
    from fastdeploy.model_executor.loader.gguf_loader import load_gguf
except ImportError:  # the GGUF loader is written separately
    load_gguf = None

needs_gguf_loader = pytest.mark.skipif(
    load_gguf is None, reason="fastdeploy.model_executor.loader.gguf_loader.load_gguf is not available yet"
)

# (architecture, ERNIE checkpoint flavour); the flavour only matters for ernie4_5.
VARIANTS = [("llama", "paddle"), ("qwen2", "paddle"), ("ernie4_5", "paddle"), ("ernie4_5", "pt")]
VARIANT_IDS = ["llama", "qwen2", "ernie4_5-Paddle", "ernie4_5-PT"]


def _assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        assert got[name].dtype == np.float32, name
        assert got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def _rewrite_single_file(directory: Path, edit) -> None:
    """Load model.safetensors, let ``edit`` change the tensor dict, write it back (fp32)."""
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path))


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), VARIANTS, ids=VARIANT_IDS)
def test_fp32_round_trip_is_exact(tmp_path: Path, arch: str, variant: str) -> None:
    cfg, weights = make_tiny_weights(arch, seed=1)
    write_safetensors_dir(tmp_path, cfg, weights, ernie_variant=variant)

    got_cfg, got = load_safetensors_dir(str(tmp_path))

    assert got_cfg == cfg
    _assert_same_weights(got, weights)
    assert all(a.flags.c_contiguous for a in got.values())


@pytest.mark.parametrize(("arch", "variant"), VARIANTS, ids=VARIANT_IDS)
def test_bf16_is_widened_within_bf16_rounding(tmp_path: Path, arch: str, variant: str) -> None:
    cfg, weights = make_tiny_weights(arch, seed=2)
    write_safetensors_dir(tmp_path, cfg, weights, dtype="bfloat16", ernie_variant=variant)

    got_cfg, got = load_safetensors_dir(tmp_path)

    assert got_cfg == cfg
    assert sorted(got) == sorted(weights)
    for name, want in weights.items():
        assert got[name].dtype == np.float32
        # bf16 keeps 8 significant bits: round-to-nearest is off by at most 2^-9 relative.
        np.testing.assert_allclose(got[name], want, rtol=2.0**-8, atol=0, err_msg=name)
    assert not np.array_equal(got["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])  # really bf16


def test_bf16_widening_is_exact_on_known_bit_patterns() -> None:
    bits = np.array([0x3F80, 0x4000, 0xBF80, 0x0000, 0x7F80, 0x3E80], dtype=np.uint16)
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), np.array([1.0, 2.0, -1.0, 0.0, np.inf, 0.25], np.float32))


def test_paddle_u16_typed_bf16_is_read_as_bf16(tmp_path: Path) -> None:
    # Paddle's numpy bridge represents bf16 as uint16, so some Paddle exports type bf16 tensors U16.
    cfg, weights = make_tiny_weights("ernie4_5", seed=3)
    write_safetensors_dir(tmp_path, cfg, weights, dtype="uint16")
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("ernie.norm.weight").dtype == np.uint16

    _, got = load_safetensors_dir(tmp_path)

    for name, want in weights.items():
        np.testing.assert_allclose(got[name], want, rtol=2.0**-8, atol=0, err_msg=name)


@pytest.mark.parametrize("write_index", [True, False], ids=["with-index", "without-index"])
@pytest.mark.parametrize("arch", ["qwen2", "ernie4_5"])
def test_sharded_checkpoint(tmp_path: Path, arch: str, write_index: bool) -> None:
    cfg, weights = make_tiny_weights(arch, seed=4)
    write_safetensors_dir(tmp_path, cfg, weights, shards=3, write_index=write_index)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert (tmp_path / "model.safetensors.index.json").is_file() == write_index

    got_cfg, got = load_safetensors_dir(tmp_path)

    assert got_cfg == cfg
    _assert_same_weights(got, weights)


def test_untied_ernie_and_tied_llama(tmp_path: Path) -> None:
    for arch, tie in (("ernie4_5", False), ("llama", True)):
        cfg, weights = make_tiny_weights(arch, seed=5, tie_word_embeddings=tie)
        directory = tmp_path / arch
        write_safetensors_dir(directory, cfg, weights)
        got_cfg, got = load_safetensors_dir(directory)
        assert got_cfg.tie_word_embeddings is tie
        _assert_same_weights(got, weights)
        assert ("lm_head.weight" in got) is (not tie)


def test_safetensors_files_are_preferred_and_pickles_never_opened(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=6)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    # Not a valid pickle: opening it would fail loudly, so a pass proves it was never read.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")

    _, got = load_safetensors_dir(tmp_path)

    _assert_same_weights(got, weights)


# ----------------------------------------------------------------------------------------------
# ERNIE 4.5 specifics
# ----------------------------------------------------------------------------------------------


def test_ernie_paddle_fixture_has_the_published_names_and_layout(tmp_path: Path) -> None:
    # head_dim 32 makes q (4 * 32 = 128) wider than hidden (64), as in the 0.3B (2048 vs 1024).
    cfg, weights = make_tiny_weights("ernie4_5", seed=7, head_dim=32)
    write_safetensors_dir(tmp_path, cfg, weights)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Ernie4_5_ForCausalLM"]
    assert config["model_type"] == "ernie4_5" and config["tie_word_embeddings"] is True
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    h, q, kv, inter = 64, 4 * 32, 2 * 32, 128
    expected = {"ernie.embed_tokens.weight": (cfg.vocab_size, h), "ernie.norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"ernie.layers.{i}"
        expected.update({
            f"{p}.self_attn.qkv_proj.weight": (h, q + 2 * kv),
            f"{p}.self_attn.o_proj.weight": (q, h),
            f"{p}.mlp.up_gate_proj.weight": (h, 2 * inter),
            f"{p}.mlp.down_proj.weight": (inter, h),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        })
    assert shapes == expected


def test_ernie_paddle_mapping_splits_and_transposes(tmp_path: Path) -> None:
    """Check the loader against the raw stored tensors, independently of the fixture writer."""
    cfg, weights = make_tiny_weights("ernie4_5", seed=8, head_dim=32)
    write_safetensors_dir(tmp_path, cfg, weights)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}

    got_cfg, got = load_safetensors_dir(tmp_path)

    q, kv, inter = 128, 64, 128
    qkv = raw["ernie.layers.1.self_attn.qkv_proj.weight"]  # [hidden, q | k | v]
    np.testing.assert_array_equal(got["model.layers.1.self_attn.q_proj.weight"], qkv[:, :q].T)
    np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.weight"], qkv[:, q:q + kv].T)
    np.testing.assert_array_equal(got["model.layers.1.self_attn.v_proj.weight"], qkv[:, q + kv:].T)
    up_gate = raw["ernie.layers.1.mlp.up_gate_proj.weight"]  # [hidden, gate | up]
    np.testing.assert_array_equal(got["model.layers.1.mlp.gate_proj.weight"], up_gate[:, :inter].T)
    np.testing.assert_array_equal(got["model.layers.1.mlp.up_proj.weight"], up_gate[:, inter:].T)
    for part in ("mlp.down_proj", "self_attn.o_proj"):
        np.testing.assert_array_equal(got[f"model.layers.1.{part}.weight"], raw[f"ernie.layers.1.{part}.weight"].T)
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], raw["ernie.embed_tokens.weight"])
    assert got_cfg.rope_interleaved is True
    assert "lm_head.weight" not in got
    _assert_same_weights(got, weights)


def test_ernie_paddle_square_projections_follow_the_format_not_the_shape(tmp_path: Path) -> None:
    # heads * head_dim == hidden makes q/o square: only the checkpoint format says they are [in, out].
    cfg, weights = make_tiny_weights("ernie4_5", seed=9, heads=4, head_dim=16, kv_heads=4, inter=64)
    write_safetensors_dir(tmp_path, cfg, weights)
    _, got = load_safetensors_dir(tmp_path)
    _assert_same_weights(got, weights)


def test_ernie_paddle_tied_head_copy_is_ignored(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("ernie4_5", seed=10)
    write_safetensors_dir(tmp_path, cfg, weights)
    _rewrite_single_file(tmp_path, lambda t: t.update({"lm_head.weight": t["ernie.embed_tokens.weight"].copy()}))

    _, got = load_safetensors_dir(tmp_path)

    _assert_same_weights(got, weights)


def test_ernie_pt_untied_head_stored_hidden_by_vocab_is_transposed(tmp_path: Path) -> None:
    # The -PT remote code keeps an untied head as [hidden, vocab] (Ernie4_5_LMHead).
    cfg, weights = make_tiny_weights("ernie4_5", seed=11, tie_word_embeddings=False)
    write_safetensors_dir(tmp_path, cfg, weights, ernie_variant="pt")
    _rewrite_single_file(tmp_path, lambda t: t.update({"lm_head.weight": np.ascontiguousarray(t["lm_head.weight"].T)}))

    _, got = load_safetensors_dir(tmp_path)

    _assert_same_weights(got, weights)


ERNIE_03B_PT_CONFIG = {
    "architectures": ["Ernie4_5ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 131072, "model_type": "ernie4_5",
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 18,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "use_cache": False, "vocab_size": 103424, "rope_theta": 500000,
    "use_bias": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("architecture", ["Ernie4_5_ForCausalLM", "Ernie4_5ForCausalLM"])
def test_published_ernie_0_3b_config(architecture: str) -> None:
    config = dict(ERNIE_03B_PT_CONFIG, architectures=[architecture])
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "top_p": 0.8, "temperature": 0.8}

    cfg = arch_config_from_hf_config(config, generation)

    assert (cfg.architecture, cfg.hidden_size, cfg.intermediate_size) == ("ernie4_5", 1024, 3072)
    assert cfg.num_hidden_layers == 18
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 2, 128)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (103424, 500000.0, 1e-5)
    assert cfg.rope_interleaved is True and cfg.tie_word_embeddings is True and cfg.attention_bias is False
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, [2], 0)
    assert cfg.max_position_embeddings == 131072


def test_ernie_use_bias_is_refused() -> None:
    with pytest.raises(ValueError, match="use_bias"):
        arch_config_from_hf_config(dict(ERNIE_03B_PT_CONFIG, use_bias=True))


# ----------------------------------------------------------------------------------------------
# Config details
# ----------------------------------------------------------------------------------------------


def test_token_ids_merge_generation_config_and_config() -> None:
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 300, "eos_token_id": 7,
              "bos_token_id": 5}
    cfg = arch_config_from_hf_config(config, {"eos_token_id": [9, 7], "pad_token_id": 3})
    assert cfg.eos_token_ids == [9, 7]
    assert (cfg.bos_token_id, cfg.pad_token_id) == (5, 3)
    assert cfg.attention_bias is True and cfg.tie_word_embeddings is False
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 4

    cfg = arch_config_from_hf_config(dict(config, eos_token_id=[4, 6]), None)
    assert cfg.eos_token_ids == [4, 6] and cfg.pad_token_id is None


def test_rope_theta_from_rope_parameters_and_scaling_refused() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 300}
    cfg = arch_config_from_hf_config(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert cfg.rope_theta == 1e6
    with pytest.raises(ValueError, match="rope"):
        arch_config_from_hf_config(dict(base, rope_scaling={"rope_type": "llama3", "factor": 32.0}))


# ----------------------------------------------------------------------------------------------
# Bad directories
# ----------------------------------------------------------------------------------------------


def test_missing_config_json(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=12)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_safetensors_dir(tmp_path)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_safetensors_dir(tmp_path / "nope")


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model_state.pdparams", "consolidated.00.pt"])
def test_pickle_only_directory_requires_safetensors(tmp_path: Path, pickle_name: str) -> None:
    cfg, weights = make_tiny_weights("llama", seed=13)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / pickle_name).write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="[Ss]afetensors is required") as info:
        load_safetensors_dir(tmp_path)
    assert pickle_name in str(info.value)


def test_no_weights_at_all(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=14)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_safetensors_dir(tmp_path)


def test_unknown_architecture(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=15)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures") as info:
        load_safetensors_dir(tmp_path)
    message = str(info.value)
    assert "MistralForCausalLM" in message
    for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Ernie4_5_ForCausalLM", "Ernie4_5ForCausalLM"):
        assert supported in message


@pytest.mark.parametrize(
    ("arch", "dropped"),
    [("llama", "model.layers.1.mlp.up_proj.weight"), ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
     ("llama", "lm_head.weight"), ("ernie4_5", "ernie.layers.1.self_attn.qkv_proj.weight"),
     ("ernie4_5", "ernie.norm.weight")],
)
def test_missing_tensor_is_named(tmp_path: Path, arch: str, dropped: str) -> None:
    cfg, weights = make_tiny_weights(arch, seed=16)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    _rewrite_single_file(tmp_path, lambda t: t.pop(dropped))
    with pytest.raises(ValueError, match="missing tensor") as info:
        load_safetensors_dir(tmp_path)
    assert dropped in str(info.value)


def test_wrong_shape_is_reported(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=17)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)
    bad = np.zeros((64, 100), np.float32)
    _rewrite_single_file(tmp_path, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": bad}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*shape"):
        load_safetensors_dir(tmp_path)


def test_unexpected_tensor_is_not_silently_dropped(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=18)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None)

    def add(t: dict) -> None:
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # harmless, ignored

    _rewrite_single_file(tmp_path, add)
    with pytest.raises(ValueError, match="o_proj.bias") as info:
        load_safetensors_dir(tmp_path)
    assert "inv_freq" not in str(info.value)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    cfg, weights = make_tiny_weights("llama", seed=19)
    write_safetensors_dir(tmp_path, cfg, weights, tokenizer=None, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_safetensors_dir(tmp_path)


# ----------------------------------------------------------------------------------------------
# Fixture self-checks: tokenizer files
# ----------------------------------------------------------------------------------------------


def test_fixture_tokenizer_and_chat_template(tmp_path: Path) -> None:
    import jinja2
    from tokenizers import Tokenizer

    cfg, weights = make_tiny_weights("qwen2", seed=20)
    write_safetensors_dir(tmp_path, cfg, weights)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg.vocab_size
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    text = "héllo 世界, tokens!"
    assert tok.decode(tok.encode(text).ids) == text
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHATML_TEMPLATE
    prompt = jinja2.Template(tok_cfg["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt).ids[0] == 1
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


# ----------------------------------------------------------------------------------------------
# GGUF: write_gguf → load_gguf
# ----------------------------------------------------------------------------------------------


def _gguf_round_trip(tmp_path: Path, arch: str, qtype: str, seed: int):
    cfg, weights = make_tiny_weights(arch, seed=seed)
    write_safetensors_dir(tmp_path, cfg, weights)  # for tokenizer.json
    path = write_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", cfg, weights, tmp_path / "tokenizer.json", qtype=qtype)
    got_cfg, got = load_gguf(str(path))
    return cfg, weights, got_cfg, got


def _assert_same_arch(got, want) -> None:
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-6), field.name  # GGUF stores these as float32
        else:
            assert a == b, field.name


def test_write_gguf_applies_llamacpp_qk_permutation(tmp_path: Path) -> None:
    from gguf import GGUFReader

    cfg, weights = make_tiny_weights("llama", seed=21)
    write_safetensors_dir(tmp_path, cfg, weights)
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, tmp_path / "tokenizer.json")
    stored = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])
              for t in GGUFReader(str(path)).tensors}
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    head_dim = cfg.head_dim
    # Row r of head h in the file is HF row (r // 2) + (r % 2) * head_dim / 2 of that head.
    def file_rows(n_head: int) -> list[int]:
        return [h * head_dim + (r // 2) + (r % 2) * (head_dim // 2) for h in range(n_head) for r in range(head_dim)]

    rows = file_rows(cfg.num_attention_heads)
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight"], q[rows])
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    k_rows = file_rows(cfg.num_key_value_heads)
    np.testing.assert_array_equal(stored["blk.0.attn_k.weight"], k[k_rows])
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], weights["model.layers.0.self_attn.v_proj.weight"])
    assert "output.weight" in stored and "token_embd.weight" in stored


@needs_gguf_loader
@pytest.mark.parametrize("arch", ["llama", "qwen2", "ernie4_5"])
def test_gguf_f32_round_trip_is_exact(tmp_path: Path, arch: str) -> None:
    cfg, weights, got_cfg, got = _gguf_round_trip(tmp_path, arch, "F32", seed=22)
    _assert_same_arch(got_cfg, cfg)
    _assert_same_weights(got, weights)


@needs_gguf_loader
def test_gguf_f16_round_trip(tmp_path: Path) -> None:
    cfg, weights, got_cfg, got = _gguf_round_trip(tmp_path, "llama", "F16", seed=23)
    _assert_same_arch(got_cfg, cfg)
    assert sorted(got) == sorted(weights)
    for name, want in weights.items():
        np.testing.assert_allclose(got[name], want, rtol=2.0**-11, atol=2.0**-24, err_msg=name)


@needs_gguf_loader
@pytest.mark.parametrize("arch", ["llama", "qwen2", "ernie4_5"])
def test_gguf_q8_0_round_trip_within_quantization_error(tmp_path: Path, arch: str) -> None:
    cfg, weights, got_cfg, got = _gguf_round_trip(tmp_path, arch, "Q8_0", seed=24)
    _assert_same_arch(got_cfg, cfg)
    assert sorted(got) == sorted(weights)
    for name, want in weights.items():
        if want.ndim == 1:
            np.testing.assert_array_equal(got[name], want, err_msg=name)  # norms and biases stay F32
            continue
        # Q8_0: per 32-value block, scale d = amax / 127 (stored as f16), values rounded to d.
        blocks = want.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * 0.6 + 1e-7
        err = np.abs(got[name].reshape(-1, 32) - blocks)
        assert (err <= bound).all(), f"{name}: max error {err.max()}"
        assert not np.array_equal(got[name], want)  # really quantized
