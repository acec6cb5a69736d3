"""Issue 2 acceptance 3: tiny random-weight models through every loader give the same logits,
and those logits equal an independent numpy implementation of each architecture."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
from model_fixtures import make_tiny_weights, train_bpe_tokenizer, write_gguf, write_safetensors_dir

from fastdeploy.model_executor.model_runner import ModelRunner

BLOCK = 16
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 12, 200, 11, 9, 1, 77, 31, 150]


def numpy_reference_logits(cfg, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Dense causal forward in float64 numpy, written straight from the architectures' definitions."""
    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    n, hd = len(ids), cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(t):
        if cfg.rope_interleaved:
            a, b = t[..., 0::2], t[..., 1::2]
            out = np.empty_like(t)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
            return out
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def norm(t, g):
        return t / np.sqrt((t * t).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g

    def lin(t, name, bias=False):
        y = t @ w[name + ".weight"].T.astype(np.float64)
        return y + w[name + ".bias"] if bias else y

    group = cfg.num_attention_heads // cfg.num_key_value_heads
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj", cfg.attention_bias).reshape(n, -1, hd))
        k = rope(lin(h, p + "self_attn.k_proj", cfg.attention_bias).reshape(n, -1, hd))
        v = lin(h, p + "self_attn.v_proj", cfg.attention_bias).reshape(n, -1, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", s, v).reshape(n, -1)
        x = x + lin(att, p + "self_attn.o_proj")
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g, u = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
        x = x + lin(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj")
    x = norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T.astype(np.float64)


def run_logits(path: str, ids: list[int]) -> np.ndarray:
    # fp32 KV too: the bound against the float64 reference is fp32's (the default float16 cache
    # is checked against fp32 greedy output in test_quantized_precision).
    runner = ModelRunner(path, max_model_len=256, kv_cache_dtype="float32")
    runner.init_kv_cache(num_blocks=8, block_size=BLOCK)
    table = list(range(-(-len(ids) // BLOCK)))
    return runner.execute([ids], [0], [table], list(range(len(ids))))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "ernie4_5"])
def test_gguf_and_safetensors_give_reference_logits(arch, tmp_path):
    cfg, weights = make_tiny_weights(arch, seed=3)
    st_dir = write_safetensors_dir(tmp_path / "st", cfg, weights)
    tok = train_bpe_tokenizer(tmp_path / "tokenizer.json", cfg.vocab_size)
    gguf_path = write_gguf(tmp_path / "m.gguf", cfg, weights, tok, qtype="F32")
    ref = numpy_reference_logits(cfg, weights, PROMPT)
    from_st = run_logits(str(st_dir), PROMPT)
    from_gguf = run_logits(str(gguf_path), PROMPT)
    assert np.abs(from_st - from_gguf).max() < 1e-5
    assert np.abs(from_st - ref).max() / np.abs(ref).max() < 1e-4


def test_chunked_and_decode_paths_agree_with_full_prefill(tmp_path):
    cfg, weights = make_tiny_weights("qwen2", seed=4)
    path = str(write_safetensors_dir(tmp_path / "st", cfg, weights))
    runner = ModelRunner(path, max_model_len=256)
    runner.init_kv_cache(num_blocks=8, block_size=BLOCK)
    table = [5, 2, 7]  # deliberately non-contiguous blocks
    full = runner.execute([PROMPT], [0], [table], list(range(len(PROMPT))))
    runner.init_kv_cache(num_blocks=8, block_size=BLOCK)
    part1 = runner.execute([PROMPT[:7]], [0], [table], list(range(7)))
    part2 = runner.execute([PROMPT[7:18]], [7], [table], list(range(11)))
    last = runner.execute([PROMPT[18:]], [18], [table], [0])
    stitched = np.concatenate([part1, part2, last])
    assert np.abs(full - stitched).max() < 1e-4


def test_sentencepiece_model_directory_runs_end_to_end(tmp_path):
    """A Llama directory with tokenizer.model (sentencepiece) loads and generates through the LLM API."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=384,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    cfg, weights = make_tiny_weights("llama", seed=5, vocab_size=384)
    d = write_safetensors_dir(tmp_path / "m", cfg, weights, tokenizer=None)
    (d / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    from fastdeploy import LLM, SamplingParams

    llm = LLM(model=str(d), max_model_len=128, num_gpu_blocks_override=16)
    out = llm.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs.token_ids) == 5
    assert out[0].prompt_token_ids[0] == llm.tokenizer.bos_token_id
    assert isinstance(out[0].outputs.text, str)
    # JSON mode reads sentencepiece pieces ("\u2581" for spaces, "<0xNN>" byte fallback) as bytes too.
    from fastdeploy.engine.sampling_params import GuidedDecodingParams

    json_mode = SamplingParams(temperature=0, max_tokens=40, response_format="json_object")
    out = llm.generate("the quick brown fox", json_mode, use_tqdm=False)[0].outputs
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict), out.text
    else:  # a valid prefix of an object: a fresh matcher takes all of it
        assert llm.engine.sampler.guided_vocab.matcher(GuidedDecodingParams(json_object=True)).consume_tokens(
            list(out.token_ids)), out.text


def test_gguf_index_is_cached_per_file_version(tmp_path, monkeypatch):
    """The engine reads a GGUF through its cached index: the second read of a file parses nothing
    and yields the reader's tensors and metadata; a corrupt entry or a rewritten file is parsed again."""
    import os
    import time

    from gguf import GGUFReader

    from fastdeploy import gguf_file
    from fastdeploy.model_executor.loader.gguf_loader import load_gguf

    monkeypatch.setenv("FASTDEPLOY_CACHE", str(tmp_path / "cache"))
    cfg, weights = make_tiny_weights("llama", seed=5)
    tok = train_bpe_tokenizer(tmp_path / "tokenizer.json", cfg.vocab_size)
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, tok, qtype="Q8_0")
    builds = []
    real_build = gguf_file._build_index
    monkeypatch.setattr(gguf_file, "_build_index", lambda p: builds.append(p) or real_build(p))

    def fresh_load():
        gguf_file._index.cache_clear()  # as a new process would
        gguf_file._parse.cache_clear()
        return load_gguf(str(path))

    first_cfg, first = fresh_load()
    second_cfg, second = fresh_load()
    assert len(builds) == 1 and first_cfg == second_cfg and first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    reader = GGUFReader(str(path), "r")
    index = gguf_file.open_gguf_index(str(path))
    assert [(t.name, int(t.tensor_type), [int(d) for d in t.shape]) for t in reader.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in index.tensors]
    assert all(np.array_equal(a.data, b.data) and a.data.dtype == b.data.dtype
               for a, b in zip(reader.tensors, index.tensors))
    assert index.metadata["llama.block_count"] == cfg.num_hidden_layers
    assert not any(k.endswith(("tokens", "merges")) for k in index.metadata)

    entry = gguf_file._INDEX_CACHE.entry(str(path))
    entry.write_bytes(b"\x93not an index")
    assert np.array_equal(fresh_load()[1]["lm_head.weight"], first["lm_head.weight"]) and len(builds) == 2

    _, other_weights = make_tiny_weights("llama", seed=6)
    write_gguf(path, cfg, other_weights, tok, qtype="Q8_0")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version even within mtime's resolution
    _, rewritten = fresh_load()
    assert len(builds) == 3 and not np.array_equal(rewritten["lm_head.weight"], first["lm_head.weight"])


def test_q4_1_matrices_pack_from_their_grids(tmp_path):
    """wint8 layers take a GGUF's Q4_1 matrices as codes, steps and offsets (Grid4): the grids
    dequantize to exactly the loader's float32 weights, and pack to the same panels as those."""
    from fastdeploy.model_executor.layers.grid4 import Grid4
    from fastdeploy.model_executor.layers.linear import LinearWeight
    from fastdeploy.model_executor.loader.gguf_loader import load_gguf

    cfg, weights = make_tiny_weights("llama", seed=7)
    tok = train_bpe_tokenizer(tmp_path / "tokenizer.json", cfg.vocab_size)
    path = str(write_gguf(tmp_path / "m.gguf", cfg, weights, tok, qtype="Q4_1"))
    _, grids = load_gguf(path, keep_grids=True)
    _, floats = load_gguf(path)
    assert grids.keys() == floats.keys()
    kept = [name for name, w in grids.items() if isinstance(w, Grid4)]
    assert "model.layers.0.self_attn.q_proj.weight" in kept and "model.layers.1.mlp.down_proj.weight" in kept
    for name in grids:
        got = grids[name].dequantize() if name in kept else grids[name]
        assert np.array_equal(got, floats[name]), name
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        from_grid = LinearWeight(grids[name], None, "wint8")
        from_floats = LinearWeight(floats[name], None, "wint8")
        assert from_grid.four_bit == from_floats.four_bit
        assert np.array_equal(from_grid._packed.numpy(), from_floats._packed.numpy()), name
    # The whole model on those layers (the runner keeps grids for wint8) against float64 numpy
    # on the dequantized weights; the slack is the 8-bit activations'.
    ref = numpy_reference_logits(cfg, floats, PROMPT)
    assert np.abs(run_logits(path, PROMPT) - ref).max() / np.abs(ref).max() < 0.05
