"""Micro-benchmark of the linear layers: native fd_linear (fp32 / bf16 / wint8) vs paddle.matmul fp32.

Shapes are SmolLM2-135M's (fused qkv 576->960, o 576->576, fused gate_up 576->3072, down
1536->576, lm_head 576->49152), at M = 1, 8, 32, 64, 256, 1024 rows. For each case it prints
milliseconds per call (median), GFLOP/s (2*M*K*N / time) and GB/s of weight data read (the packed
bytes of the mode; activations are small next to them at small M). A last table sums one decode
step of the whole model (30 layers + lm_head) per mode.

    .venv/bin/python scripts/bench_linear.py [--rows 1,8,32] [--shapes qkv,down] [--min-time 0.2]
    .venv/bin/python scripts/bench_linear.py --accuracy   # error of each mode vs fp32 on the real model

--accuracy loads the default GGUF model (Q4_1, dequantized to fp32) and reports, per mode and
int8 group size, the max abs / max relative error of every layer's output against fp32 on random
activations, plus the int8 weight error relative to a Q4 step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import paddle

from fastdeploy.model_executor.layers import linear as L

SHAPES: dict[str, tuple[int, int]] = {  # name -> (K in, N out)
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}
PER_STEP = {"qkv": 30, "o": 30, "gate_up": 30, "down": 30, "lm_head": 1}
MODES = ("none", "bf16", "wint8")


def time_call(fn: Callable[[], paddle.Tensor], min_time: float) -> float:
    """Median seconds per call over batches that each last about min_time / 5."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(min_time / 5 / once))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def bench(rows: list[int], shapes: list[str], min_time: float) -> None:
    rng = np.random.default_rng(0)
    print(f"backend={L.linear_backend_name()} threads={L.native_num_threads()} "
          f"bf16_dot_min_rows={L.DEFAULT_BF16_DOT_MIN_ROWS} int8 group={L.DEFAULT_GROUP_SIZE}")
    header = f"{'shape':>8} {'M':>5} | {'paddle fp32':>22} | " + " | ".join(f"{m:>28}" for m in MODES)
    print(header)
    print(f"{'':>8} {'':>5} | {'ms':>7} {'GF/s':>6} {'GB/s':>7} | "
          + " | ".join(f"{'ms':>7} {'GF/s':>6} {'GB/s':>5} {'x':>5}" for _ in MODES))
    step_ms: dict[tuple[str, int], float] = {}
    for name in shapes:
        k, n = SHAPES[name]
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.05)
        w_ref = paddle.to_tensor(np.ascontiguousarray(w.T))
        layers = {mode: L.LinearWeight(w, None, mode) for mode in MODES}
        for m in rows:
            x = paddle.to_tensor(rng.standard_normal((m, k), dtype=np.float32))
            flop = 2.0 * m * n * k
            base = time_call(lambda: paddle.matmul(x, w_ref), min_time)
            step_ms[("paddle", m)] = step_ms.get(("paddle", m), 0.0) + base * 1e3 * PER_STEP[name]
            cells = [f"{base * 1e3:7.3f} {flop / base / 1e9:6.1f} {k * n * 4 / base / 1e9:7.1f}"]
            for mode, layer in layers.items():
                t = time_call(lambda: layer(x), min_time)
                step_ms[(mode, m)] = step_ms.get((mode, m), 0.0) + t * 1e3 * PER_STEP[name]
                cells.append(f"{t * 1e3:7.3f} {flop / t / 1e9:6.1f} {layer.weight_bytes / t / 1e9:5.1f} "
                             f"{base / t:5.1f}")
            print(f"{name:>8} {m:>5} | " + " | ".join(cells), flush=True)
    if set(shapes) == set(SHAPES):
        print("\nOne model step (30 layers x qkv/o/gate_up/down + lm_head), ms:")
        print(f"{'M':>5} " + " ".join(f"{m:>10}" for m in ("paddle", *MODES)))
        for m in rows:
            print(f"{m:>5} " + " ".join(f"{step_ms[(mode, m)]:10.2f}" for mode in ("paddle", *MODES)))


def accuracy() -> None:
    from fastdeploy.model_executor.loader import load_model_weights  # noqa: PLC0415
    from fastdeploy.model_store import default_model_path  # noqa: PLC0415

    _, weights = load_model_weights(default_model_path())
    rng = np.random.default_rng(0)
    names = [n for n in sorted(weights) if n.endswith("proj.weight") and ".layers.0." in n]
    names += [n for n in sorted(weights) if n.endswith("proj.weight") and ".layers.29." in n]
    names.append("model.embed_tokens.weight")
    configs = [("bf16", 64, 0), ("bf16", 64, 1), ("wint8", 32, 0), ("wint8", 64, 0), ("wint8", 64, 1)]
    print(f"{'weight':>42} " + " ".join(f"{f'{q}/g{g}/' + ('dot' if d else 'fp32'):>24}" for q, g, d in configs))
    for name in names:
        w = weights[name].astype(np.float32)
        x = paddle.to_tensor(rng.standard_normal((64, w.shape[1]), dtype=np.float32))
        exact = paddle.matmul(x, paddle.to_tensor(np.ascontiguousarray(w.T))).numpy()
        cells = []
        for quant, group, dot in configs:
            layer = L.LinearWeight(w, None, quant, group_size=group, bf16_dot_min_rows=1 if dot else 0)
            y = layer(x).numpy()
            err = np.abs(y - exact)
            cells.append(f"{err.max():.2e}/{err.max() / np.abs(exact).max():.2e}")
        print(f"{name:>42} " + " ".join(f"{c:>24}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,256,1024")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds of timing per case")
    parser.add_argument("--accuracy", action="store_true", help="error per mode on the real model instead")
    args = parser.parse_args()
    if args.accuracy:
        accuracy()
        return
    bench([int(r) for r in args.rows.split(",")], args.shapes.split(","), args.min_time)


if __name__ == "__main__":
    main()
