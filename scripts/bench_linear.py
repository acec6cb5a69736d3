"""Micro-benchmark of the linear layers: native fd_linear (fp32 / bf16 / wint8) vs paddle.matmul fp32.

Shapes are SmolLM2-135M's (fused qkv 576->960, o 576->576, fused gate_up 576->3072, down
1536->576, lm_head 576->49152), at M = 1, 8, 32, 64, 256, 1024 rows. For each case it prints
milliseconds per call (median), GFLOP/s (2*M*K*N / time) and GB/s of weight data read (the packed
bytes of the mode; activations are small next to them at small M). A layer's weights are reused
call after call there, so the smaller ones are served from the L3 cache. The last table is the
honest decode figure: all linear layers of one model step (30 distinct layers' weights, as in the
model, so they stream from DRAM, then the lm_head), per mode and M.

    .venv/bin/python scripts/bench_linear.py [--rows 1,8,32] [--shapes qkv,down] [--min-time 0.2]
    .venv/bin/python scripts/bench_linear.py --accuracy   # error of each mode vs fp32 on the real model
    .venv/bin/python scripts/bench_linear.py --act16-ab [--rows 1,4,8,16,32]
    .venv/bin/python scripts/bench_linear.py --act8-ab [--rows 1,2,4,8,32,256]

--act16-ab times wint8 with and without the 16-bit-activation kernels (``vnni=True`` / ``False``,
alternating, best of three each) per shape and M, and prints the ratio of their times. With AVX2
the kernels serve calls of up to ``act16_max_rows()`` rows; this is the table that threshold
comes from (rows beyond it run the fp32 path either way).

--act8-ab times, on weights shaped like a GGUF Q4_1 file's (4-bit codes per block of 32, fp16
step and offset), the ways wint8 can hold and multiply them, alternating, best of three each:
4-bit panels with the opt-in 8-bit activations (AVX2 builds, act8=True: from 2 rows on, 16-bit
below), 4-bit panels as by default (16-bit activations up to act16_max_rows, fp32 on dequantized
slices beyond), 8-bit panels as with FASTDEPLOY_ACT8=0 (the same split), and 8-bit panels with
fp32 activations (vnni=False).

--accuracy loads the default GGUF model (Q4_1 layers, Q8_0 embedding, dequantized to fp32) and
reports, per mode, wint8 group size and activation path (fp32; bf16-rounded for vdpbf16ps;
"int": the default, 16-bit activations where the integer kernels take the call, fp32 beyond;
"act8": the opt-in 8-bit activations on the Q4_1 layers of AVX2 builds), the max abs error / max abs error relative to max |y| of the outputs of the
first and last layers' weights and the lm_head against fp32, on random activations (64 rows).
"""
from __future__ import annotations

import argparse
import os
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
    backend = L.linear_backend_name()
    isa = f" ({L.native_isa()} kernels)" if backend == L.NATIVE else ""
    print(f"backend={backend}{isa} threads={L.native_num_threads()} "
          f"bf16_dot_min_rows={L.DEFAULT_BF16_DOT_MIN_ROWS} int8 group={L.DEFAULT_GROUP_SIZE}")
    header = f"{'shape':>8} {'M':>5} | {'paddle fp32':>22} | " + " | ".join(f"{m:>28}" for m in MODES)
    print(header)
    print(f"{'':>8} {'':>5} | {'ms':>7} {'GF/s':>6} {'GB/s':>7} | "
          + " | ".join(f"{'ms':>7} {'GF/s':>6} {'GB/s':>5} {'x':>5}" for _ in MODES))
    for name in shapes:
        k, n = SHAPES[name]
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.05)
        w_ref = paddle.to_tensor(np.ascontiguousarray(w.T))
        layers = {mode: L.LinearWeight(w, None, mode) for mode in MODES}
        for m in rows:
            x = paddle.to_tensor(rng.standard_normal((m, k), dtype=np.float32))
            flop = 2.0 * m * n * k
            base = time_call(lambda: paddle.matmul(x, w_ref), min_time)
            cells = [f"{base * 1e3:7.3f} {flop / base / 1e9:6.1f} {k * n * 4 / base / 1e9:7.1f}"]
            for mode, layer in layers.items():
                t = time_call(lambda: layer(x), min_time)
                cells.append(f"{t * 1e3:7.3f} {flop / t / 1e9:6.1f} {layer.weight_bytes / t / 1e9:5.1f} "
                             f"{base / t:5.1f}")
            print(f"{name:>8} {m:>5} | " + " | ".join(cells), flush=True)


