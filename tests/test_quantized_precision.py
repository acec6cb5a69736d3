"""Issue 6: precision modes beyond fp32 (weights in bf16 or wint8, a float16 KV cache, and the
default wint8 + float16 pairing) keep greedy output equal to fp32 wherever the top-2 logit gap
exceeds 0.25 (the golden file records the fp32 reference's gap at every step).

The opt-in 8-bit modes (an int8 KV cache, 8-bit activations with FASTDEPLOY_ACT8=1) trade that
for speed, as llama.cpp's q8_0 cache and Q8_1 activations do: teacher-forced on the golden
prompts they moved top-2 margins by up to 0.67 and 0.78 (against 0.029 for the default), so they
are held to the same rule at a gap of 1.0.
"""
from __future__ import annotations

import pytest

from fastdeploy import LLM, SamplingParams
from fastdeploy.model_executor.layers import linear

GAP = 0.25
GAP_8BIT = 1.0


def compared_tokens(llm: LLM, golden: dict, gap: float, label: str) -> int:
    """Greedy tokens of every golden prompt equal to fp32's up to the first divergence, which is
    only allowed where fp32 itself was within ``gap``; returns how many were compared."""
    cases = golden["cases"]
    outs = llm.generate([c["prompt_ids"] for c in cases], SamplingParams(temperature=0.0, max_tokens=48),
                        use_tqdm=False)
    compared = 0
    for case, out in zip(cases, outs):
        ours, ref, gaps = out.outputs.token_ids, case["output_ids"], case["step_gaps"]
        for i, (a, b) in enumerate(zip(ours, ref)):
            if a != b:
                # After a divergence the contexts differ, so the rest of the case cannot be compared.
                assert gaps[i] <= gap, (label, case["name"], i, gaps[i])
                break
            compared += 1
    return compared


@pytest.mark.parametrize("quant, kv_cache_dtype", [("bf16", "float32"), ("wint8", "float32"), ("none", "float16"),
                                                    ("wint8", "float16")])
def test_greedy_matches_fp32_where_the_gap_is_clear(quant, kv_cache_dtype, default_model_path, golden):
    llm = LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=256, quantization=quant,
              kv_cache_dtype=kv_cache_dtype)
    compared = compared_tokens(llm, golden, GAP, f"{quant}+{kv_cache_dtype}")
    assert compared > len(golden["cases"]) * 20  # most of the golden tokens were actually compared


@pytest.mark.parametrize("quant, kv_cache_dtype, act8", [("none", "int8", False), ("wint8", "int8", False),
                                                          ("wint8", "float16", True)])
def test_8bit_modes_match_fp32_where_the_gap_is_wide(quant, kv_cache_dtype, act8, default_model_path, golden,
                                                     monkeypatch):
    if act8:
        if linear.act8_min_rows() == 0:
            pytest.skip("no 8-bit-activation kernel in this build")
        monkeypatch.setenv(linear.ACT8_ENV, "1")  # read when the layers are packed
    llm = LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=256, quantization=quant,
              kv_cache_dtype=kv_cache_dtype)
    compared = compared_tokens(llm, golden, GAP_8BIT, f"{quant}+{kv_cache_dtype}, act8={act8}")
    assert compared > len(golden["cases"]) * 10
