"""SamplingParams(prompt_logprobs=k): every prompt token scored by the model, offline.

The reference for a prompt token's logprob is the next-token distribution of its prefix, asked
for through the public API (a one-token request with logprobs=20). The serving side (echo +
logprobs on /v1/completions) is in tests/serving/test_openai_api.py."""
from __future__ import annotations

import math

import pytest

from fastdeploy import LLM, SamplingParams

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is"
TOLERANCE = 2e-3  # different batch shapes reorder float32 sums


def scored(llm: LLM, prompt, k: int = 20, **params):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k, **params),
                       use_tqdm=False)[0]
    return out


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    common = set(got) & set(want)
    assert len(common) >= min(len(got), len(want)) - 2, (got, want)  # ties at the k-th place may differ
    for token in common:
        assert math.isclose(got[token], want[token], abs_tol=TOLERANCE), (token, got[token], want[token])


def test_each_prompt_token_is_scored_as_its_prefix_predicts_it(llm):
    ids = llm.tokenizer.encode(PROMPT)
    out = scored(llm, ids)
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for j, entry in enumerate(lps[1:], start=1):
        assert ids[j] in entry and entry[ids[j]] <= 0.0
        assert len(entry) in (20, 21)  # the top 20, plus the prompt token when it is not among them
    for j in (1, len(ids) // 2, len(ids) - 1):
        ref = llm.generate([ids[:j]], SamplingParams(temperature=0, max_tokens=1, logprobs=20),
                           use_tqdm=False)[0].outputs.logprobs[0]
        assert_close(lps[j], ref)
    # The generated tokens are those of a plain request.
    plain = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert out.outputs.token_ids == plain.outputs.token_ids


def test_a_cached_prefix_is_computed_again(llm):
    ids = llm.tokenizer.encode(PROMPT * 8)  # more than two 64-token blocks
    first = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    again = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and first.outputs.token_ids == again.outputs.token_ids
    out = scored(llm, ids, k=0)
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(ids)
    assert all(len(entry) == 1 for entry in out.prompt_logprobs[1:])  # k = 0: the prompt token alone


def test_chunked_prefill_scores_the_same(default_model_path, llm):
    ids = llm.tokenizer.encode(PROMPT * 4)
    whole = scored(llm, ids, k=5).prompt_logprobs
    small = LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=64, max_num_seqs=4,
                max_num_batched_tokens=48, quantization="none", kv_cache_dtype="float32")
    outs = small.generate([ids, ids[:50]], [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=5),
                                            SamplingParams(temperature=0, max_tokens=2)], use_tqdm=False)
    chunked = outs[0].prompt_logprobs
    assert len(chunked) == len(whole) == len(ids) and chunked[0] is None
    for got, want in zip(chunked[1:], whole[1:]):
        assert_close(got, want)
    assert outs[1].prompt_logprobs is None
    stats = small.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_prompt_logprobs_validation(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


def test_preemption_neither_loses_nor_repeats_prompt_scores(default_model_path, llm):
    ids = llm.tokenizer.encode(PROMPT * 8)[:150]
    whole = scored(llm, ids, k=3).prompt_logprobs
    # 8 blocks of 64 tokens for four sequences that each grow to 350: some must be preempted.
    tight = LLM(model=default_model_path, max_model_len=1024, num_gpu_blocks_override=8, max_num_seqs=4,
                quantization="none", kv_cache_dtype="float32")
    params = [SamplingParams(temperature=0, max_tokens=200, ignore_eos=True) for _ in range(3)]
    params.append(SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, prompt_logprobs=3))
    outs = tight.generate([ids[:150 - i] for i in range(3)] + [ids], params, use_tqdm=False)
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_blocks
    assert [len(o.outputs.token_ids) for o in outs] == [200] * 4
    got = outs[3].prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    for entry, want in zip(got[1:], whole[1:]):
        assert_close(entry, want)
