"""Issue 2 acceptance: our tokenizer and fp32 Paddle forward match HF transformers on the default model.

The reference (tests/data/golden_smollm2.json) was produced by scripts/make_golden.py with
transformers + torch on the CPU from the same GGUF file.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastdeploy.input.tokenizer import load_tokenizer
from fastdeploy.model_executor.model_runner import ModelRunner

BLOCK = 16


@pytest.fixture(scope="module")
def runner(default_model_path):
    r = ModelRunner(default_model_path, max_model_len=2048, quantization="none", kv_cache_dtype="float32")
    r.init_kv_cache(num_blocks=2048 // BLOCK, block_size=BLOCK)
    return r


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return load_tokenizer(default_model_path)


def greedy(runner: ModelRunner, prompt: list[int], new_tokens: int, eos: set[int]) -> tuple[list[int], np.ndarray]:
    """Plain greedy loop straight on the model runner (no scheduler, no sampler)."""
    table = list(range(-(-(len(prompt) + new_tokens) // BLOCK)))
    logits = runner.execute([prompt], [0], [table], [len(prompt) - 1])
    first = logits[0].copy()
    out: list[int] = []
    pos = len(prompt)
    while True:
        token = int(np.argmax(logits[0]))
        out.append(token)
        if token in eos or len(out) == new_tokens:
            return out, first
        logits = runner.execute([[token]], [pos], [table], [0])
        pos += 1


def test_prompt_ids_match_reference(golden, tokenizer):
    for case in golden["cases"]:
        text = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True)
        assert text == case["prompt"], case["name"]
        assert tokenizer.encode(text) == case["prompt_ids"], case["name"]


def test_first_step_logits_match_reference(golden, runner):
    for case in golden["cases"]:
        table = list(range(-(-len(case["prompt_ids"]) // BLOCK)))
        logits = runner.execute([case["prompt_ids"]], [0], [table], [len(case["prompt_ids"]) - 1])[0]
        top = case["first_logits_top"]
        ids = [t for t, _ in top]
        ref = np.asarray([v for _, v in top], dtype=np.float64)
        ours = logits[ids].astype(np.float64)
        rel = np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0)
        assert rel.max() < 1e-3, (case["name"], rel.max())
        assert [int(i) for i in np.argsort(-logits, kind="stable")[:5]] == ids[:5], case["name"]


def test_greedy_ids_match_reference(golden, runner):
    eos = {2}
    for case in golden["cases"]:
        out, _ = greedy(runner, case["prompt_ids"], golden["new_tokens"], eos)
        assert out == case["output_ids"], case["name"]
