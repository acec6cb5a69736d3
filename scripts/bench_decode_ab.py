"""A/B of single-sequence decode speed, alternating two engine settings in fresh processes.

    .venv/bin/python scripts/bench_decode_ab.py kv   [--context 4000] [--rounds 2]
    .venv/bin/python scripts/bench_decode_ab.py pool [--rounds 5]
    .venv/bin/python scripts/bench_decode_ab.py act8 --context 100 [--rounds 5]

`kv`: one sequence of --context random prompt tokens, then 128 greedy tokens, with the KV cache in
float32 and in float16 (--kv-cache-dtype). The prompt is run once first, so both timed runs hit the
prefix cache; decode ms/token = (time of 129 tokens - time of 1 token) / 128.

`pool`: a short chat prompt and 200 greedy tokens, three times per process, with the native
kernels' own thread pool and with FASTDEPLOY_THREAD_POOL=openmp, each while a helper-like process
runs beside it: it computes for 0.4 ms every 8 ms, as the tokenizer, detokenizer and api processes
of a server wake per token. This is the situation the pool was written for (native/thread_pool.h).

`act8`: as `kv` with the default KV cache, FASTDEPLOY_ACT8=0 (wint8 layers as 8-bit panels) against
the default (4-bit panels where the weights allow, as in the default GGUF: half the bytes a decode
step reads; a single row multiplies 16-bit activations either way).

Settings alternate within each round, so drift of the machine hits both sides alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NOISE = """
import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.0004:
        pass
    time.sleep(0.008)
"""


def kv_child(kv: str, context: int) -> float:
    import numpy as np

    from fastdeploy import LLM, SamplingParams

    llm = LLM(model="smollm2-135m-instruct", max_model_len=max(2048, context + 256), kv_cache_dtype=kv)
    ids = np.random.default_rng(0).integers(1000, 40000, size=context).tolist()

    def run(n: int) -> float:
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - start

    run(1)  # fills the prefix cache
    prefill = min(run(1) for _ in range(2))
    return (run(129) - prefill) / 128 * 1000


def pool_child() -> float:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_prompts import chat_prompts

    from fastdeploy import LLM, SamplingParams

    llm = LLM(model="smollm2-135m-instruct", max_model_len=2048, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    llm.chat(chat_prompts(1), params, use_tqdm=False)
    noise = subprocess.Popen([sys.executable, "-c", NOISE])
    try:
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            out = llm.chat(chat_prompts(1), params, use_tqdm=False)
            samples.append((time.perf_counter() - start) / len(out[0].outputs.token_ids) * 1000)
    finally:
        noise.kill()
    return statistics.median(samples)


def measure(mode: str, setting: str, context: int) -> float:
    env = dict(os.environ)
    argv = [sys.executable, __file__, "--child", mode, "--setting", setting, "--context", str(context)]
    if mode == "pool" and setting == "openmp":
        env["FASTDEPLOY_THREAD_POOL"] = "openmp"
    if mode == "act8":
        env["FASTDEPLOY_ACT8"] = "" if setting == "default" else setting
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["kv", "pool", "act8"])
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.mode == "pool":
            print(pool_child())
        else:
            print(kv_child(args.setting if args.mode == "kv" else "auto", args.context))
        return
    settings = {"kv": ["float32", "float16"], "pool": ["openmp", "pool"], "act8": ["0", "default"]}[args.mode]
    results: dict[str, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            results[setting].append(measure(args.mode, setting, args.context))
            print(f"{setting}: {results[setting][-1]:.1f} ms/token", flush=True)
    a, b = (statistics.median(results[s]) for s in settings)
    what = "helper-like load beside the engine" if args.mode == "pool" else f"context {args.context}"
    print(f"\n{what}: median ms/token {settings[0]} {a:.1f}, {settings[1]} {b:.1f}; "
          f"{settings[1]} / {settings[0]} = {b / a:.2f}x")


if __name__ == "__main__":
    main()
