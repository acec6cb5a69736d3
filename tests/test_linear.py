"""Linear layers: native fd_linear vs the plain-Paddle reference vs float64 numpy.

Every comparison uses an error bound derived from the arithmetic, not a fudge factor:

- fp32 rounding of a K-term dot product is below ``K * 2**-24 * sum_k |x_k w_k|``; observed errors
  are far smaller, so the tests use a tenth of that (still ~100x the typical error) and a wrong
  weight, a shifted column or a missed K block shows up as an error of the order of ``|y|``.
- Each mode multiplies known operands: weights rounded to bf16 or to the wint8 grid, and
  activations as they are (fp32), rounded to bf16 (vdpbf16ps path) or to 16-bit steps (VNNI path).
  numpy recomputes those operands bit for bit, so "native vs its own math" is as tight as fp32
  rounding allows. Against the fp32 weights and activations the bound adds, per output,
  ``sum_k |dx_k| |w_k| + |x_k| |dw_k|``; separate tests pin dx and dw to their specs (half a
  wint8 or 16-bit step, ``2**-8`` relative for bf16).

Native tests skip when the extension cannot be built, unless FASTDEPLOY_REQUIRE_NATIVE is set (CI
sets it, so there a broken build fails).
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np
import paddle
import pytest

from fastdeploy.model_executor.layers import linear as L
from fastdeploy.model_executor.ops import native_build

# (K in, N out): SmolLM2-135M's fused qkv, o, fused gate_up, down, lm_head; then odd small ones
# (a partial last panel, N below one panel, K not a multiple of 16 or of the int8 group).
SMOLLM2_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
ODD_SHAPES = [(64, 40), (48, 5), (96, 100), (38, 19)]
ROWS = [1, 3, 17, 64, 200]
EPS32 = 2.0 ** -24
BF16_REL = 2.0 ** -8  # max relative change of a value rounded to bf16 (RNE): half of 8 bits


@pytest.fixture(scope="module")
def native() -> None:
    try:
        have_kernels = L.native_caps()[0]
    except native_build.NativeBuildError as exc:
        if os.environ.get(L.REQUIRE_NATIVE_ENV):
            pytest.fail(f"native linear ops failed to build and {L.REQUIRE_NATIVE_ENV} is set: {exc}")
        pytest.skip(f"native linear ops unavailable: {str(exc).splitlines()[0]}")
    if not have_kernels:  # AVX-512 and AVX2 + FMA kernels both run these tests
        pytest.skip("native linear kernels need AVX-512 or AVX2 + FMA")


@functools.cache
def weights(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight with a realistic spread (a few large entries per row) and a bias."""
    rng = np.random.default_rng(k * 100003 + n)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
    w[rng.random((n, k)) < 0.01] *= np.float32(8.0)  # outliers make the 8-bit groups uneven
    bias = rng.standard_normal(n).astype(np.float32)
    return w, bias


