"""The default weight format: wint8 for GGUF files stored in blocks wint8 holds exactly (when the
native kernels run), fp32 for everything else, and an explicit --quantization always wins."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_fixtures import make_tiny_weights, write_gguf, write_safetensors_dir

from fastdeploy.model_executor.layers.linear import linear_backend_name
from fastdeploy.model_executor.model_runner import ModelRunner, resolve_quantization



@pytest.fixture(scope="module")
def auto_quantized() -> str:
    """What auto picks for a quantized GGUF here: without the native kernels wint8 would be slower
    than fp32, so it stays fp32."""
    return "wint8" if linear_backend_name() == "native" else "none"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    cfg, weights = make_tiny_weights("llama", seed=5)
    write_safetensors_dir(root, cfg, weights)
    files = {"safetensors": root}
    for qtype in ("F32", "F16", "Q8_0"):
        files[qtype] = write_gguf(root / f"tiny-{qtype}.gguf", cfg, weights, root / "tokenizer.json", qtype=qtype)
    return files


def test_default_model_is_served_as_wint8(default_model_path, auto_quantized):
    # SmolLM2's file: Q4_1 layers and a Q8_0 embedding.
    assert resolve_quantization(default_model_path, None) == auto_quantized


@pytest.mark.parametrize(("kind", "expected"), [("Q8_0", "auto"), ("F16", "none"), ("F32", "none"),
                                                ("safetensors", "none")])
def test_auto_follows_the_file_format(tiny_files, auto_quantized, kind, expected):
    want = auto_quantized if expected == "auto" else expected
    assert resolve_quantization(str(tiny_files[kind]), None) == want


@pytest.mark.parametrize("requested", ["none", "bf16", "wint8"])
def test_explicit_choice_wins(tiny_files, requested):
    assert resolve_quantization(str(tiny_files["Q8_0"]), requested) == requested
    assert resolve_quantization(str(tiny_files["F32"]), requested) == requested


def test_auto_runner_matches_fp32_on_the_same_weights(tiny_files, auto_quantized):
    # wint8 holds Q8_0 blocks exactly: the logits differ from fp32 only by summation order.
    path = str(tiny_files["Q8_0"])
    auto = ModelRunner(path, max_model_len=128)
    fp32 = ModelRunner(path, max_model_len=128, quantization="none")
    assert auto.quantization == auto_quantized and fp32.quantization == "none"
    prompt = [3, 17, 42, 99, 5, 250, 7, 8, 1, 64]
    logits = []
    for runner in (auto, fp32):
        runner.init_kv_cache(num_blocks=4, block_size=16)
        logits.append(np.asarray(runner.execute([prompt], [0], [[0]], [len(prompt) - 1])[0]))
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-3 * np.abs(logits[1]).max())


# The KV cache's default element type follows the attention backend.

def test_kv_cache_dtype_auto_is_float16_on_native_attention(native):
    from fastdeploy.model_executor.model_runner import resolve_kv_cache_dtype
    from fastdeploy.model_executor.ops import paged_attention as attn

    assert attn.attention_backend_name() == attn.NATIVE
    assert resolve_kv_cache_dtype(None) == resolve_kv_cache_dtype("auto") == "float16"
    assert resolve_kv_cache_dtype("float32") == "float32"


def test_kv_cache_dtype_auto_is_float32_on_the_reference(monkeypatch):
    from fastdeploy.model_executor.model_runner import resolve_kv_cache_dtype
    from fastdeploy.model_executor.ops import paged_attention as attn

    monkeypatch.setattr(attn, "attention_backend_name", lambda: attn.REFERENCE)
    assert resolve_kv_cache_dtype("auto") == "float32"
    assert resolve_kv_cache_dtype("float16") == "float16"  # asked for: the reference reads it too
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype("bfloat16")


def test_runner_allocates_and_sizes_the_cache_in_its_dtype(default_model_path):
    runner = ModelRunner(default_model_path, max_model_len=128, kv_cache_dtype="float16")
    runner.init_kv_cache(num_blocks=4, block_size=16)
    key, value = runner.kv_caches[0]
    assert str(key.dtype) == str(value.dtype) == "paddle.float16"
    assert runner.model.kv_bytes_per_block(16, "float16") * 2 == runner.model.kv_bytes_per_block(16, "float32")
