"""Where an engine step's time goes, on a batch shaped like `make bench`'s 32-stream load.

    .venv/bin/python scripts/profile_step.py [--prompts 32] [--prompt-len 233] [--max-tokens 128] [--split]
        [--kv-cache-dtype auto|float32|float16|int8]

Runs `LLM.generate` on --prompts random-token prompts of --prompt-len tokens, --max-tokens greedy
tokens each (EOS ignored), and times every forward (`ModelRunner.execute`). It prints the time
spent in steps that prefill (some sequence has more than one new token; decode rows may ride
along) and in pure decode steps, with their token rates.

--split turns the fused decoder op off and times each op of the op-by-op path (linear layers by
kind, attention, norms, rotary + KV write, SiLU-mul), per phase. That path pays a Python dispatch
per op, so its total is higher than the fused op's; its shares show where the arithmetic goes.
For the instruction-level view, run the plain mode under `perf record` and `perf report`.

A/B of two builds: run it from each checkout in turn (`PYTHONPATH=<worktree>`), alternating.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fastdeploy import LLM, SamplingParams
from fastdeploy.config import KV_CACHE_DTYPES
from fastdeploy.model_executor import model_runner
from fastdeploy.model_executor.layers import linear
from fastdeploy.model_executor.models import decoder
from fastdeploy.model_executor.models.fused_forward import FUSED_ENV

# (phase, what) -> seconds, steps or tokens
Totals = collections.defaultdict[tuple[str, str], float]


def phase_of(token_chunks: list[list[int]]) -> str:
    return "prefill" if any(len(chunk) > 1 for chunk in token_chunks) else "decode"


def time_steps(totals: Totals, phase: list[str]) -> None:
    """Wraps ModelRunner.execute: per phase, its time, steps and tokens; sets phase[0]."""
    execute = model_runner.ModelRunner.execute

    @functools.wraps(execute)
    def timed(self: Any, token_chunks: list[list[int]], *args: Any) -> Any:
        phase[0] = phase_of(token_chunks)
        start = time.perf_counter()
        out = execute(self, token_chunks, *args)
        totals[(phase[0], "time")] += time.perf_counter() - start
        totals[(phase[0], "steps")] += 1
        totals[(phase[0], "tokens")] += sum(len(chunk) for chunk in token_chunks)
        return out

    model_runner.ModelRunner.execute = timed


def time_ops(model: decoder.DecoderModel, totals: Totals, phase: list[str]) -> None:
    """Wraps each op of the op-by-op path (FASTDEPLOY_FUSED_FORWARD=0) with a timer."""

    def timer(fn: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
        """Timed fn, booked under name, or for a linear layer (name None) under its kind."""
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            totals[(phase[0], name or kinds.get(id(args[0]), "other linear"))] += time.perf_counter() - start
            return out
        return timed

    kinds = {id(model.lm_head): "lm_head"}
    for layer in model.layers:
        kinds.update({id(getattr(layer, kind)): kind for kind in ("qkv", "o", "gate_up", "down")})
    decoder.rms_norm = timer(decoder.rms_norm, "rms_norm")
    decoder.silu_mul = timer(decoder.silu_mul, "silu_mul")
    decoder.attn_ops.paged_attention = timer(decoder.attn_ops.paged_attention, "attention")
    decoder.rotary_kv.native_rotary_write_kv = timer(decoder.rotary_kv.native_rotary_write_kv, "rotary_kv")
    linear.LinearWeight.__call__ = timer(linear.LinearWeight.__call__)


def report(totals: Totals, split: bool) -> None:
    for phase in ("prefill", "decode"):
        seconds, tokens, steps = (totals[(phase, key)] for key in ("time", "tokens", "steps"))
        if not steps:
            continue
        print(f"{phase:>7}: {steps:4.0f} steps, {tokens:6.0f} tokens, {seconds:6.2f} s, "
              f"{tokens / seconds:6.0f} tok/s, {seconds / steps * 1e3:7.1f} ms/step")
        if split:
            ops = [(key[1], value) for key, value in totals.items()
                   if key[0] == phase and key[1] not in ("time", "tokens", "steps")]
            for name, value in sorted(ops, key=lambda item: -item[1]):
                print(f"         {name:<13} {value:6.2f} s  {100 * value / seconds:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=233)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--split", action="store_true", help="op-by-op path, each op timed")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_CACHE_DTYPES])
    args = ap.parse_args()

    totals: Totals = collections.defaultdict(float)
    phase = ["?"]
    time_steps(totals, phase)
    if args.split:
        os.environ[FUSED_ENV] = "0"  # read when the model first runs
    llm = LLM(model="smollm2-135m-instruct", max_model_len=max(2048, args.prompt_len + args.max_tokens),
              max_num_seqs=max(64, args.prompts), kv_cache_dtype=args.kv_cache_dtype)
    if args.split:
        time_ops(llm.engine.runner.model, totals, phase)
    rng = np.random.default_rng(0)
    # Two extra prompts for the warm-up: warming up on measured ones would leave their prefill to
    # the prefix cache.
    prompts = [{"prompt_token_ids": rng.integers(100, 40000, args.prompt_len).tolist()}
               for _ in range(args.prompts + 2)]
    warmup, prompts = prompts[:2], prompts[2:]
    llm.generate(warmup, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    totals.clear()  # the warm-up above built the kernels' scratch buffers and thread pool
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    wall = time.perf_counter() - start
    print(f"{args.prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} out: {wall:.2f} s wall")
    report(totals, args.split)


if __name__ == "__main__":
    main()
