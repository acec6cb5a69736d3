"""Paged attention and KV-cache writes: reference vs dense numpy, native vs reference.

The paged cache is filled from dense per-sequence K/V through shuffled block tables, and every
cache slot no sequence owns holds NaN, so reading anything outside a sequence's context shows up.
Native tests skip when the extension cannot be built, unless FASTDEPLOY_REQUIRE_NATIVE is set
(CI sets it, so there a broken build fails).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import paddle
import pytest

from fastdeploy.model_executor.ops import native_build
from fastdeploy.model_executor.ops import paged_attention as attn

CONTEXT_LENS = (1, 5, 64, 130, 300)
# q_len per sequence for each scenario (same order as CONTEXT_LENS).
SCENARIOS = {
    "prefill": (1, 5, 64, 130, 300),   # q_len == context_len
    "chunked": (1, 2, 17, 50, 128),    # last chunk of a longer prompt (ctx 1 can only be a full prefill)
    "decode": (1, 1, 1, 1, 1),
    "mixed": (1, 5, 1, 40, 1),         # prefill, prefill, decode, chunk, decode
}
HEADS = {"gqa_9_3": (9, 3, 64), "mha_4_4": (4, 4, 64)}


@dataclass
class Case:
    query: np.ndarray           # [num_tokens, num_heads, head_dim]
    keys: list[np.ndarray]      # per sequence, dense [context_len, num_kv_heads, head_dim]
    values: list[np.ndarray]
    key_cache: np.ndarray       # paged, NaN outside every sequence's context
    value_cache: np.ndarray
    block_tables: np.ndarray    # int32, shuffled, unused entries = `fill`
    context_lens: np.ndarray    # int32
    query_start_loc: np.ndarray  # int32
    scale: float

    def tensors(self) -> tuple:
        return (paddle.to_tensor(self.query), paddle.to_tensor(self.key_cache), paddle.to_tensor(self.value_cache),
                paddle.to_tensor(self.block_tables), paddle.to_tensor(self.context_lens),
                paddle.to_tensor(self.query_start_loc), self.scale)


def make_case(context_lens, q_lens, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              seed: int = 0, unused_entry: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    order = rng.permutation(num_blocks)
    tables = np.full((len(context_lens), max(blocks_per_seq) + 2), unused_entry, dtype=np.int32)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    key_cache = np.full(shape, np.nan, dtype=np.float32)
    value_cache = np.full(shape, np.nan, dtype=np.float32)
    keys, values, used = [], [], 0
    for s, ctx in enumerate(context_lens):
        tables[s, :blocks_per_seq[s]] = order[used:used + blocks_per_seq[s]]
        used += blocks_per_seq[s]
        k = rng.standard_normal((ctx, num_kv_heads, head_dim), dtype=np.float32)
        v = rng.standard_normal((ctx, num_kv_heads, head_dim), dtype=np.float32)
        for pos in range(ctx):
            block = tables[s, pos // block_size]
            key_cache[block, :, pos % block_size] = k[pos]
            value_cache[block, :, pos % block_size] = v[pos]
        keys.append(k)
        values.append(v)
    starts = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=starts[1:])
    query = rng.standard_normal((int(starts[-1]), num_heads, head_dim), dtype=np.float32)
    return Case(query, keys, values, key_cache, value_cache, tables, np.asarray(context_lens, dtype=np.int32),
                starts, 1.0 / np.sqrt(head_dim))


def dense_attention(case: Case) -> np.ndarray:
    """Textbook causal attention in float64 on the un-paged K/V, one query at a time."""
    num_tokens, num_heads, head_dim = case.query.shape
    num_kv_heads = case.keys[0].shape[1]
    group = num_heads // num_kv_heads
    out = np.zeros((num_tokens, num_heads, head_dim))
    for s, ctx in enumerate(case.context_lens):
        begin, end = case.query_start_loc[s], case.query_start_loc[s + 1]
        q_len = end - begin
        k, v = case.keys[s].astype(np.float64), case.values[s].astype(np.float64)
        for j in range(q_len):
            pos = ctx - q_len + j
            for h in range(num_heads):
                scores = k[: pos + 1, h // group] @ case.query[begin + j, h].astype(np.float64) * case.scale
                weights = np.exp(scores - scores.max())
                out[begin + j, h] = weights @ v[: pos + 1, h // group] / weights.sum()
    return out


def case_params():
    for scenario, q_lens in SCENARIOS.items():
        for heads_name, heads in HEADS.items():
            for block_size in (16, 64):
                yield pytest.param(q_lens, heads, block_size, id=f"{scenario}-{heads_name}-bs{block_size}")


@pytest.mark.parametrize("q_lens, heads, block_size", list(case_params()))
def test_reference_matches_dense(q_lens, heads, block_size):
    case = make_case(CONTEXT_LENS, q_lens, *heads, block_size)
    with paddle.no_grad():
        got = attn.reference_paged_attention(*case.tensors()).numpy()
    assert got.shape == case.query.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, dense_attention(case), rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_lens, heads, block_size", list(case_params()))
def test_native_matches_reference(native, q_lens, heads, block_size):
    case = make_case(CONTEXT_LENS, q_lens, *heads, block_size, seed=1)
    with paddle.no_grad():
        expected = attn.reference_paged_attention(*case.tensors()).numpy()
        fast = attn.native_paged_attention(*case.tensors()).numpy()
        portable = attn.native_paged_attention(*case.tensors(), scalar=True).numpy()
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(portable, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_native_thread_count_does_not_change_results(native, num_threads):
    case = make_case(CONTEXT_LENS, SCENARIOS["mixed"], 9, 3, 64, block_size=16, seed=7)
    with paddle.no_grad():
        expected = attn.reference_paged_attention(*case.tensors()).numpy()
        for scalar in (False, True):
            got = attn.native_paged_attention(*case.tensors(), scalar=scalar, num_threads=num_threads).numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [
    (32, 2, 32),   # group of 16 heads: one token per tile
    (40, 2, 16),   # group of 20 heads: split into 16 + 4 head slices
    (6, 2, 40),    # head_dim not a multiple of 16: portable kernel with AVX-512, 8-lane tiles with AVX2
    (8, 1, 128),   # MQA, wide heads
    (4, 2, 64),    # group of 2: two-row narrow (lanes along head_dim) decode tiles
    (2, 2, 24),    # MHA, head_dim of 3 or 1.5 vectors
])
def test_native_unusual_shapes(native, num_heads, num_kv_heads, head_dim):
    case = make_case((7, 33, 90), (7, 4, 1), num_heads, num_kv_heads, head_dim, block_size=16, seed=2)
    with paddle.no_grad():
        expected = attn.reference_paged_attention(*case.tensors()).numpy()
        got = attn.native_paged_attention(*case.tensors()).numpy()
    np.testing.assert_allclose(expected, dense_attention(case), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_unused_block_table_entries_are_ignored(native):
    """Entries past a sequence's blocks may hold anything (here out-of-range ids)."""
    case = make_case(CONTEXT_LENS, SCENARIOS["mixed"], 9, 3, 64, block_size=16, seed=3, unused_entry=1 << 30)
    with paddle.no_grad():
        expected = attn.reference_paged_attention(*case.tensors()).numpy()
        got = attn.native_paged_attention(*case.tensors()).numpy()
    np.testing.assert_allclose(expected, dense_attention(case), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "native", "native-scalar"])