def model_step(rows: list[int], min_time: float) -> None:
    """All linear layers of one model step, each layer with its own weights (135M parameters)."""
    rng = np.random.default_rng(1)
    layer_shapes = [SHAPES[name] for name in ("qkv", "o", "gate_up", "down")]
    print("\nOne model step: 30 layers x (qkv, o, gate_up, down) with distinct weights + lm_head, ms:")
    print(f"{'M':>5} " + " ".join(f"{m:>10}" for m in ("paddle", *MODES)) + "   (weights: MB per step)")
    results: dict[str, dict[int, float]] = {}
    sizes: dict[str, float] = {}
    for mode in ("paddle", *MODES):
        def make(k: int, n: int) -> Callable[[paddle.Tensor], paddle.Tensor]:
            w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
            if mode == "paddle":
                t = paddle.to_tensor(np.ascontiguousarray(w.T))
                return lambda x: paddle.matmul(x, t)
            return L.LinearWeight(w, None, mode)
        layers = [make(k, n) for _ in range(PER_STEP["qkv"]) for k, n in layer_shapes]
        layers.append(make(*SHAPES["lm_head"]))
        sizes[mode] = sum(getattr(lw, "weight_bytes", 0) for lw in layers) / 1e6
        inputs = {m: {k: paddle.to_tensor(rng.standard_normal((m, k), dtype=np.float32)) for k in (576, 1536)}
                  for m in rows}

        def step(m: int) -> paddle.Tensor:
            xs = inputs[m]
            y = None
            for lw, (k, _) in zip(layers, [*layer_shapes * PER_STEP["qkv"], SHAPES["lm_head"]]):
                y = lw(xs[k])
            return y

        results[mode] = {m: time_call(lambda m=m: step(m), min_time * 4) * 1e3 for m in rows}
        del layers
    for m in rows:
        print(f"{m:>5} " + " ".join(f"{results[mode][m]:10.2f}" for mode in ("paddle", *MODES)))
    print(f"{'MB':>5} {134.5 * 4:10.0f} " + " ".join(f"{sizes[mode]:10.0f}" for mode in MODES))


def act16_ab(rows: list[int], shapes: list[str], min_time: float) -> None:
    rng = np.random.default_rng(0)
    limit = L.act16_max_rows()
    print(f"16-bit activations on wint8 up to {limit} rows ({L.native_isa()} kernels); ms per call, best of 3")
    print(f"{'shape':>8} {'M':>5} | {'act16':>8} {'fp32-act':>9} | act16 / fp32-act")
    for name in shapes:
        k, n = SHAPES[name]
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.05
        on = L.LinearWeight(w, None, "wint8", vnni=True, bf16_dot_min_rows=0)
        off = L.LinearWeight(w, None, "wint8", vnni=False, bf16_dot_min_rows=0)
        for m in rows:
            x = paddle.to_tensor(rng.standard_normal((m, k), dtype=np.float32))
            t_on, t_off = [], []
            for _ in range(3):
                t_on.append(time_call(lambda: on(x), min_time))
                t_off.append(time_call(lambda: off(x), min_time))
            note = "" if on.uses_act16(m) else "  (beyond the limit: both fp32-act)"
            print(f"{name:>8} {m:>5} | {min(t_on) * 1e3:8.3f} {min(t_off) * 1e3:9.3f} | "
                  f"{min(t_on) / min(t_off):.2f}{note}", flush=True)


