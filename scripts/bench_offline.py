"""Offline throughput: fastdeploy LLM.generate vs HF transformers fp32, same prompts, same run.

    .venv/bin/python scripts/bench_offline.py [--num-prompts 64] [--max-tokens 128] [--quantization wint8]
        [--kv-cache-dtype float32]

Both generate exactly --max-tokens tokens per prompt (EOS ignored) greedily. The HF peer runs in
.venv-ref (torch CPU; `make golden` creates it); without it only our figure is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_prompts import chat_prompts  # noqa: E402

from fastdeploy.config import KV_CACHE_DTYPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_ours(num_prompts: int, max_tokens: int, quantization: str | None,
             kv_cache_dtype: str = "auto") -> dict[str, float]:
    from fastdeploy import LLM, SamplingParams

    llm = LLM(model="smollm2-135m-instruct", max_model_len=2048, max_num_seqs=num_prompts,
              quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat(chat_prompts(2), params, use_tqdm=False)  # warm-up outside the timed region
    start = time.perf_counter()
    outs = llm.chat(chat_prompts(num_prompts), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs.token_ids) for o in outs)
    return {"output_tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


def run_hf(python: Path, num_prompts: int, max_tokens: int) -> dict[str, float] | None:
    if not python.exists():
        print(f"HF peer skipped: {python} not found (make golden creates it)", file=sys.stderr)
        return None
    from fastdeploy.model_store import default_model_path

    cmd = [str(python), str(ROOT / "scripts" / "hf_offline_peer.py"), "--gguf", default_model_path(),
           "--num-prompts", str(num_prompts), "--max-tokens", str(max_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--quantization", default=None, choices=["none", "bf16", "wint8"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_CACHE_DTYPES])
    ap.add_argument("--hf-python", type=Path, default=ROOT / ".venv-ref" / "bin" / "python")
    args = ap.parse_args()
    ours = run_ours(args.num_prompts, args.max_tokens, args.quantization, args.kv_cache_dtype)
    hf = run_hf(args.hf_python, args.num_prompts, args.max_tokens)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"fastdeploy LLM.generate (weights {args.quantization or 'auto'}, KV {args.kv_cache_dtype}): "
          f"{ours['output_tokens']} tokens in {ours['seconds']:.1f} s = {ours['tokens_per_s']:.1f} tok/s")
    if hf:
        print(f"HF transformers fp32:    {hf['output_tokens']} tokens in {hf['seconds']:.1f} s = "
              f"{hf['tokens_per_s']:.1f} tok/s")
        print(f"ratio fastdeploy / HF: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