def test_future_keys_get_exactly_zero_weight(request, impl):
    """Query 0 must not see position 1 at all, even when that value is enormous."""
    if impl != "reference":
        request.getfixturevalue("native")
    key_cache = np.zeros((2, 1, 16, 16), np.float32)
    value_cache = np.zeros_like(key_cache)
    value_cache[0, 0, 1] = 1e30
    args = (paddle.to_tensor(np.zeros((2, 1, 16), np.float32)), paddle.to_tensor(key_cache),
            paddle.to_tensor(value_cache), paddle.to_tensor(np.array([[0, 1]], np.int32)),
            paddle.to_tensor(np.array([2], np.int32)), paddle.to_tensor(np.array([0, 2], np.int32)), 1.0)
    if impl == "reference":
        out = attn.reference_paged_attention(*args).numpy()
    else:
        out = attn.native_paged_attention(*args, scalar=impl == "native-scalar").numpy()
    assert np.all(out[0] == 0.0)
    np.testing.assert_allclose(out[1], 5e29, rtol=1e-6)


def test_strided_query_and_key_views(native):
    """The model splits q/k/v out of one fused projection; the views it gets may be strided."""
    case = make_case(CONTEXT_LENS, SCENARIOS["mixed"], 9, 3, 64, block_size=16, seed=8)
    num_tokens = case.query.shape[0]
    rng = np.random.default_rng(8)
    fused = paddle.to_tensor(np.concatenate([case.query, rng.standard_normal((num_tokens, 6, 64), dtype=np.float32)],
                                            axis=1))
    query, new_k, new_v = paddle.split(fused, [9, 3, 3], axis=1)
    args = case.tensors()
    with paddle.no_grad():
        got = attn.native_paged_attention(query, *args[1:]).numpy()
        np.testing.assert_allclose(got, attn.reference_paged_attention(*args).numpy(), rtol=0, atol=1e-4)
        slots = paddle.arange(num_tokens, dtype="int64")
        caches = {impl: (paddle.zeros(args[1].shape), paddle.zeros(args[1].shape)) for impl in ("native", "ref")}
        attn.native_write_kv_cache(new_k, new_v, *caches["native"], slots)
        attn.reference_write_kv_cache(new_k, new_v, *caches["ref"], slots)
    for got_cache, want_cache in zip(caches["native"], caches["ref"]):
        np.testing.assert_array_equal(got_cache.numpy(), want_cache.numpy())
    np.testing.assert_array_equal(caches["native"][0].numpy()[0, :, 0], new_k.numpy()[0])


