"""Fused RMSNorm (+ residual add) and SiLU gate, native (``native/norm.cc``) or plain Paddle.

They live in the linear layers' extension and follow its backend choice
(:func:`fastdeploy.model_executor.layers.linear.linear_backend_name`): one build, one switch.

Residual stream convention (as in vLLM): a layer hands its sublayer output and the running residual
to the next norm, which adds them and normalizes the sum in one pass::

    h, residual = rms_norm(x, w_in, eps)                 # first layer: residual = x
    h, residual = rms_norm(attn_out, w_post, eps, residual)
    h, residual = rms_norm(mlp_out, w_next_in, eps, residual)

``rms_norm_linear`` also runs the linear layer that consumes the normalized rows (qkv after the
input norm, gate_up after the post-attention norm, the lm_head after the final norm) in the same op.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import paddle
import paddle.nn.functional as F

from fastdeploy.model_executor.layers import linear as _linear


class _NativeOps(NamedTuple):
    rms_norm: Callable
    silu_mul: Callable
    rms_norm_linear: Callable
    empty: paddle.Tensor  # stands for "no residual": an optional input costs ~10 us more per call
    threads: int


@functools.cache
def _native() -> _NativeOps | None:
    """The native ops when the native backend is in use, else None."""
    if _linear.linear_backend_name() != _linear.NATIVE:
        return None
    ops = _linear.native_ops()
    return _NativeOps(ops.fd_rms_norm, ops.fd_silu_mul, ops.fd_rms_norm_linear, paddle.zeros([0], dtype="float32"),
                      _linear.native_num_threads())


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float,
             residual: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``v = x + residual`` (``x`` when there is none); returns ``(v / sqrt(mean(v^2) + eps) * weight, v)``
    over the last axis. float32 in, float32 out."""
    native = _native()
    if native is None:
        return reference_rms_norm(x, weight, eps, residual)
    shape = x.shape
    x2 = x if x.ndim == 2 else x.reshape([-1, shape[-1]])
    if residual is None:
        out, _ = native.rms_norm(x2, weight, native.empty, float(eps), native.threads)
        return (out if x.ndim == 2 else out.reshape(shape)), x
    r2 = residual if residual.ndim == 2 else residual.reshape([-1, shape[-1]])
    out, summed = native.rms_norm(x2, weight, r2, float(eps), native.threads)
    if x.ndim != 2:
        out, summed = out.reshape(shape), summed.reshape(shape)
    return out, summed


def rms_norm_linear(x: paddle.Tensor, weight: paddle.Tensor, eps: float, linear: _linear.LinearWeight,
                    residual: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``linear(rms_norm(x, weight, eps, residual)[0])`` and the new residual: one native op
    instead of two (a decode step has two per layer plus the lm_head)."""
    native = _native()
    args = linear.native_args
    if native is None or args is None or x.ndim != 2:
        h, summed = rms_norm(x, weight, eps, residual)
        return linear(h), summed
    packed, bias, n, fmt, group, dot_rows, vnni, threads = args
    y, summed = native.rms_norm_linear(x, weight, residual if residual is not None else native.empty, packed, bias,
                                       float(eps), n, fmt, group, dot_rows, vnni, threads)
    return y, (summed if residual is not None else x)


def silu_mul(x: paddle.Tensor) -> paddle.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for the fused gate|up projection ``x [..., 2I]``."""
    native = _native()
    if native is None:
        return reference_silu_mul(x)
    if x.ndim == 2:
        return native.silu_mul(x, native.threads)
    shape = x.shape
    return native.silu_mul(x.reshape([-1, shape[-1]]), native.threads).reshape([*shape[:-1], shape[-1] // 2])


def reference_rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float,
                       residual: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    v = x if residual is None else x + residual
    variance = paddle.mean(v * v, axis=-1, keepdim=True)
    return v * paddle.rsqrt(variance + eps) * weight, v


def reference_silu_mul(x: paddle.Tensor) -> paddle.Tensor:
    gate, up = paddle.chunk(x, 2, axis=-1)
    return F.silu(gate) * up
