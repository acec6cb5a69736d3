"""Rotary embedding of q and k fused with the KV-cache write, native (``native/rotary_kv.cc``) or plain Paddle.

A decoder layer's attention is ``qkv = linear(x)`` → :func:`rotary_write_kv` → paged attention:
the fused projection ``qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]`` goes in, the
rotated queries ``[num_tokens, num_heads, head_dim]`` come out, and the rotated keys and the values
land in the paged cache at ``slot_mapping`` (layout and padding rules as in
:mod:`fastdeploy.model_executor.ops.paged_attention`).

The native op lives in the attention extension and follows its backend choice
(:func:`~fastdeploy.model_executor.ops.paged_attention.attention_backend_name`): on the native backend
with CPU float32 tensors one call replaces the ~12 Paddle ops of the reference; anywhere else (a GPU
build, ``FASTDEPLOY_ATTENTION_BACKEND=reference``) the reference runs, unchanged from before the fusion.
Both round every product and sum as HF transformers does, so they agree bit for bit.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import paddle

from fastdeploy.model_executor.layers.rotary import RotaryEmbedding
from fastdeploy.model_executor.ops import paged_attention as attn_ops


@functools.cache
def _native_op() -> Callable:
    # Looked up once: native_ops() takes the extension loader's lock on every call.
    return attn_ops.native_ops().fd_rotary_kv


def native_applies(rotary: RotaryEmbedding, key_cache: paddle.Tensor) -> bool:
    """Whether :func:`native_rotary_write_kv` can serve this model's layers (decided per forward:
    the answer depends only on the backend, the devices and the dtypes)."""
    return (attn_ops.attention_backend_name() == attn_ops.NATIVE and key_cache.place.is_cpu_place()
            and rotary.cos.place.is_cpu_place() and key_cache.dtype in (paddle.float32, paddle.float16, paddle.int8))


def rotary_write_kv(qkv: paddle.Tensor, positions: paddle.Tensor, rotary: RotaryEmbedding,
                    key_cache: paddle.Tensor, value_cache: paddle.Tensor, slot_mapping: paddle.Tensor,
                    num_heads: int, num_kv_heads: int) -> paddle.Tensor:
    """Rotate q and k of ``qkv`` at ``positions``, store k and v at ``slot_mapping``; returns q.

    The model calls the two halves directly (it decides once per forward and shares the reference's
    angles between layers); this is the one-call form for everything else."""
    if native_applies(rotary, key_cache):
        return native_rotary_write_kv(qkv, positions, rotary, key_cache, value_cache, slot_mapping,
                                      num_heads, num_kv_heads)
    return reference_rotary_write_kv(qkv, rotary.angles(positions), rotary, key_cache, value_cache, slot_mapping,
                                     num_heads, num_kv_heads)


def native_rotary_write_kv(qkv: paddle.Tensor, positions: paddle.Tensor, rotary: RotaryEmbedding,
                           key_cache: paddle.Tensor, value_cache: paddle.Tensor, slot_mapping: paddle.Tensor,
                           num_heads: int, num_kv_heads: int, num_threads: int | None = None) -> paddle.Tensor:
    """One native call; ``positions`` and ``slot_mapping`` must be int64 (ForwardBatch's dtypes)."""
    # The caches are in-place inputs: Paddle would hand the op a contiguous *copy* of a strided
    # view and the write would vanish, so refuse views here, where the original is still visible.
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous: the in-place write would land in a copy")
    q, _, _ = _native_op()(
        qkv, positions, rotary.cos, rotary.sin, key_cache, value_cache, slot_mapping, num_heads, num_kv_heads,
        rotary.interleaved, num_threads if num_threads is not None else attn_ops._default_threads())
    return q


def reference_rotary_write_kv(qkv: paddle.Tensor, angles: tuple[paddle.Tensor, paddle.Tensor],
                              rotary: RotaryEmbedding, key_cache: paddle.Tensor, value_cache: paddle.Tensor,
                              slot_mapping: paddle.Tensor, num_heads: int, num_kv_heads: int) -> paddle.Tensor:
    """Plain Paddle on any device; ``angles`` = ``rotary.angles(positions)`` (shared by all layers)."""
    num_tokens = qkv.shape[0]
    heads = qkv.reshape([num_tokens, num_heads + 2 * num_kv_heads, rotary.head_dim])
    qk, v = paddle.split(heads, [num_heads + num_kv_heads, num_kv_heads], axis=1)
    qk = rotary(qk, *angles)  # q and k heads rotated in one pass
    q, k = paddle.split(qk, [num_heads, num_kv_heads], axis=1)
    attn_ops.write_kv_cache(k, v, key_cache, value_cache, slot_mapping)
    return q