def as_float16_cache(case: Case) -> Case:
    """The same case with float16 caches; the dense K/V become the values the cache now holds."""
    def rounded(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [x.astype(np.float16).astype(np.float32) for x in xs]

    return replace(case, key_cache=case.key_cache.astype(np.float16), value_cache=case.value_cache.astype(np.float16),
                   keys=rounded(case.keys), values=rounded(case.values))


def int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., D] as int8 cache rows [..., D + 4] (native/kv_types.h: codes round(x / step), halves
    away from zero, step = max |x| / 127, then the step's float32 bytes) and the values they hold."""
    max_abs = np.abs(x).max(axis=-1, keepdims=True)
    step = max_abs / np.float32(127.0)
    inv = np.where(max_abs > 0, np.float32(127.0) / np.where(max_abs > 0, max_abs, 1), 0).astype(np.float32)
    y = x * inv
    ties = np.abs(y - np.trunc(y)) == 0.5
    codes = np.clip(np.where(ties, np.trunc(y) + np.sign(y), np.round(y)), -127, 127).astype(np.int8)
    return np.concatenate([codes, step.astype(np.float32).view(np.int8)], axis=-1), codes * step


def as_int8_cache(case: Case) -> Case:
    """The same case with int8 caches; the dense K/V become the values the cache now holds. Rows no
    sequence owns carry a NaN step, so reading one shows up as NaN as in the float caches."""
    def paged(cache: np.ndarray) -> np.ndarray:
        rows, _ = int8_rows(np.nan_to_num(cache))
        unused = np.isnan(cache).any(axis=-1)
        rows[unused, -4:] = np.full(int(unused.sum()), np.nan, dtype=np.float32).view(np.int8).reshape(-1, 4)
        return rows

    return replace(case, key_cache=paged(case.key_cache), value_cache=paged(case.value_cache),
                   keys=[int8_rows(k)[1] for k in case.keys], values=[int8_rows(v)[1] for v in case.values])


@pytest.mark.parametrize("convert", [as_float16_cache, as_int8_cache], ids=["float16", "int8"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 1, 128), (6, 2, 40)], ids=["gqa", "mqa", "d40"])
def test_native_float16_and_int8_caches(native, scenario, heads, convert):
    """Float16 and int8 caches: the narrow, wide and scalar kernels (and the reference) widen what
    the cache holds (int8 codes times their row's step) and compute in fp32, so they match textbook
    attention over the values the cache holds to fp32 accuracy."""
    case = convert(make_case(CONTEXT_LENS, SCENARIOS[scenario], *heads, block_size=16, seed=5))
    want = dense_attention(case)
    with paddle.no_grad():
        reference = attn.reference_paged_attention(*case.tensors()).numpy()
        fast = attn.native_paged_attention(*case.tensors(), num_threads=2).numpy()
        portable = attn.native_paged_attention(*case.tensors(), scalar=True).numpy()
    for got in (reference, fast, portable):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_native_refuses_int8_rows_without_their_step(native):
    case = make_case((20,), (1,), 4, 4, 64, block_size=16)
    q, k, v, *rest = case.tensors()
    with pytest.raises(Exception, match="cache rows hold 64 elements, not the 68"):
        attn.native_paged_attention(q, k.astype("int8"), v.astype("int8"), *rest)


