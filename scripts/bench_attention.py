"""Micro-benchmark of paged attention: native C++ op vs the plain-Paddle reference.

Shapes follow SmolLM2-135M (9 query heads, 3 kv heads, head_dim 64), block_size 16, shuffled
block tables. Cases: decode (32 sequences x 512 or x 2048 context, and 1 x 2048, one query each)
and a 512-token prefill. Prints milliseconds per call (median of --iters after --warmup calls) of
the reference, the native op's default (vector) kernel, its portable scalar kernel, and the vector
kernel over the same K/V in float16 and in int8 caches, in one run.

    .venv/bin/python scripts/bench_attention.py [--iters 20] [--threads N]

The native op uses --threads threads (default: native_num_threads(), i.e. FASTDEPLOY_NUM_THREADS,
OMP_NUM_THREADS or the CPUs available). The reference runs on Paddle's own CPU kernels, which Paddle
runs single-threaded unless configured otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import paddle

from fastdeploy.model_executor.ops import paged_attention as attn
from fastdeploy.model_executor.ops.native_build import native_num_threads

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


def make_case(context_lens: list[int], q_lens: list[int], seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 8
    order = rng.permutation(num_blocks)
    tables = np.zeros((len(context_lens), max(blocks_per_seq)), dtype=np.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used:used + n]
        used += n
    shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    key_cache = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))
    value_cache = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))
    query = paddle.to_tensor(rng.standard_normal((sum(q_lens), NUM_HEADS, HEAD_DIM), dtype=np.float32))
    starts = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=starts[1:])
    return (query, key_cache, value_cache, paddle.to_tensor(tables),
            paddle.to_tensor(np.asarray(context_lens, dtype=np.int32)), paddle.to_tensor(starts),
            1.0 / HEAD_DIM ** 0.5)


def time_ms(fn: Callable[[], paddle.Tensor], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn().numpy()  # force completion on any device
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="native op threads; 0 = default")
    args = parser.parse_args()
    threads = args.threads or native_num_threads()

    cases = {
        "decode 32 seqs x 512 ctx": make_case([512] * 32, [1] * 32),
        # 100 MB of fp32 K/V: past the L3, as a whole model's caches are.
        "decode 32 seqs x 2048 ctx": make_case([2048] * 32, [1] * 32),
        "decode 1 seq x 2048 ctx": make_case([2048], [1]),
        "prefill 512 tokens": make_case([512], [512]),
    }
    try:
        attn.native_ops()
        have_native = True
    except attn.NativeBuildError as exc:
        print(f"native ops unavailable: {str(exc).splitlines()[0]}")
        have_native = False
    print(f"backend default: {attn.attention_backend_name()}, native threads: {threads}")

    with paddle.no_grad():
        for label, case in cases.items():
            ref_ms = time_ms(lambda: attn.reference_paged_attention(*case), args.warmup, args.iters)
            line = f"{label:<28} reference {ref_ms:8.3f} ms"
            if have_native:
                nat_ms = time_ms(lambda: attn.native_paged_attention(*case, num_threads=threads), args.warmup,
                                 args.iters)
                scalar_ms = time_ms(lambda: attn.native_paged_attention(*case, scalar=True, num_threads=threads),
                                    args.warmup, args.iters)
                half = (case[0], case[1].astype("float16"), case[2].astype("float16"), *case[3:])
                half_ms = time_ms(lambda: attn.native_paged_attention(*half, num_threads=threads), args.warmup,
                                  args.iters)
                int8 = (case[0], attn.cache_rows(case[1], paddle.int8), attn.cache_rows(case[2], paddle.int8),
                        *case[3:])
                int8_ms = time_ms(lambda: attn.native_paged_attention(*int8, num_threads=threads), args.warmup,
                                  args.iters)
                err = float((attn.native_paged_attention(*case) - attn.reference_paged_attention(*case)).abs().max())
                line += (f"   native {nat_ms:8.3f} ms ({ref_ms / nat_ms:5.1f}x)   native scalar {scalar_ms:8.3f} ms"
                         f"   vector/scalar {nat_ms / scalar_ms:4.2f}x   float16 cache {half_ms:8.3f} ms"
                         f" ({half_ms / nat_ms:4.2f}x fp32)   int8 cache {int8_ms:8.3f} ms"
                         f" ({int8_ms / half_ms:4.2f}x float16)   max|diff| {err:.1e}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
