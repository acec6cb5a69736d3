"""Paged attention and the KV-cache write, native (C++ custom op) or plain Paddle.

KV cache, one pair per layer: ``key_cache`` / ``value_cache`` ``[num_blocks, num_kv_heads,
block_size, head_dim]`` of float32 or float16, or int8 rows of ``head_dim + 4`` (codes, then the
float32 step; native/kv_types.h); the token at position ``p`` of a sequence lives in block
``block_tables[seq][p // block_size]`` at offset ``p % block_size``.

Batch (varlen): the queries of all sequences are concatenated; sequence ``i`` owns rows
``query_start_loc[i]:query_start_loc[i+1]``, which are the *last* ``q_len`` positions of its
``context_lens[i]`` cached tokens (this step's keys/values are written first). One call therefore
covers full prefill (q_len == context_len), chunked prefill (q_len < context_len) and decode
(q_len == 1). Query ``j`` at position ``context_len - q_len + j`` attends causally to positions
``0..p``; query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.

Backend: ``FASTDEPLOY_ATTENTION_BACKEND`` = ``native`` | ``reference``. Unset means native when the
extension builds and loads (and tensors live on the CPU), otherwise the reference, with one
warning. The reference is device-generic, so a GPU Paddle build runs it unchanged.
"""
from __future__ import annotations

import functools
import logging
import math
from types import ModuleType

import paddle
import paddle.nn.functional as F

from fastdeploy.model_executor.ops import native_build
from fastdeploy.model_executor.ops.native_build import NativeBuildError, native_num_threads

logger = logging.getLogger("fastdeploy")

BACKEND_ENV = "FASTDEPLOY_ATTENTION_BACKEND"
NATIVE = native_build.NATIVE
REFERENCE = native_build.REFERENCE


# Bytes after an int8 cache row's head_dim codes: its float32 step (kInt8RowExtra in kv_types.h).
INT8_ROW_EXTRA = 4

# Values of the op's `impl` attribute.
_IMPL_AUTO = 0
_IMPL_SCALAR = 1


def native_ops() -> ModuleType:
    """The compiled extension (built on first use); raises NativeBuildError if unavailable."""
    return native_build.native_ops()


@functools.cache
def attention_backend_name() -> str:
    """``native`` or ``reference``, decided once per process."""
    requested = native_build.requested_backend(BACKEND_ENV)
    if requested == REFERENCE:
        return REFERENCE
    try:
        native_ops()
    except NativeBuildError as exc:
        if requested == NATIVE:
            raise
        logger.warning("Native attention ops unavailable, using the plain-Paddle reference: %s",
                       str(exc).splitlines()[0])
        return REFERENCE
    return NATIVE


@functools.cache
def _default_threads() -> int:
    return native_num_threads()


def _use_native(*tensors: paddle.Tensor) -> bool:
    return attention_backend_name() == NATIVE and all(t.place.is_cpu_place() for t in tensors)


def _as_dtype(x: paddle.Tensor, dtype: str) -> paddle.Tensor:
    return x if x.dtype == getattr(paddle, dtype) else x.astype(dtype)


# ------------------------------------------------------------------------------------------------
# Public entry points (the model calls these).


def write_kv_cache(key: paddle.Tensor, value: paddle.Tensor, key_cache: paddle.Tensor,
                   value_cache: paddle.Tensor, slot_mapping: paddle.Tensor) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping`` (int64,
    ``block_id * block_size + offset``; -1 = padding, skipped) in place in the caches."""
    if _use_native(key, key_cache):
        native_write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        reference_write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query: paddle.Tensor, key_cache: paddle.Tensor, value_cache: paddle.Tensor,
                    block_tables: paddle.Tensor, context_lens: paddle.Tensor,
                    query_start_loc: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Causal attention of ``query`` ``[num_tokens, num_heads, head_dim]`` over the paged cache;
    returns ``[num_tokens, num_heads, head_dim]`` float32."""
    if _use_native(query, key_cache):
        return native_paged_attention(query, key_cache, value_cache, block_tables, context_lens,
                                      query_start_loc, scale)
    return reference_paged_attention(query, key_cache, value_cache, block_tables, context_lens,
                                     query_start_loc, scale)


# ------------------------------------------------------------------------------------------------
# Native (C++ custom operator).