def test_native_refuses_mixed_cache_dtypes(native):
    case = make_case((20,), (1,), 4, 4, 64, block_size=16)
    q, k, v, *rest = case.tensors()
    with pytest.raises(Exception, match="must both be float32, both float16 or both int8"):
        attn.native_paged_attention(q, k.astype("float16"), v, *rest)


def test_native_rejects_block_id_outside_cache(native):
    case = make_case((20,), (20,), 4, 4, 64, block_size=16)
    case.block_tables[0, 1] = case.key_cache.shape[0]
    with pytest.raises(Exception, match="outside"):
        attn.native_paged_attention(*case.tensors())


def test_native_works_with_grad_enabled(native):
    """Outside no_grad, with a query that requires grad, the op still runs (no backward is defined)."""
    case = make_case((5, 64), (5, 1), 9, 3, 64, block_size=16)
    args = case.tensors()
    args[0].stop_gradient = False
    got = attn.native_paged_attention(*args).numpy()
    np.testing.assert_allclose(got, dense_attention(case), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# KV-cache writes.


def write_inputs(seed: int = 0, block_size: int = 16):
    rng = np.random.default_rng(seed)
    num_blocks, num_kv_heads, head_dim = 6, 3, 64
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    base_k = rng.standard_normal(shape, dtype=np.float32)
    base_v = rng.standard_normal(shape, dtype=np.float32)
    slots = rng.permutation(num_blocks * block_size)[:10].astype(np.int64)
    slots[[2, 7]] = -1  # padding tokens
    key = rng.standard_normal((10, num_kv_heads, head_dim), dtype=np.float32)
    value = rng.standard_normal((10, num_kv_heads, head_dim), dtype=np.float32)
    return base_k, base_v, key, value, slots


def expected_write(base_k, base_v, key, value, slots):
    block_size = base_k.shape[2]
    k, v = base_k.copy(), base_v.copy()
    for t, slot in enumerate(slots):
        if slot >= 0:
            k[slot // block_size, :, slot % block_size] = key[t]
            v[slot // block_size, :, slot % block_size] = value[t]
    return k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_write_kv_cache_in_place(request, impl, block_size, dtype):
    """Into float32 caches as they are; into float16 caches each value rounded to nearest (numpy's
    float16 conversion), bit for bit."""
    if impl == "native":
        request.getfixturevalue("native")
    write = attn.native_write_kv_cache if impl == "native" else attn.reference_write_kv_cache
    base_k, base_v, key, value, slots = write_inputs(block_size=block_size)
    base_k, base_v = base_k.astype(dtype), base_v.astype(dtype)
    key_cache, value_cache = paddle.to_tensor(base_k), paddle.to_tensor(base_v)
    k_ptr, v_ptr = key_cache.data_ptr(), value_cache.data_ptr()
    with paddle.no_grad():
        result = write(paddle.to_tensor(key), paddle.to_tensor(value), key_cache, value_cache, paddle.to_tensor(slots))
    assert result is None
    assert key_cache.data_ptr() == k_ptr and value_cache.data_ptr() == v_ptr
    want_k, want_v = expected_write(base_k, base_v, key.astype(dtype), value.astype(dtype), slots)
    assert key_cache.numpy().dtype == dtype
    np.testing.assert_array_equal(key_cache.numpy(), want_k)
    np.testing.assert_array_equal(value_cache.numpy(), want_v)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_write_kv_cache_int8_rows(request, impl):
    """Into int8 caches each row as its codes and step (kv_types.h), bit for bit as int8_rows
    computes them; padding slots and other rows untouched."""
    if impl == "native":
        request.getfixturevalue("native")
    write = attn.native_write_kv_cache if impl == "native" else attn.reference_write_kv_cache
    base_k, base_v, key, value, slots = write_inputs(seed=2)
    base_k, base_v = int8_rows(base_k)[0], int8_rows(base_v)[0]
    key_cache, value_cache = paddle.to_tensor(base_k), paddle.to_tensor(base_v)
    with paddle.no_grad():
        write(paddle.to_tensor(key), paddle.to_tensor(value), key_cache, value_cache, paddle.to_tensor(slots))
    want_k, want_v = expected_write(base_k, base_v, int8_rows(key)[0], int8_rows(value)[0], slots)
    np.testing.assert_array_equal(key_cache.numpy(), want_k)
    np.testing.assert_array_equal(value_cache.numpy(), want_v)
    held = attn.cache_row_values(key_cache, key.shape[-1]).numpy()
    block_size = base_k.shape[2]
    for t, slot in enumerate(slots):
        if slot >= 0:
            row = held[slot // block_size, :, slot % block_size]
            assert (np.abs(row - key[t]) <= np.abs(key[t]).max(axis=-1, keepdims=True) / 254 * 1.0001).all()


def test_write_kv_cache_native_equals_reference(native):
    base_k, base_v, key, value, slots = write_inputs(seed=4)
    caches = {name: (paddle.to_tensor(base_k), paddle.to_tensor(base_v)) for name in ("native", "reference")}
    attn.native_write_kv_cache(paddle.to_tensor(key), paddle.to_tensor(value), *caches["native"], paddle.to_tensor(slots))
    attn.reference_write_kv_cache(paddle.to_tensor(key), paddle.to_tensor(value), *caches["reference"],
                                  paddle.to_tensor(slots))
    for got, want in zip(caches["native"], caches["reference"]):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_write_kv_cache_all_padding_is_a_no_op(request, impl):
    if impl == "native":
        request.getfixturevalue("native")
    write = attn.native_write_kv_cache if impl == "native" else attn.reference_write_kv_cache
    base_k, base_v, key, value, _ = write_inputs(seed=5)
    key_cache, value_cache = paddle.to_tensor(base_k), paddle.to_tensor(base_v)
    write(paddle.to_tensor(key), paddle.to_tensor(value), key_cache, value_cache,
          paddle.full([key.shape[0]], -1, dtype="int64"))
    np.testing.assert_array_equal(key_cache.numpy(), base_k)
    np.testing.assert_array_equal(value_cache.numpy(), base_v)


def test_native_write_refuses_a_strided_cache(native):
    """Paddle would hand the op a contiguous copy of a view, so the write would silently vanish."""
    base_k, base_v, key, value, slots = write_inputs()
    wide = paddle.to_tensor(np.concatenate([base_k, base_k], axis=-1))
    view = wide[..., : base_k.shape[-1]]
    with pytest.raises(ValueError, match="contiguous"):
        attn.native_write_kv_cache(paddle.to_tensor(key), paddle.to_tensor(value), view, paddle.to_tensor(base_v),
                                   paddle.to_tensor(slots))


def test_native_write_rejects_slot_outside_cache(native):
    base_k, base_v, key, value, slots = write_inputs()
    slots[0] = base_k.shape[0] * base_k.shape[2]
    with pytest.raises(Exception, match="outside"):
        attn.native_write_kv_cache(paddle.to_tensor(key), paddle.to_tensor(value), paddle.to_tensor(base_k),
                                   paddle.to_tensor(base_v), paddle.to_tensor(slots))


# ------------------------------------------------------------------------------------------------
# The engine's sequence of calls: write this step's K/V, then attend, reusing the same caches.


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_steps_through_public_api(request, monkeypatch, backend):
    if backend == "native":
        request.getfixturevalue("native")
    monkeypatch.setattr(attn, "attention_backend_name", lambda: backend)
    rng = np.random.default_rng(6)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, 16, 24
    key_cache = paddle.zeros([num_blocks, num_kv_heads, block_size, head_dim])
    value_cache = paddle.zeros([num_blocks, num_kv_heads, block_size, head_dim])
    order = rng.permutation(num_blocks)
    tables = [list(order[:8]), list(order[8:16])]
    dense_k = [np.zeros((0, num_kv_heads, head_dim), np.float32) for _ in range(2)]
    dense_v = [np.zeros((0, num_kv_heads, head_dim), np.float32) for _ in range(2)]
    # (new tokens of seq 0, new tokens of seq 1) per step: chunked prefill, then mixed, then decode.
    steps = [(37, 20), (30, 1), (1, 1), (1, 45)]
    table_arr = paddle.to_tensor(np.asarray(tables, dtype=np.int32))
    with paddle.no_grad():
        for step in steps:
            q_parts, slots, ctx = [], [], []
            for s, n in enumerate(step):
                start = dense_k[s].shape[0]
                k = rng.standard_normal((n, num_kv_heads, head_dim), dtype=np.float32)
                v = rng.standard_normal((n, num_kv_heads, head_dim), dtype=np.float32)
                dense_k[s] = np.concatenate([dense_k[s], k])
                dense_v[s] = np.concatenate([dense_v[s], v])
                slots += [tables[s][p // block_size] * block_size + p % block_size for p in range(start, start + n)]
                q_parts.append(rng.standard_normal((n, num_heads, head_dim), dtype=np.float32))
                ctx.append(start + n)
            slots.insert(step[0], -1)  # a padding token in the middle of the batch
            new_k = np.concatenate([dense_k[s][-n:] for s, n in enumerate(step)])
            new_v = np.concatenate([dense_v[s][-n:] for s, n in enumerate(step)])
            pad = np.zeros((1, num_kv_heads, head_dim), np.float32)
            new_k = np.concatenate([new_k[: step[0]], pad + 7, new_k[step[0]:]])
            new_v = np.concatenate([new_v[: step[0]], pad + 7, new_v[step[0]:]])
            attn.write_kv_cache(paddle.to_tensor(new_k), paddle.to_tensor(new_v), key_cache, value_cache,
                                paddle.to_tensor(np.asarray(slots, dtype=np.int64)))
            query = np.concatenate(q_parts)
            starts = np.asarray([0, step[0], step[0] + step[1]], dtype=np.int32)
            out = attn.paged_attention(paddle.to_tensor(query), key_cache, value_cache, table_arr,
                                       paddle.to_tensor(np.asarray(ctx, dtype=np.int32)), paddle.to_tensor(starts),
                                       1.0 / np.sqrt(head_dim)).numpy()
            case = Case(query, dense_k, dense_v, None, None, None, np.asarray(ctx, dtype=np.int32), starts,
                        1.0 / np.sqrt(head_dim))
            np.testing.assert_allclose(out, dense_attention(case), rtol=0, atol=1e-4)
    assert not np.any(key_cache.numpy() == 7.0), "the padding token must not be written"


# ------------------------------------------------------------------------------------------------
# Backend selection and the build cache.


@pytest.fixture
def fresh_backend():
    attn.attention_backend_name.cache_clear()
    yield
    attn.attention_backend_name.cache_clear()


def test_backend_env_reference(monkeypatch, fresh_backend):
    monkeypatch.setenv(attn.BACKEND_ENV, "reference")
    assert attn.attention_backend_name() == "reference"


def test_backend_env_invalid(monkeypatch, fresh_backend):
    monkeypatch.setenv(attn.BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match=attn.BACKEND_ENV):
        attn.attention_backend_name()


def test_backend_default_is_native_when_it_builds(native, monkeypatch, fresh_backend):
    monkeypatch.delenv(attn.BACKEND_ENV, raising=False)
    assert attn.attention_backend_name() == "native"


def test_backend_falls_back_with_one_warning(monkeypatch, fresh_backend, caplog):
    def broken():
        raise native_build.NativeBuildError("building fastdeploy_attention_ops failed (exit 1)\ncompiler noise")

    monkeypatch.delenv(attn.BACKEND_ENV, raising=False)
    monkeypatch.setattr(attn, "native_ops", broken)
    with caplog.at_level(logging.WARNING, logger="fastdeploy"):
        assert attn.attention_backend_name() == "reference"
        assert attn.attention_backend_name() == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "reference" in r.getMessage()]
    assert len(warnings) == 1


def test_backend_explicit_native_raises_when_build_fails(monkeypatch, fresh_backend):
    def broken():
        raise native_build.NativeBuildError("no compiler")

    monkeypatch.setenv(attn.BACKEND_ENV, "native")
    monkeypatch.setattr(attn, "native_ops", broken)
    with pytest.raises(native_build.NativeBuildError):
        attn.attention_backend_name()


def test_fingerprint_follows_sources_and_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "NATIVE_SRC_DIR", tmp_path)
    source = tmp_path / "op.cc"
    source.write_text("int a;\n")
    first = native_build._fingerprint("ext", [source], ["-O3"], [])
    assert native_build._fingerprint("ext", [source], ["-O3"], []) == first
    assert native_build._fingerprint("ext", [source], ["-O2"], []) != first
    (tmp_path / "common.h").write_text("#define X 1\n")
    with_header = native_build._fingerprint("ext", [source], ["-O3"], [])
    assert with_header != first
    source.write_text("int b;\n")
    assert native_build._fingerprint("ext", [source], ["-O3"], []) not in (first, with_header)


def test_prune_keeps_recent_builds_and_busy_ones(tmp_path):
    import fcntl

    dirs = []
    for i in range(5):
        build = tmp_path / f"ext-{i:016x}"
        build.mkdir()
        marker = build / native_build._DONE_MARKER
        marker.write_text("1s\n")
        os.utime(marker, (1000 + i, 1000 + i))  # ext-4 most recently used
        dirs.append(build)
    (tmp_path / "ext-unfinished").mkdir()
    (tmp_path / "other-0000000000000000").mkdir()
    with open(tmp_path / f"{dirs[0].name}.lock", "a+") as busy:
        fcntl.flock(busy.fileno(), fcntl.LOCK_EX)  # another "process" is using the oldest build
        native_build._prune_old_builds(tmp_path, "ext", keep=2)
    assert [d.exists() for d in dirs] == [True, False, False, True, True]
    assert (tmp_path / "ext-unfinished").exists() and (tmp_path / "other-0000000000000000").exists()


def test_missing_sources_raise_build_error(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "NATIVE_SRC_DIR", tmp_path)
    with pytest.raises(native_build.NativeBuildError, match="not found"):
        native_build.load_extension("fastdeploy_missing_ops", ["nope.cc"])
