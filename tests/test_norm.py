"""Fused RMSNorm (+ residual) and SiLU gate: native vs the plain-Paddle reference vs float64 numpy.

Native tests skip when the extension cannot be built, unless FASTDEPLOY_REQUIRE_NATIVE is set.
"""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from fastdeploy.model_executor.layers import linear as L
from fastdeploy.model_executor.layers import norm as N
from fastdeploy.model_executor.ops import native_build

EPS = 1e-5


@pytest.fixture(scope="module")
def native() -> None:
    try:
        L.native_ops()
    except native_build.NativeBuildError as exc:
        if os.environ.get(L.REQUIRE_NATIVE_ENV):
            pytest.fail(f"native ops failed to build and {L.REQUIRE_NATIVE_ENV} is set: {exc}")
        pytest.skip(f"native ops unavailable: {str(exc).splitlines()[0]}")
    if N._native() is None:
        pytest.skip("the linear backend is the reference here")


def rms_numpy(x: np.ndarray, w: np.ndarray, residual: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    v = x.astype(np.float64) + (residual.astype(np.float64) if residual is not None else 0.0)
    return v / np.sqrt((v * v).mean(axis=-1, keepdims=True) + EPS) * w, v


def silu_mul_numpy(x: np.ndarray) -> np.ndarray:
    g, u = np.split(x.astype(np.float64), 2, axis=-1)
    return g / (1.0 + np.exp(-g)) * u


def data(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("hidden", [576, 40, 7])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(native, rows, hidden, with_residual):
    x = data((rows, hidden), 1, 3.0)
    w = data((hidden,), 2)
    res = data((rows, hidden), 3) if with_residual else None
    # A row of tiny values, where eps is a large part of the mean square (a missing eps shows).
    x[0] *= 1e-3
    if res is not None:
        res[0] *= 1e-3
    want_out, want_sum = rms_numpy(x, w, res)
    for impl in (N.rms_norm, N.reference_rms_norm):
        out, summed = impl(paddle.to_tensor(x), paddle.to_tensor(w), EPS,
                           paddle.to_tensor(res) if res is not None else None)
        np.testing.assert_allclose(out.numpy(), want_out, rtol=2e-5, atol=2e-5 * np.abs(want_out).max())
        np.testing.assert_allclose(summed.numpy(), want_sum, rtol=1e-6, atol=1e-6)


def test_rms_norm_keeps_leading_dims_and_returns_x_without_residual(native):
    x = paddle.to_tensor(data((2, 3, 64), 4))
    w = paddle.to_tensor(data((64,), 5))
    out, summed = N.rms_norm(x, w, EPS)
    assert summed is x and list(out.shape) == [2, 3, 64]
    out2, summed2 = N.rms_norm(x, w, EPS, x)
    assert list(out2.shape) == [2, 3, 64] and list(summed2.shape) == [2, 3, 64]
    np.testing.assert_allclose(summed2.numpy(), 2 * x.numpy(), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("inter", [1536, 20, 3])
def test_silu_mul(native, rows, inter):
    # Large gates on purpose: exp must neither overflow nor lose the sign for |g| ~ 100.
    x = data((rows, 2 * inter), 6, 8.0)
    x[0, :3] = [-100.0, 100.0, 0.0][: min(3, inter)]
    want = silu_mul_numpy(x)
    for impl in (N.silu_mul, N.reference_silu_mul):
        got = impl(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())


def test_silu_mul_keeps_leading_dims(native):
    x = paddle.to_tensor(data((2, 3, 8), 7))
    assert list(N.silu_mul(x).shape) == [2, 3, 4]


@pytest.mark.parametrize("quant", L.QUANT_MODES)
@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_linear_equals_norm_then_linear(native, quant, rows, with_residual):
    hidden, out = 576, 100
    x = data((rows, hidden), 8)
    w = data((hidden,), 9)
    res = data((rows, hidden), 10) if with_residual else None
    weight = data((out, hidden), 11, 0.05)
    bias = data((out,), 12)
    layer = L.LinearWeight(weight, bias, quant, backend=L.NATIVE)
    xt, wt = paddle.to_tensor(x), paddle.to_tensor(w)
    rt = paddle.to_tensor(res) if res is not None else None
    y, summed = N.rms_norm_linear(xt, wt, EPS, layer, rt)
    h, want_sum = N.rms_norm(xt, wt, EPS, rt)
    want_y = layer(h)
    assert list(y.shape) == [rows, out]
    # The same two kernels on the same data, so the same bits.
    np.testing.assert_array_equal(y.numpy(), want_y.numpy())
    np.testing.assert_array_equal(summed.numpy(), want_sum.numpy())
    if res is None:
        assert summed is xt


def test_rms_norm_linear_on_the_reference_backend():
    x = paddle.to_tensor(data((3, 64), 13))
    w = paddle.to_tensor(data((64,), 14))
    layer = L.LinearWeight(data((10, 64), 15), None, "bf16", backend=L.REFERENCE)
    y, summed = N.rms_norm_linear(x, w, EPS, layer, x)
    h, want_sum = N.reference_rms_norm(x, w, EPS, x)
    np.testing.assert_allclose(y.numpy(), layer(h).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(summed.numpy(), want_sum.numpy())
