"""Fused RMSNorm (+ residual add) and SiLU gate, native (``native/norm.cc``) or plain Paddle.

Both live in the linear layers' extension and follow its backend choice
(:func:`fastdeploy.model_executor.layers.linear.linear_backend_name`): one build, one switch.

Residual stream convention (as in vLLM): a layer hands its sublayer output and the running residual
to the next norm, which adds them and normalizes the sum in one pass::

    h, residual = rms_norm(x, w_in, eps)                 # first layer: residual = x
    h, residual = rms_norm(attn_out, w_post, eps, residual)
    h, residual = rms_norm(mlp_out, w_next_in, eps, residual)
"""
from __future__ import annotations

import functools

import paddle
import paddle.nn.functional as F

from fastdeploy.model_executor.layers import linear as _linear


@functools.cache
def _native() -> tuple | None:
    """(rms_norm op, silu_mul op, empty residual, threads) when the native backend is in use."""
    if _linear.linear_backend_name() != _linear.NATIVE:
        return None
    ops = _linear.native_ops()
    return ops.fd_rms_norm, ops.fd_silu_mul, paddle.zeros([0], dtype="float32"), _linear.native_num_threads()


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float,
             residual: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``v = x + residual`` (``x`` when there is none); returns ``(v / sqrt(mean(v^2) + eps) * weight, v)``
    over the last axis. float32 in, float32 out."""
    native = _native()
    if native is None:
        return reference_rms_norm(x, weight, eps, residual)
    op, _, empty, threads = native
    shape = x.shape
    x2 = x if x.ndim == 2 else x.reshape([-1, shape[-1]])
    if residual is None:
        out, _ = op(x2, weight, empty, float(eps), threads)
        return (out if x.ndim == 2 else out.reshape(shape)), x
    r2 = residual if residual.ndim == 2 else residual.reshape([-1, shape[-1]])
    out, summed = op(x2, weight, r2, float(eps), threads)
    if x.ndim != 2:
        out, summed = out.reshape(shape), summed.reshape(shape)
    return out, summed


def silu_mul(x: paddle.Tensor) -> paddle.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for the fused gate|up projection ``x [..., 2I]``."""
    native = _native()
    if native is None:
        return reference_silu_mul(x)
    _, op, _, threads = native
    if x.ndim == 2:
        return op(x, threads)
    shape = x.shape
    return op(x.reshape([-1, shape[-1]]), threads).reshape([*shape[:-1], shape[-1] // 2])


def reference_rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float,
                       residual: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    v = x if residual is None else x + residual
    variance = paddle.mean(v * v, axis=-1, keepdim=True)
    return v * paddle.rsqrt(variance + eps) * weight, v


def reference_silu_mul(x: paddle.Tensor) -> paddle.Tensor:
    gate, up = paddle.chunk(x, 2, axis=-1)
    return F.silu(gate) * up