def native_write_kv_cache(key: paddle.Tensor, value: paddle.Tensor, key_cache: paddle.Tensor,
                          value_cache: paddle.Tensor, slot_mapping: paddle.Tensor) -> None:
    # The op declares the caches in-place (SetInplaceMap) and writes through their data pointers.
    # Paddle hands a custom op a contiguous *copy* of a strided input, so a write into a view would
    # vanish without an error: refuse it here, where the original tensor is still visible.
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous: the in-place write would land in a copy")
    native_ops().fd_write_kv_cache(key, value, key_cache, value_cache, _as_dtype(slot_mapping, "int64"))


def native_paged_attention(query: paddle.Tensor, key_cache: paddle.Tensor, value_cache: paddle.Tensor,
                           block_tables: paddle.Tensor, context_lens: paddle.Tensor,
                           query_start_loc: paddle.Tensor, scale: float,
                           scalar: bool = False, num_threads: int | None = None) -> paddle.Tensor:
    """``scalar=True`` forces the portable kernel (the one non-AVX-512 hosts run); ``num_threads``
    defaults to native_num_threads()."""
    return native_ops().fd_paged_attention(
        query, key_cache, value_cache, _as_dtype(block_tables, "int32"), _as_dtype(context_lens, "int32"),
        _as_dtype(query_start_loc, "int32"), float(scale), _IMPL_SCALAR if scalar else _IMPL_AUTO,
        num_threads if num_threads is not None else _default_threads())


# ------------------------------------------------------------------------------------------------
# Reference (plain Paddle, any device).