def q4_1_like(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k] weights as a Q4_1 GGUF dequantizes: w = d * q + m per block of 32, q in 0..15 with
    both ends used, d and m fp16 (as GGUF stores them, so the layer packs as 4-bit panels)."""
    q = rng.integers(0, 16, size=(n, k // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = (rng.random((n, k // 32, 1)) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    m = -(rng.random((n, k // 32, 1)) * 0.08).astype(np.float16).astype(np.float32)
    return (q * d + m).reshape(n, k)


def eight_bit_panels(w: np.ndarray) -> L.LinearWeight:
    """The same weights as 8-bit panels (16-bit activations up to act16_max_rows): what a layer is
    with FASTDEPLOY_ACT8=0, which only packing reads."""
    saved = os.environ.get(L.ACT8_ENV)
    os.environ[L.ACT8_ENV] = "0"
    try:
        return L.LinearWeight(w, None, "wint8", bf16_dot_min_rows=0)
    finally:
        if saved is None:
            del os.environ[L.ACT8_ENV]
        else:
            os.environ[L.ACT8_ENV] = saved


def act8_ab(rows: list[int], shapes: list[str], min_time: float) -> None:
    if L.act8_min_rows() == 0:
        print(f"no 4-bit panels in this build ({L.native_isa()} kernels) or {L.ACT8_ENV}=0")
        return
    rng = np.random.default_rng(0)
    print(f"wint8 on Q4_1-shaped weights ({L.native_isa()} kernels, {L.native_num_threads()} threads); "
          "ms per call, best of 3")
    print(f"{'shape':>8} {'M':>5} | {'act8':>8} {'4-bit':>8} {'8-bit':>8} {'fp32-act':>9} | "
          "act8/4-bit 4-bit/8-bit act8/fp32-act")
    for name in shapes:
        k, n = SHAPES[name]
        w = q4_1_like(n, k, rng)
        paths = {"act8": L.LinearWeight(w, None, "wint8", bf16_dot_min_rows=0, act8=True),
                 "u4": L.LinearWeight(w, None, "wint8", bf16_dot_min_rows=0, act8=False),
                 "act16": eight_bit_panels(w),
                 "fp32": L.LinearWeight(w, None, "wint8", bf16_dot_min_rows=0, vnni=False)}
        for m in rows:
            x = paddle.to_tensor(rng.standard_normal((m, k), dtype=np.float32))
            times: dict[str, list[float]] = {key: [] for key in paths}
            for _ in range(3):
                for key, layer in paths.items():
                    times[key].append(time_call(lambda layer=layer: layer(x), min_time))
            best = {key: min(v) for key, v in times.items()}
            note = "" if paths["act8"].uses_act8(m) else "  (act8 not taken at this M)"
            act16_note = "" if paths["act16"].uses_act16(m) else " (fp32-act)"
            print(f"{name:>8} {m:>5} | {best['act8'] * 1e3:8.3f} {best['u4'] * 1e3:8.3f} {best['act16'] * 1e3:8.3f} "
                  f"{best['fp32'] * 1e3:9.3f} | {best['act8'] / best['u4']:10.2f} {best['u4'] / best['act16']:11.2f}"
                  f"{act16_note} {best['act8'] / best['fp32']:.2f}{note}", flush=True)


def accuracy() -> None:
    from fastdeploy.model_executor.loader import load_model_weights  # noqa: PLC0415
    from fastdeploy.model_store import default_model_path  # noqa: PLC0415

    _, weights = load_model_weights(default_model_path())
    rng = np.random.default_rng(0)
    names = [n for n in sorted(weights) if n.endswith("proj.weight") and ".layers.0." in n]
    names += [n for n in sorted(weights) if n.endswith("proj.weight") and ".layers.29." in n]
    names.append("model.embed_tokens.weight")
    configs = [  # (label, quant, LinearWeight options)
        ("bf16/fp32-act", "bf16", dict(bf16_dot_min_rows=0)),
        ("bf16/bf16-act", "bf16", dict(bf16_dot_min_rows=1)),
        ("wint8-g32/int", "wint8", dict(group_size=32)),
        ("wint8-g32/act8", "wint8", dict(group_size=32, act8=True)),
        ("wint8-g32/fp32-act", "wint8", dict(group_size=32, vnni=False, bf16_dot_min_rows=0)),
        ("wint8-g32/bf16-act", "wint8", dict(group_size=32, vnni=False, bf16_dot_min_rows=1)),
        ("wint8-g64/int", "wint8", dict(group_size=64)),
    ]
    print(f"{'weight':>42} " + " ".join(f"{label:>20}" for label, _, _ in configs))
    for name in names:
        w = weights[name].astype(np.float32)
        x = paddle.to_tensor(rng.standard_normal((64, w.shape[1]), dtype=np.float32))
        exact = paddle.matmul(x, paddle.to_tensor(np.ascontiguousarray(w.T))).numpy()
        cells = []
        for _, quant, opts in configs:
            y = L.LinearWeight(w, None, quant, **opts)(x).numpy()
            err = np.abs(y - exact)
            cells.append(f"{err.max():.1e}/{err.max() / np.abs(exact).max():.1e}")
        print(f"{name:>42} " + " ".join(f"{c:>20}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,256,1024")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds of timing per case")
    parser.add_argument("--accuracy", action="store_true", help="error per mode on the real model instead")
    parser.add_argument("--skip-step", action="store_true", help="skip the whole-model-step table")
    parser.add_argument("--act16-ab", action="store_true",
                        help="wint8 with vs without the 16-bit-activation kernels instead")
    parser.add_argument("--act8-ab", action="store_true",
                        help="wint8 on Q4_1-shaped weights: 8-bit vs 16-bit vs fp32 activations instead")
    args = parser.parse_args()
    if args.accuracy:
        accuracy()
        return
    if args.act16_ab:
        act16_ab([int(r) for r in args.rows.split(",")], args.shapes.split(","), args.min_time)
        return
    if args.act8_ab:
        act8_ab([int(r) for r in args.rows.split(",")], args.shapes.split(","), args.min_time)
        return
    rows = [int(r) for r in args.rows.split(",")]
    bench(rows, args.shapes.split(","), args.min_time)
    if not args.skip_step:
        model_step([m for m in rows if m <= 256], args.min_time)


if __name__ == "__main__":
    main()
