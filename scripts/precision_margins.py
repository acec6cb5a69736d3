"""How far each precision mode moves greedy decisions from fp32, teacher-forced on the golden prompts.

    .venv/bin/python scripts/precision_margins.py [wint8:float16 none:int8 ...]   # quantization:kv_cache_dtype

The issue's rule for precision modes: greedy output equal to fp32 wherever fp32's top-2 logit gap
exceeds 0.25. A test run only sees the steps before each prompt's first divergence; this feeds
every prompt of tests/data/golden_smollm2.json with its golden continuation in one prefill and
compares the logits of every step with our fp32 forward. Per mode it prints the median and the
largest change of any logit (max over the vocabulary, median and max over steps) and the largest
margin shift: over the steps whose golden gap exceeds 0.25, how much of fp32's lead of the top
token over the runner-up the mode lost. A mode keeps the rule while that stays below 0.25 with room
to spare; the steps closest to flipping are listed. Environment switches (FASTDEPLOY_ACT8=1, ...)
apply as in the server.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fastdeploy.model_executor.model_runner import ModelRunner
from fastdeploy.model_store import default_model_path

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden_smollm2.json"
BLOCK = 16
GAP = 0.25


def step_logits(quant: str, kv_cache_dtype: str, cases: list[dict]) -> list[np.ndarray]:
    """Per case, [steps, vocab] logits at every golden output step (teacher-forced)."""
    runner = ModelRunner(default_model_path(), max_model_len=2048, quantization=quant,
                         kv_cache_dtype=kv_cache_dtype)
    runner.init_kv_cache(num_blocks=2048 // BLOCK, block_size=BLOCK)
    out = []
    for case in cases:
        seq = case["prompt_ids"] + case["output_ids"][:-1]
        table = list(range(-(-len(seq) // BLOCK)))
        rows = list(range(len(case["prompt_ids"]) - 1, len(seq)))
        out.append(runner.execute([seq], [0], [table], rows))
    return out


def report(label: str, got: list[np.ndarray], ref: list[np.ndarray], cases: list[dict]) -> None:
    changes, shifts = [], []
    for case, ours, fp32 in zip(cases, got, ref):
        for i, gap in enumerate(case["step_gaps"][: len(fp32)]):
            changes.append(float(np.abs(ours[i] - fp32[i]).max()))
            if gap > GAP:
                top = int(np.argmax(fp32[i]))
                rest = ours[i].copy()
                rest[top] = -np.inf
                margin = float(ours[i][top] - rest.max())
                shifts.append((gap - margin, margin, case["name"], i, gap))
    shifts.sort(reverse=True)
    closest = ", ".join(f"{name}@{i} gap {gap:.3f} -> {margin:+.3f}" for _, margin, name, i, gap in
                        sorted(shifts, key=lambda s: s[1])[:3])
    print(f"{label:<16} logit change p50 {np.median(changes):.3f} max {max(changes):.3f}   "
          f"largest margin shift {shifts[0][0]:.3f}   closest: {closest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*", default=["wint8:float32", "wint8:float16", "bf16:float32", "none:int8"],
                    help="quantization:kv_cache_dtype pairs")
    args = ap.parse_args()
    cases = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]
    ref = step_logits("none", "float32", cases)
    for mode in args.modes:
        quant, _, kv = mode.partition(":")
        report(mode, step_logits(quant, kv or "float32", cases), ref, cases)


if __name__ == "__main__":
    main()
