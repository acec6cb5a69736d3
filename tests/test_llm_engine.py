"""Issue 3 acceptance 1: the engine's fp32 greedy output equals the golden output alone, batched,
with chunked prefill, from the prefix cache, and under preemption."""
from __future__ import annotations

import pytest

from fastdeploy import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=48)


def prompts_of(golden) -> list[list[int]]:
    return [c["prompt_ids"] for c in golden["cases"]]


def expected_of(golden) -> list[list[int]]:
    return [c["output_ids"] for c in golden["cases"]]


def sixteen(golden) -> tuple[list[list[int]], list[list[int]]]:
    """16 mixed-length prompts (the golden cases, cycled) with their expected outputs."""
    p, e = prompts_of(golden), expected_of(golden)
    idx = [i % len(p) for i in range(16)]
    return [p[i] for i in idx], [e[i] for i in idx]


def test_alone_matches_golden(llm, golden):
    for prompt, expected in zip(prompts_of(golden), expected_of(golden)):
        out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert out.outputs.token_ids == expected
        assert out.finished


def test_batch_of_16_matches_golden(llm, golden):
    prompts, expected = sixteen(golden)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs.token_ids for o in outs] == expected


def test_prefix_cache_second_run_matches(llm, golden):
    prompts, expected = prompts_of(golden), expected_of(golden)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs.token_ids for o in again] == expected
    long_ones = [o for o in again if len(o.prompt_token_ids) > 64]
    assert long_ones and all(o.num_cached_tokens > 0 for o in long_ones)


@pytest.fixture(scope="module")
def chunked_llm(default_model_path):
    return LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=128,
               max_num_batched_tokens=64, enable_prefix_caching=False, quantization="none",
               kv_cache_dtype="float32")


def test_chunked_prefill_of_64_matches_golden(chunked_llm, golden):
    prompts, expected = sixteen(golden)
    outs = chunked_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs.token_ids for o in outs] == expected
    assert all(o.num_cached_tokens == 0 for o in outs)


def test_preemption_under_a_tiny_pool_matches_golden(default_model_path, golden):
    # 16 prompts need far more than 80 blocks of 16 tokens at once (the longest alone needs 67): preemption.
    small = LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=80, block_size=16,
                max_num_seqs=16, quantization="none", kv_cache_dtype="float32")
    prompts, expected = sixteen(golden)
    outs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    assert [o.outputs.token_ids for o in outs] == expected
    stats = small.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_blocks_return_to_the_pool(llm, golden):
    llm.generate(prompts_of(golden)[:4], GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks  # cached-but-unreferenced blocks count as free
    assert stats.kv_usage == 0.0