@functools.cache
def activations(m: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(m * 7919 + k)
    return rng.standard_normal((m, k), dtype=np.float32)


def bf16_round(a: np.ndarray) -> np.ndarray:
    return L.bf16_bits_to_float(L.round_to_bf16_bits(a))


def effective_weight(w: np.ndarray, quant: str, group: int) -> np.ndarray:
    """The fp32 [out, in] matrix a layer of this mode multiplies with."""
    if quant == "bf16":
        return bf16_round(w)
    if quant == "wint8":
        return L.dequantize_uint8(*L.quantize_uint8(w, group))
    return w


def uses_bf16_dot(layer: L.LinearWeight, m: int) -> bool:
    return (layer.backend == L.NATIVE and layer.quant != "none" and not layer.uses_act16(m)
            and layer.bf16_dot_min_rows > 0 and m >= layer.bf16_dot_min_rows and L.native_caps()[1])


def act16(x: np.ndarray, group: int) -> np.ndarray:
    """x on the 16-bit grid of the VNNI path, computed as native/linear.cc does (fp32 step per
    row and group = max|x| / 32639, q = round-to-even(x * (32639 / max|x|)))."""
    m, k = x.shape
    g = x.reshape(m, k // group, group).astype(np.float32)
    amax = np.abs(g).max(axis=-1)
    inv = np.where(amax > 0, np.float32(32639.0) / np.where(amax > 0, amax, np.float32(1.0)), np.float32(0.0))
    q = np.rint(g * inv.astype(np.float32)[..., None])
    step = (amax / np.float32(32639.0)).astype(np.float32)
    return (q.astype(np.float64) * step[..., None]).reshape(m, k)


def kernel_operands(layer: L.LinearWeight, x: np.ndarray, w_eff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activations and weights the layer's kernel multiplies for this x (float64)."""
    if layer.uses_act16(x.shape[0]):
        return act16(x, layer.group_size), w_eff.astype(np.float64)
    if uses_bf16_dot(layer, x.shape[0]):
        return bf16_round(x).astype(np.float64), bf16_round(w_eff).astype(np.float64)
    return x.astype(np.float64), w_eff.astype(np.float64)


def exact_math(layer: L.LinearWeight, x: np.ndarray, w_eff: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    xo, wo = kernel_operands(layer, x, w_eff)
    return expected(xo, wo, bias)


def expected(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y + bias if bias is not None else y


def rounding_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A tenth of the worst-case fp32 rounding error of each output, plus a floor for outputs
    that cancel to ~0."""
    k = x.shape[1]
    mag = np.abs(x) @ np.abs(w).T
    return 0.1 * k * EPS32 * mag + 1e-6 * mag.max()


def check_close(actual: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str) -> None:
    err = np.abs(actual.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{what}: error {err[worst]:.3e} at {worst} exceeds bound {bound[worst]:.3e} "
                                  f"(|y| = {abs(want[worst]):.3e})")


def run(layer: L.LinearWeight, x: np.ndarray) -> np.ndarray:
    y = layer(paddle.to_tensor(x))
    assert list(y.shape) == [x.shape[0], layer.out_features]
    assert y.dtype == paddle.float32
    return y.numpy()


# ------------------------------------------------------------------------------------------------
# Native vs the exact math of its mode, and vs the reference backend.


# (quant, LinearWeight options): wint8 runs through VNNI by default; vnni=False covers its fp32
# (few rows) and bf16-dot (many rows) paths.
MODES = [("none", {}), ("bf16", {}), ("wint8", {}), ("wint8", {"vnni": False})]
MODE_IDS = ["none", "bf16", "wint8", "wint8-novnni"]


@pytest.mark.parametrize(("quant", "opts"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES + ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_native_matches_its_math_and_the_reference(native, shape, quant, opts):
    k, n = shape
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, quant, backend=L.NATIVE, **opts)
    ref = L.LinearWeight(w, bias, quant, backend=L.REFERENCE)
    if (quant == "bf16" and k % 2) or (quant == "wint8" and k % 4):
        assert layer.backend == L.REFERENCE  # the bf16/wint8 kernels read k-pairs/quads: fallback
    w_eff = effective_weight(w, quant, layer.group_size)
    rows = ROWS if n < 10000 else [1, 3, 17, 64]  # the 49152-wide head: keep numpy's share small
    for m in rows:
        x = activations(m, k)
        got = run(layer, x)
        check_close(got, exact_math(layer, x, w_eff, bias), rounding_bound(x, w_eff), f"{quant} M={m} vs exact")
        if not uses_bf16_dot(layer, m) and not layer.uses_act16(m):  # the reference's products: only order differs
            check_close(got, run(ref, x).astype(np.float64), 2 * rounding_bound(x, w_eff),
                        f"{quant} M={m} vs reference")


@pytest.mark.parametrize("quant", ["bf16", "wint8"])
@pytest.mark.parametrize("rows", [13, 64, 99, 200])
def test_quantized_many_rows_without_bf16_dot(native, quant, rows):
    """bf16_dot_min_rows=0 (and no VNNI): many rows dequantize each panel slice into an fp32
    buffer instead (99 ends in an M block of 3 rows, 200 in one of 8)."""
    k, n = 1536, 576
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, quant, backend=L.NATIVE, bf16_dot_min_rows=0, vnni=False)
    ref = L.LinearWeight(w, bias, quant, backend=L.REFERENCE)
    x = activations(rows, k)
    w_eff = effective_weight(w, quant, layer.group_size)
    check_close(run(layer, x), run(ref, x).astype(np.float64), 2 * rounding_bound(x, w_eff), "vs reference")


@pytest.mark.parametrize(("quant", "opts"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dot", [False, True])
def test_long_k_is_blocked_and_accumulated(native, quant, opts, dot):
    """K beyond one K block (2048 rows for fp32 compute, 4096 for bf16 dot and VNNI): the row
    tiles add the partial sums of later blocks to the output of earlier ones."""
    k, n = 4608, 72
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, quant, backend=L.NATIVE, bf16_dot_min_rows=1 if dot else 0, **opts)
    w_eff = effective_weight(w, quant, layer.group_size)
    for m in (5, 40):  # few rows stream the whole K; many rows take the blocked path
        x = activations(m, k)
        check_close(run(layer, x), exact_math(layer, x, w_eff, bias), rounding_bound(x, w_eff), f"{quant} M={m}")


@pytest.mark.parametrize("group", [8, 16, 32, 64])
@pytest.mark.parametrize("vnni", [True, False])
def test_wint8_group_sizes(native, group, vnni):
    k, n = 576, 200
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, "wint8", backend=L.NATIVE, group_size=group, vnni=vnni)
    assert layer.group_size == group
    assert layer.uses_vnni == (vnni and group in L.VNNI_GROUPS and L.native_caps()[2])
    w_eff = effective_weight(w, "wint8", group)
    # AVX2 runs the 16-bit kernels up to act16_max_rows() rows only: both sides of that line too.
    edge = L.act16_max_rows() if 0 < L.act16_max_rows() < 40 else 12
    for m in (1, 5, edge, edge + 1, 40):
        x = activations(m, k)
        check_close(run(layer, x), exact_math(layer, x, w_eff, bias), rounding_bound(x, w_eff),
                    f"group {group} M={m}")


# ------------------------------------------------------------------------------------------------
# Quantized modes vs the fp32 weights: error within what the quantization itself allows.


def quantization_bound(x: np.ndarray, w: np.ndarray, x_op: np.ndarray, w_op: np.ndarray) -> np.ndarray:
    """|x_op w_op - x w| <= |x_op - x| |w_op| + |x| |w_op - w| per output, plus fp32 rounding."""
    ax = np.abs(x).astype(np.float64)
    bound = np.abs(x_op - x) @ np.abs(w_op).T + ax @ np.abs(w_op - w).T
    return bound + rounding_bound(x, w)


@pytest.mark.parametrize("quant", ["bf16", "wint8"])
@pytest.mark.parametrize("shape", [(576, 960), (1536, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantized_error_vs_fp32(native, shape, quant):
    k, n = shape
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, quant, backend=L.NATIVE)
    w_eff = effective_weight(w, quant, layer.group_size)
    for m in (1, 64):
        x = activations(m, k)
        got = run(layer, x)
        exact = expected(x, w, bias)
        x_op, w_op = kernel_operands(layer, x, w_eff)
        check_close(got, exact, quantization_bound(x, w, x_op, w_op), f"{quant} M={m} vs fp32")
        # ...and the bound is not vacuous: the typical error is far below |y|.
        rel = np.abs(got - exact).max() / np.abs(exact - bias).max()
        assert rel < (2e-2 if quant == "wint8" else 1e-2), rel


@pytest.mark.parametrize("quant", ["bf16", "wint8"])
@pytest.mark.parametrize("vnni", [True, False])
def test_activation_rounding_stays_within_spec(native, quant, vnni):
    """The activations each path multiplies are within half a 16-bit step (VNNI) or 2**-8
    relative (bf16) of x, and the VNNI path is at least 30x closer to fp32 than bf16. Kernels
    without either (AVX2 beyond its 16-bit rows) multiply x as it is."""
    k = 576
    layer = L.LinearWeight(weights(k, 40)[0], None, quant, backend=L.NATIVE, vnni=vnni)
    m = min(64, L.act16_max_rows()) if layer.uses_vnni else 64
    x = activations(m, k)
    x_op, _ = kernel_operands(layer, x, np.zeros((40, k), dtype=np.float32))
    if layer.uses_vnni:
        assert layer.uses_act16(m)
        step = np.repeat(np.abs(x.reshape(m, -1, layer.group_size)).max(axis=-1) / 32639.0, layer.group_size, axis=1)
        # Half a step, plus the fp32 rounding of x / step (|x / step| < 2**15: 2**-9 of a step).
        assert np.all(np.abs(x_op - x) <= step * (0.5 + 2.0 ** -8))
        assert np.abs(x_op - x).max() * 30 < np.abs(bf16_round(x) - x).max()
    elif L.native_caps()[1]:
        assert uses_bf16_dot(layer, 64)
        assert np.all(np.abs(x_op - x) <= BF16_REL * np.abs(x))
    else:
        np.testing.assert_array_equal(x_op, x)


# ------------------------------------------------------------------------------------------------
# Call conventions.


def test_leading_dims_non_contiguous_input_and_empty_batch(native):
    k, n = 64, 40
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, "none", backend=L.NATIVE)
    wide = activations(6, 2 * k)
    x = paddle.to_tensor(wide)[:, :k]  # a strided view: rows are 2k apart
    want = expected(wide[:, :k], w, bias)
    check_close(layer(x).numpy(), want, rounding_bound(wide[:, :k], w), "strided view")
    y3 = layer(paddle.to_tensor(wide[:, :k].reshape(2, 3, k).copy()))
    assert list(y3.shape) == [2, 3, n]
    check_close(y3.numpy().reshape(6, n), want, rounding_bound(wide[:, :k], w), "3-D input")
    empty = layer(paddle.zeros([0, k], dtype="float32"))
    assert list(empty.shape) == [0, n]


@pytest.mark.parametrize("backend", [L.NATIVE, L.REFERENCE])
def test_without_bias(native, backend):
    w, _ = weights(96, 100)
    x = activations(3, 96)
    layer = L.LinearWeight(w, None, "none", backend=backend)
    check_close(run(layer, x), expected(x, w, None), rounding_bound(x, w), backend)


def test_native_threads_agree(native):
    """One thread and two must give the same answer (each output is computed by one thread)."""
    k, n = 576, 960
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, "wint8", backend=L.NATIVE)
    x = paddle.to_tensor(activations(17, k))
    outs = []
    for threads in (1, 2):
        layer._threads = threads
        outs.append(layer(x).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_rejects_bad_arguments():
    w, bias = weights(64, 40)
    with pytest.raises(ValueError):
        L.LinearWeight(w, bias, "int4")
    with pytest.raises(ValueError):
        L.LinearWeight(w, bias[:3])
    with pytest.raises(ValueError):
        L.LinearWeight(w[0])


# ------------------------------------------------------------------------------------------------
# The reference path and the backend choice.


@pytest.mark.parametrize("quant", L.QUANT_MODES)
def test_reference_backend_matches_numpy(quant):
    k, n = 576, 576
    w, bias = weights(k, n)
    layer = L.LinearWeight(w, bias, quant, backend=L.REFERENCE)
    w_eff = effective_weight(w, quant, layer.group_size)
    x = activations(17, k)
    check_close(run(layer, x), expected(x, w_eff, bias), rounding_bound(x, w_eff), quant)


def test_quantizers():
    w, _ = weights(576, 40)
    u, scales, zeros = L.quantize_uint8(w, 64)
    assert u.dtype == np.uint8 and scales.shape == zeros.shape == (40, 9)
    err = np.abs(L.dequantize_uint8(u, scales, zeros) - w)
    step = np.repeat(scales, 64, axis=1)
    assert np.all(err <= step / 2 + 4 * EPS32 * (np.abs(w) + 255 * step))  # half a step, plus fp32 rounding
    const = np.full((2, 64), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(L.dequantize_uint8(*L.quantize_uint8(const, 32)), const)
    zero = np.zeros((2, 64), dtype=np.float32)
    np.testing.assert_array_equal(L.dequantize_uint8(*L.quantize_uint8(zero, 32)), zero)
    # RNE: 1 + 2**-8 is halfway between two bf16 values and rounds to the even one (1.0).
    vals = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5], dtype=np.float32)
    np.testing.assert_array_equal(bf16_round(vals), [1.0, 1.0, 1.0 + 2 ** -6, -2.5])
    assert L.pick_group_size(576) == 32 and L.pick_group_size(96) == 32 and L.pick_group_size(36) == 4
    assert L.pick_group_size(576, 64) == 64 and L.pick_group_size(38) == 38 and L.pick_group_size(37) == 37


def gguf_like_blocks(kind: str, rows: int = 64, k: int = 576, seed: int = 0) -> np.ndarray:
    """Weights as a GGUF reader dequantizes them: per block of 32, Q4_1 is d * q + m with q in 0..15
    (the block's min and max hit 0 and 15 by construction), Q8_0 is d * q with q in -127..127
    (the largest magnitude hits 127); d and m are fp16 in the file."""
    rng = np.random.default_rng(seed)
    blocks = rows * k // 32
    d = rng.uniform(0.001, 0.05, blocks).astype(np.float16).astype(np.float32)
    if kind == "q4_1":
        q = rng.integers(0, 16, (blocks, 32))
        q[:, 0], q[:, 1] = 0, 15
        m = -rng.uniform(0.0, 0.4, blocks).astype(np.float16).astype(np.float32)
        w = d[:, None] * q.astype(np.float32) + m[:, None]
    else:
        q = rng.integers(-127, 128, (blocks, 32))
        q[:, 0] = rng.choice([-127, 127], blocks)
        w = d[:, None] * q.astype(np.float32)
    return w.astype(np.float32).reshape(rows, k)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_wint8_requantizes_gguf_blocks_exactly(kind):
    """Groups of 32 on GGUF's block grid: the weights come back up to fp32 rounding, which is what
    makes wint8 a faithful (not a further lossy) copy of a Q4_1 / Q8_0 model."""
    w = gguf_like_blocks(kind)
    back = L.dequantize_uint8(*L.quantize_uint8(w, 32))
    np.testing.assert_allclose(back, w, rtol=0, atol=4e-7 * np.abs(w).max())
    # Groups of 64 straddle two blocks of different scale: no longer exact (shows the test bites).
    coarse = L.dequantize_uint8(*L.quantize_uint8(w, 64))
    assert np.abs(coarse - w).max() > 100 * 4e-7 * np.abs(w).max()


@pytest.fixture
def fresh_backend(monkeypatch):
    """Forget the cached backend choice before and after the test."""
    L.linear_backend_name.cache_clear()
    yield monkeypatch
    L.linear_backend_name.cache_clear()


def test_env_selects_reference(fresh_backend):
    fresh_backend.setenv(L.BACKEND_ENV, "reference")
    assert L.linear_backend_name() == L.REFERENCE
    w, bias = weights(64, 40)
    layer = L.LinearWeight(w, bias, "wint8")
    assert layer.backend == L.REFERENCE
    x = activations(3, 64)
    w_eff = effective_weight(w, "wint8", layer.group_size)
    check_close(run(layer, x), expected(x, w_eff, bias), rounding_bound(x, w_eff), "reference")


def test_env_rejects_unknown_backend(fresh_backend):
    fresh_backend.setenv(L.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError):
        L.linear_backend_name()


def _broken_build(*_args, **_kwargs):
    raise native_build.NativeBuildError("building fastdeploy_linear_ops failed (simulated)")


def test_failed_build_falls_back_with_one_warning(fresh_backend, caplog):
    fresh_backend.delenv(L.BACKEND_ENV, raising=False)
    fresh_backend.delenv(L.REQUIRE_NATIVE_ENV, raising=False)
    fresh_backend.setattr(L, "native_ops", _broken_build)
    L.native_caps.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fastdeploy"):
            assert L.linear_backend_name() == L.REFERENCE
            assert L.linear_backend_name() == L.REFERENCE
        assert sum("Native linear ops unavailable" in r.getMessage() for r in caplog.records) == 1
        w, bias = weights(48, 5)
        assert L.LinearWeight(w, bias, "bf16").backend == L.REFERENCE
    finally:
        L.native_caps.cache_clear()


@pytest.mark.parametrize("how", ["require_env", "explicit_native"])
def test_failed_build_raises_when_native_is_required(fresh_backend, how):
    if how == "require_env":
        fresh_backend.delenv(L.BACKEND_ENV, raising=False)
        fresh_backend.setenv(L.REQUIRE_NATIVE_ENV, "1")
    else:
        fresh_backend.setenv(L.BACKEND_ENV, "native")
    fresh_backend.setattr(L, "native_ops", _broken_build)
    L.native_caps.cache_clear()
    try:
        with pytest.raises(native_build.NativeBuildError):
            L.linear_backend_name()
    finally:
        L.native_caps.cache_clear()
