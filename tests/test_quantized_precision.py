"""Issue 6: precision modes beyond fp32 (weights in bf16 or wint8, a float16 or int8 KV cache, and
the default wint8 + float16 pairing) keep greedy output equal to fp32 wherever the top-2 logit gap
exceeds 0.25 (the golden file records the fp32 reference's gap at every step)."""
from __future__ import annotations

import pytest

from fastdeploy import LLM, SamplingParams

GAP = 0.25


@pytest.mark.parametrize("quant, kv_cache_dtype", [("bf16", "float32"), ("wint8", "float32"), ("none", "float16"),
                                                    ("wint8", "float16"), ("none", "int8"), ("wint8", "int8")])
def test_greedy_matches_fp32_where_the_gap_is_clear(quant, kv_cache_dtype, default_model_path, golden):
    llm = LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=256, quantization=quant,
              kv_cache_dtype=kv_cache_dtype)
    cases = golden["cases"]
    outs = llm.generate([c["prompt_ids"] for c in cases], SamplingParams(temperature=0.0, max_tokens=48),
                        use_tqdm=False)
    compared = 0
    for case, out in zip(cases, outs):
        ours, ref, gaps = out.outputs.token_ids, case["output_ids"], case["step_gaps"]
        for i, (a, b) in enumerate(zip(ours, ref)):
            if a != b:
                # A divergence is only allowed where fp32 itself was nearly tied; after it the
                # contexts differ, so the rest of the case cannot be compared.
                assert gaps[i] <= GAP, (quant, case["name"], i, gaps[i])
                break
            compared += 1
    assert compared > len(cases) * 20  # most of the golden tokens were actually compared
