"""wint8 layers as 4-bit panels, with 16-bit or (opt-in) 8-bit activations (native/linear_s8.h,
AVX2 builds).

Weights whose groups lie on 16-level grids (GGUF Q4_1 blocks) are stored as 4-bit codes two to a
byte. Calls of up to four_bit_act16_max_rows() rows multiply 16-bit activations (tiles of two
rows), longer ones fp32 activations on dequantized slices; in layers built with act8=True
(FASTDEPLOY_ACT8=1), calls of act8_min_rows() rows on quantize x per row and group of 32 to int8
instead. The integer kernels sum the products exactly. numpy recomputes those activations bit for
bit, so the kernels are checked against the float64 product of the operands they multiply, within
fp32 rounding (the bounds of tests/test_linear.py).
"""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from fastdeploy.model_executor.layers import linear as L

from test_linear import act16, activations, check_close, expected, native, rounding_bound  # noqa: F401

pytestmark = pytest.mark.usefixtures("native")


def q4_weights(n: int, k: int, seed: int, *, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights as a GGUF Q4_1 (or Q4_0: symmetric) file dequantizes them: per block of 32, half
    step d and offset m, w = d * q + m, every block using both end levels; and a bias."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k // 32, 32)).astype(np.float32)
    q[..., 3], q[..., 17] = 0, 15
    d = (rng.random((n, k // 32, 1)) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    m = np.float32(-8.0) * d if symmetric else -(rng.random((n, k // 32, 1)) * 0.08).astype(np.float16)
    w = (q * d + m).reshape(n, k).astype(np.float32)
    return w, rng.standard_normal(n).astype(np.float32)


def act8(x: np.ndarray) -> np.ndarray:
    """x on the int8 grid of the kernel (QuantizeRow8): fp32 step per row and group of 32 =
    max|x| / 127, q = round-to-even(x * (127 / max|x|)), as float64 q * step."""
    m, k = x.shape
    g = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(g).max(axis=-1)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, np.float32(1.0)), np.float32(0.0))
    q = np.rint(g * inv.astype(np.float32)[..., None])
    step = (amax / np.float32(127.0)).astype(np.float32)
    return (q.astype(np.float64) * step[..., None]).reshape(m, k)


def needs_act8() -> None:
    if L.act8_min_rows() == 0:
        pytest.skip("no 4-bit panels in this build (AVX-512 builds use vpdpbusd on 8-bit ones)")


def run(layer: L.LinearWeight, x: np.ndarray) -> np.ndarray:
    return layer(paddle.to_tensor(x)).numpy()


def test_4bit_grids_are_found_exactly():
    w, _ = q4_weights(40, 96, 1)
    u, scales, zeros = L.quantize_uint4_exact(w, 32)
    assert u.max() == 15 and u.min() == 0
    np.testing.assert_allclose(L.dequantize_uint8(u, scales, zeros), w, rtol=0, atol=1e-7)
    sym, _ = q4_weights(40, 96, 2, symmetric=True)
    assert L.quantize_uint4_exact(sym, 32) is not None
    # One weight off its block's grid, or weights that never were 4-bit: no 4-bit form.
    off = w.copy()
    off[7, 50] += np.float32(0.3) * scales[7, 1]
    assert L.quantize_uint4_exact(off, 32) is None
    assert L.quantize_uint4_exact(activations(40, 96), 32) is None
    # A 16-level grid whose step is no half (4-bit panels store halves): stays 8-bit.
    assert L.quantize_uint4_exact(w * np.float32(1.0 + 2.0 ** -13), 32) is None


@pytest.mark.parametrize("with_act8", [False, True], ids=["act16", "act8"])
@pytest.mark.parametrize("shape", [(576, 960), (1536, 576), (96, 100), (4608, 72)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_4bit_panels_match_their_math(shape, with_act8):
    """Against float64 of the activations each kernel multiplies and the 4-bit weights: 16-bit
    ones up to four_bit_act16_max_rows (TileVnniOnePass, two-row tiles), fp32 ones beyond (slices
    dequantized to fp32), or with act8 int8 ones from 2 rows on and 16-bit ones for a single row.
    100 columns end in a partial panel, K = 4608 spans two K blocks; 9 and 99 rows end in short
    row tiles, 200 span three M blocks."""
    needs_act8()
    k, n = shape
    w, bias = q4_weights(n, k, k + n)
    layer = L.LinearWeight(w, bias, "wint8", backend=L.NATIVE, act8=with_act8)
    assert layer.four_bit and layer.uses_act8(64) == with_act8 and not layer.uses_act8(1)
    top = L.four_bit_act16_max_rows()
    assert layer.uses_act16(1) and not layer.uses_act16(top + 1) and layer.uses_act16(top) != with_act8
    for m in (1, 2, 9, top, top + 1, 99, 200):
        x = activations(m, k).copy()
        x[:, 5] *= np.float32(30.0)  # an outlier channel, as real hidden states have
        x_op = act8(x) if layer.uses_act8(m) else act16(x, 32) if layer.uses_act16(m) else x
        got = run(layer, x)
        check_close(got, expected(x_op, w.astype(np.float64), bias), rounding_bound(x, w), f"M={m}")


def test_4bit_panels_are_half_the_bytes_and_one_row_matches_8bit_panels_exactly():
    """pack_uint4 holds the codes pack_uint8 holds: one row runs the same integer sums and group
    epilogue on both (TileVnniOnePass with U4Group and with U8Group), so the outputs are equal bit
    for bit, and the size alone tells the op which layout it got."""
    needs_act8()
    k, n = 1536, 200
    w, bias = q4_weights(n, k, 11)
    codes = L.quantize_uint4_exact(w, 32)
    u4, u8 = L.pack_uint4(*codes), L.pack_uint8(*codes)
    assert u4.size * 2 == u8.size
    op = L.native_ops().fd_linear
    x = paddle.to_tensor(activations(1, k))
    b = paddle.to_tensor(bias)
    y4 = op(x, paddle.to_tensor(u4), b, n, 2, 32, 0, 1, 2).numpy()
    y8 = op(x, paddle.to_tensor(u8), b, n, 2, 32, 0, 1, 2).numpy()
    np.testing.assert_array_equal(y4, y8)
    with pytest.raises(ValueError, match="4-bit panels hold codes 0..15"):
        L.pack_uint4(codes[0] * 2, codes[1], codes[2])
    with pytest.raises(ValueError, match="exact halves"):
        L.pack_uint4(codes[0], codes[1] * np.float32(1.0 + 2.0 ** -13), codes[2])
    with pytest.raises(Exception, match="expected"):
        op(x, paddle.to_tensor(u4[:-64]), b, n, 2, 32, 0, 1, 2)


def test_act8_error_vs_fp32_is_within_half_a_step():
    """|y - x w| <= sum_k |dx_k| |w_k| with |dx| at most half an int8 step of its group, and the
    typical error is a few per mille of |y|."""
    needs_act8()
    k, n, m = 576, 960, 48
    w, _ = q4_weights(n, k, 3)
    layer = L.LinearWeight(w, None, "wint8", backend=L.NATIVE, act8=True)
    x = activations(m, k)
    x_op = act8(x)
    step = np.repeat(np.abs(x.reshape(m, -1, 32)).max(axis=-1) / 127.0, 32, axis=1)
    assert np.all(np.abs(x_op - x) <= step * (0.5 + 2.0 ** -16))
    got = run(layer, x)
    exact = expected(x, w, None)
    bound = np.abs(x_op - x) @ np.abs(w.astype(np.float64)).T + rounding_bound(x, w)
    check_close(got, exact, bound, "vs fp32")
    assert np.abs(got - exact).max() / np.abs(exact).max() < 1e-2


@pytest.mark.parametrize("with_act8", [False, True], ids=["act16", "act8"])
def test_zero_and_constant_rows(with_act8):
    """A zero row (step 0) and a row of one repeated value quantize without dividing by zero."""
    needs_act8()
    k, n = 96, 40
    w, bias = q4_weights(n, k, 4)
    layer = L.LinearWeight(w, bias, "wint8", backend=L.NATIVE, act8=with_act8)
    x = np.zeros((4, k), dtype=np.float32)
    x[1] = np.float32(-2.5)
    x[3, ::7] = np.float32(1e-30)
    got = run(layer, x)
    x_op = act8(x) if with_act8 else act16(x, 32)  # 4 rows: within four_bit_act16_max_rows
    check_close(got, expected(x_op, w.astype(np.float64), bias), rounding_bound(x, w), "zero rows")
    np.testing.assert_allclose(got[0], bias, rtol=0, atol=1e-6)


def test_act8_is_opt_in_and_8bit_codes_never_take_it(monkeypatch):
    needs_act8()
    w, _ = q4_weights(40, 96, 5)
    monkeypatch.delenv(L.ACT8_ENV, raising=False)
    default = L.LinearWeight(w, None, "wint8", backend=L.NATIVE)
    assert default.four_bit and not default.uses_act8(64) and default.uses_act16(2)
    monkeypatch.setenv(L.ACT8_ENV, "1")
    assert L.LinearWeight(w, None, "wint8", backend=L.NATIVE).uses_act8(64)
    assert not L.LinearWeight(w, None, "wint8", backend=L.NATIVE, act8=False).uses_act8(64)
    assert not L.LinearWeight(w, None, "wint8", backend=L.NATIVE, vnni=False).uses_act8(64)
    assert not L.LinearWeight(w, None, "wint8", backend=L.NATIVE, group_size=16).uses_act8(64)
    assert not L.LinearWeight(activations(40, 96), None, "wint8", backend=L.NATIVE).uses_act8(64)
    monkeypatch.setenv(L.ACT8_ENV, "0")  # 8-bit panels: no 4-bit kernels at all
    off = L.LinearWeight(w, None, "wint8", backend=L.NATIVE, act8=True)
    assert not off.four_bit and not off.uses_act8(64)