def reference_write_kv_cache(key: paddle.Tensor, value: paddle.Tensor, key_cache: paddle.Tensor,
                             value_cache: paddle.Tensor, slot_mapping: paddle.Tensor) -> None:
    _, num_kv_heads, block_size, _ = key_cache.shape
    slots = _as_dtype(slot_mapping, "int64").flatten()
    keep = paddle.nonzero(slots >= 0).flatten()
    num = int(keep.shape[0])
    if num == 0:
        return
    if num != slots.shape[0]:
        slots, key, value = paddle.gather(slots, keep), paddle.gather(key, keep), paddle.gather(value, keep)
    # One (block, head, offset) index triple per (token, kv head) row.
    blocks = (slots // block_size).unsqueeze(1).expand([num, num_kv_heads]).flatten()
    offsets = (slots % block_size).unsqueeze(1).expand([num, num_kv_heads]).flatten()
    heads = paddle.arange(num_kv_heads, dtype="int64").unsqueeze(0).expand([num, num_kv_heads]).flatten()
    index = (blocks, heads, offsets)
    head_dim = key.shape[-1]
    paddle.index_put_(key_cache, index, cache_rows(key.reshape([num * num_kv_heads, head_dim]), key_cache.dtype))
    paddle.index_put_(value_cache, index,
                      cache_rows(value.reshape([num * num_kv_heads, head_dim]), value_cache.dtype))


def cache_rows(x: paddle.Tensor, dtype: paddle.dtype) -> paddle.Tensor:
    """float32 rows x [..., head_dim] as a cache of `dtype` stores them. int8 rows (native/kv_types.h)
    are head_dim codes round(x / step), step = max |x| / 127, then the bytes of the float32 step."""
    if dtype != paddle.int8:
        return x.astype(dtype)
    max_abs = x.abs().max(axis=-1, keepdim=True)
    step = max_abs / 127.0
    inv = paddle.where(max_abs > 0, 127.0 / max_abs, paddle.zeros_like(max_abs))
    codes = paddle.clip(paddle.round(x * inv), -127.0, 127.0).astype("int8")
    return paddle.concat([codes, paddle.view(step, "int8")], axis=-1)


def _gathered_values(cache: paddle.Tensor, table: paddle.Tensor, head_dim: int) -> paddle.Tensor:
    """_gather_paged's rows as float32 values. Float caches are cast first (Paddle's CPU gather
    has no float16 kernel); int8 rows are gathered first, then widened."""
    if cache.dtype == paddle.int8:
        return cache_row_values(_gather_paged(cache, table), head_dim)
    return _gather_paged(_as_dtype(cache, "float32"), table)


def cache_row_values(rows: paddle.Tensor, head_dim: int) -> paddle.Tensor:
    """float32 values [..., head_dim] of cache rows [..., row] of any cache dtype."""
    if rows.dtype != paddle.int8:
        return _as_dtype(rows, "float32")
    step = paddle.view(rows[..., head_dim:].contiguous(), "float32")
    return rows[..., :head_dim].astype("float32") * step


def _gather_paged(cache: paddle.Tensor, table: paddle.Tensor) -> paddle.Tensor:
    """``[num_seqs, num_kv_heads, n_blocks * block_size, row]``: each sequence's blocks in order.

    Gathers (block, kv head) tiles in the output order directly, so no transpose of the gathered
    K/V is needed (Paddle's CPU transpose of a large 5-D tensor costs more than the whole gather)."""
    num_seqs, n_blocks = table.shape
    num_blocks, num_kv_heads, block_size, row = cache.shape
    heads = paddle.arange(num_kv_heads, dtype="int64").reshape([1, num_kv_heads, 1])
    tiles = table.unsqueeze(1) * num_kv_heads + heads  # [num_seqs, num_kv_heads, n_blocks]
    rows = paddle.gather(cache.reshape([num_blocks * num_kv_heads, block_size, row]), tiles.flatten())
    return rows.reshape([num_seqs, num_kv_heads, n_blocks * block_size, row])


def reference_paged_attention(query: paddle.Tensor, key_cache: paddle.Tensor, value_cache: paddle.Tensor,
                              block_tables: paddle.Tensor, context_lens: paddle.Tensor,
                              query_start_loc: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Dense masked attention per sequence: pad every sequence's queries to the longest q_len and its
    keys to the longest context, then one batched matmul-softmax-matmul."""
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, num_kv_heads, block_size, _ = key_cache.shape
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return paddle.zeros([num_tokens, num_heads, head_dim], dtype="float32")
    group = num_heads // num_kv_heads
    starts = _as_dtype(query_start_loc, "int64")
    ctx = _as_dtype(context_lens, "int64")
    q_lens = starts[1:] - starts[:-1]
    # Padded sizes must be Python ints: one small device-to-host read per call.
    max_q = int(q_lens.max())
    n_blocks = max(1, math.ceil(int(ctx.max()) / block_size))
    max_keys = n_blocks * block_size

    # Entries past a sequence's context may hold anything: clamp so the gather stays in range;
    # what they fetch is masked below.
    table = _as_dtype(block_tables[:, :n_blocks], "int64").clip(0, num_blocks - 1)
    keys = _gathered_values(key_cache, table, head_dim)
    values = _gathered_values(value_cache, table, head_dim)
    key_pos = paddle.arange(max_keys, dtype="int64")
    in_context = (key_pos.unsqueeze(0) < ctx.unsqueeze(1))  # [num_seqs, max_keys]
    # Masked probabilities are 0, but 0 * NaN from never-written cache memory is not.
    values = paddle.where(in_context[:, None, :, None], values, paddle.zeros([], dtype="float32"))

    # Scatter the flat queries into [num_seqs * max_q] padded rows.
    token = paddle.arange(num_tokens, dtype="int64")
    seq_of_token = paddle.searchsorted(starts[1:], token, right=True)
    row = seq_of_token * max_q + (token - paddle.gather(starts, seq_of_token))
    padded = paddle.scatter(paddle.zeros([num_seqs * max_q, num_heads, head_dim], dtype="float32"),
                            row, _as_dtype(query, "float32"), overwrite=True)
    q = padded.reshape([num_seqs, max_q, num_kv_heads, group, head_dim]).transpose([0, 2, 3, 1, 4])
    q = q.reshape([num_seqs, num_kv_heads, group * max_q, head_dim])

    q_pos = (ctx - q_lens).unsqueeze(1) + paddle.arange(max_q, dtype="int64").unsqueeze(0)  # [num_seqs, max_q]
    visible = (key_pos[None, None, :] <= q_pos[:, :, None]) & in_context[:, None, :]
    visible = visible[:, None, None]  # [num_seqs, 1, 1, max_q, max_keys]
    # Scale the (small) queries rather than the (large) scores.
    scores = paddle.matmul(q * scale, keys, transpose_y=True)
    scores = scores.reshape([num_seqs, num_kv_heads, group, max_q, max_keys])
    scores = paddle.where(visible, scores, paddle.full([], float("-inf"), dtype="float32"))
    # Paddle's CPU softmax floors every weight at ~1.6e-28 (it clamps shifted logits near -64), so
    # masked keys are zeroed explicitly. Padded query rows are computed too and dropped by the gather.
    probs = paddle.where(visible, F.softmax(scores, axis=-1), paddle.zeros([], dtype="float32"))
    probs = probs.reshape([num_seqs, num_kv_heads, group * max_q, max_keys])

    out = paddle.matmul(probs, values).reshape([num_seqs, num_kv_heads, group, max_q, head_dim])
    out = out.transpose([0, 3, 1, 2, 4]).reshape([num_seqs * max_q, num_heads, head_dim])
    return paddle.gather(out, row)
