"""Fused rotary embedding + KV-cache write: native op vs the plain-Paddle reference vs float64 numpy.

Both pairings (rotate_half and interleaved), GQA/MQA/MHA head counts, decode, full and chunked
prefill, padding slots. The native op must match the reference bit for bit (same roundings);
both must match numpy to float32 accuracy. Native tests skip when the extension cannot be built,
unless FASTDEPLOY_REQUIRE_NATIVE is set.
"""
from __future__ import annotations


import numpy as np
import paddle
import pytest

from fastdeploy.model_executor.forward_batch import ForwardBatch
from fastdeploy.model_executor.layers.rotary import RotaryEmbedding
from fastdeploy.model_executor.ops import rotary_kv as R

BLOCK = 16
MAX_POS = 2048
THETA = 10000.0
HEADS = {"gqa_9_3_64": (9, 3, 64), "mha_4_4_32": (4, 4, 32), "gqa_6_2_128": (6, 2, 128), "mqa_4_1_6": (4, 1, 6)}
# (start position, new tokens) per sequence.
SCENARIOS = {
    "decode": [(0, 1), (7, 1), (229, 1), (1500, 1)],
    "prefill": [(0, 5), (0, 1), (0, 40)],
    "chunked": [(32, 17), (5, 3), (0, 9), (100, 1)],
    "large_prefill": [(0, 300), (64, 200)],  # above the op's threshold for a parallel loop
}


def rotate_numpy(x: np.ndarray, positions: np.ndarray, head_dim: int, interleaved: bool) -> np.ndarray:
    """float64 RoPE of x [T, heads, D], from the definition (angle table as RotaryEmbedding builds it)."""
    inv_freq = 1.0 / (np.float32(THETA) ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim))
    angles = (positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]).astype(np.float64)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x = x.astype(np.float64)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def make_batch(scenario: str, seed: int) -> ForwardBatch:
    """Positions and slots of a real step; block tables shuffled so slots are scattered."""
    seqs = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    needed = [-(-(start + n) // BLOCK) for start, n in seqs]
    blocks = rng.permutation(sum(needed) + 3).tolist()
    tables, at = [], 0
    for count in needed:
        tables.append(blocks[at:at + count])
        at += count
    return ForwardBatch.build([[1] * n for _, n in seqs], [s for s, _ in seqs], tables, BLOCK)


def make_inputs(batch: ForwardBatch, heads: tuple[int, int, int], seed: int,
                pad_every: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """qkv [T, (H + 2 Hkv) D], slots (every pad_every-th set to -1), and two caches full of older data."""
    num_heads, num_kv_heads, head_dim = heads
    rng = np.random.default_rng(seed)
    num_tokens = int(batch.positions.shape[0])
    qkv = (rng.standard_normal((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)) * 2).astype(np.float32)
    slots = batch.slot_mapping.numpy().copy()
    if pad_every:
        slots[::pad_every] = -1
    num_blocks = int(slots.max()) // BLOCK + 2
    shape = (num_blocks, num_kv_heads, BLOCK, head_dim)
    return qkv, slots, rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def run(impl: str, qkv: np.ndarray, positions: np.ndarray, slots: np.ndarray, caches: tuple[np.ndarray, np.ndarray],
        rotary: RotaryEmbedding, heads: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, key_cache, value_cache) after one call of the native op or the reference, on fresh copies."""
    num_heads, num_kv_heads, _ = heads
    kc, vc = paddle.to_tensor(caches[0].copy()), paddle.to_tensor(caches[1].copy())
    x, pos, sl = paddle.to_tensor(qkv), paddle.to_tensor(positions), paddle.to_tensor(slots)
    if impl == "native":
        q = R.native_rotary_write_kv(x, pos, rotary, kc, vc, sl, num_heads, num_kv_heads)
    else:
        q = R.reference_rotary_write_kv(x, rotary.angles(pos), rotary, kc, vc, sl, num_heads, num_kv_heads)
    return q.numpy(), kc.numpy(), vc.numpy()


def expected(qkv: np.ndarray, positions: np.ndarray, slots: np.ndarray, caches: tuple[np.ndarray, np.ndarray],
             heads: tuple[int, int, int], interleaved: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_heads, num_kv_heads, head_dim = heads
    x = qkv.reshape(len(positions), num_heads + 2 * num_kv_heads, head_dim)
    q = rotate_numpy(x[:, :num_heads], positions, head_dim, interleaved)
    k = rotate_numpy(x[:, num_heads:num_heads + num_kv_heads], positions, head_dim, interleaved)
    kc, vc = caches[0].astype(np.float64), caches[1].astype(np.float64)
    for t, slot in enumerate(slots):
        if slot >= 0:
            kc[slot // BLOCK, :, slot % BLOCK] = k[t]
            vc[slot // BLOCK, :, slot % BLOCK] = x[t, num_heads + num_kv_heads:]
    return q, kc, vc


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_native_matches_reference_and_numpy(native, scenario, heads, interleaved):
    rotary = RotaryEmbedding(heads[2], MAX_POS, THETA, interleaved)
    batch = make_batch(scenario, seed=1)
    qkv, slots, kc, vc = make_inputs(batch, heads, seed=2, pad_every=3 if scenario == "chunked" else 0)
    positions = batch.positions.numpy()
    got = run("native", qkv, positions, slots, (kc, vc), rotary, heads)
    ref = run("reference", qkv, positions, slots, (kc, vc), rotary, heads)
    want = expected(qkv, positions, slots, (kc, vc), heads, interleaved)
    for name, g, r, w in zip(("q", "key_cache", "value_cache"), got, ref, want):
        np.testing.assert_array_equal(g, r, err_msg=f"{name}: native differs from the reference")
        # |x| ~ 2, angles up to ~1500 rad: float32 angle rounding allows a few 1e-6 relative.
        np.testing.assert_allclose(r, w, rtol=0, atol=5e-6 * max(1.0, np.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("scenario", ["decode", "chunked", "large_prefill"])
def test_float16_cache(native, scenario, interleaved):
    """Float16 caches: native and reference store the same bits (paddle's rounding), which are the
    numpy rotation rounded to float16; q stays float32 and unchanged."""
    heads = HEADS["gqa_9_3_64"]
    rotary = RotaryEmbedding(heads[2], MAX_POS, THETA, interleaved)
    batch = make_batch(scenario, seed=3)
    qkv, slots, kc, vc = make_inputs(batch, heads, seed=4, pad_every=3 if scenario == "chunked" else 0)
    caches = (kc.astype(np.float16), vc.astype(np.float16))
    positions = batch.positions.numpy()
    got = run("native", qkv, positions, slots, caches, rotary, heads)
    want = run("reference", qkv, positions, slots, caches, rotary, heads)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert got[1].dtype == np.float16 and got[2].dtype == np.float16
    q, k, v = expected(qkv, positions, slots, caches, heads, interleaved)
    np.testing.assert_allclose(got[0], q, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[2], v.astype(np.float16))  # the values themselves, rounded once
    # float16 keeps 11 significant bits: half an ulp is 2**-11 relative (plus fp32 rotation error).
    np.testing.assert_allclose(got[1].astype(np.float64), k, rtol=2.0 ** -10, atol=2.0 ** -24)


@pytest.mark.parametrize("interleaved", [False, True])
def test_dispatcher_and_threads(native, interleaved):
    """rotary_write_kv picks the native op on CPU; a single thread and two give the same result."""
    heads = HEADS["gqa_9_3_64"]
    rotary = RotaryEmbedding(heads[2], MAX_POS, THETA, interleaved)
    batch = make_batch("large_prefill", seed=3)
    qkv, slots, kc, vc = make_inputs(batch, heads, seed=4)
    assert R.native_applies(rotary, paddle.to_tensor(kc))
    outs = []
    for threads in (1, 2):
        k_cache, v_cache = paddle.to_tensor(kc), paddle.to_tensor(vc)
        q = R.native_rotary_write_kv(paddle.to_tensor(qkv), batch.positions, rotary, k_cache, v_cache,
                                     paddle.to_tensor(slots), heads[0], heads[1], num_threads=threads)
        outs.append((q.numpy(), k_cache.numpy(), v_cache.numpy()))
    k_cache, v_cache = paddle.to_tensor(kc), paddle.to_tensor(vc)
    q = R.rotary_write_kv(paddle.to_tensor(qkv), batch.positions, rotary, k_cache, v_cache, paddle.to_tensor(slots),
                          heads[0], heads[1])
    outs.append((q.numpy(), k_cache.numpy(), v_cache.numpy()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


def test_empty_batch(native):
    rotary = RotaryEmbedding(64, MAX_POS, THETA, False)
    kc, vc = paddle.zeros([2, 3, BLOCK, 64]), paddle.zeros([2, 3, BLOCK, 64])
    empty = paddle.zeros([0], dtype="int64")
    q = R.native_rotary_write_kv(paddle.zeros([0, 15 * 64]), empty, rotary, kc, vc, empty, 9, 3)
    assert list(q.shape) == [0, 9, 64]
    assert float(paddle.abs(kc).sum()) == 0.0


def test_bad_position_or_slot_raises_and_leaves_cache(native):
    heads = HEADS["gqa_9_3_64"]
    rotary = RotaryEmbedding(heads[2], 64, THETA, False)
    qkv = paddle.to_tensor(np.ones((2, 15 * 64), dtype=np.float32))
    for positions, slots in (([3, 64], [0, 1]), ([3, -1], [0, 1]), ([3, 4], [0, 2 * BLOCK])):
        kc, vc = paddle.zeros([2, 3, BLOCK, 64]), paddle.zeros([2, 3, BLOCK, 64])
        with pytest.raises(Exception, match="outside"):
            R.native_rotary_write_kv(qkv, paddle.to_tensor(np.asarray(positions, dtype=np.int64)), rotary, kc, vc,
                                     paddle.to_tensor(np.asarray(slots, dtype=np.int64)), heads[0], heads[1])
        assert float(paddle.abs(kc).sum()) == 0.0 and float(paddle.abs(vc).sum()) == 0.0


def test_cache_view_is_refused(native):
    rotary = RotaryEmbedding(64, MAX_POS, THETA, False)
    caches = paddle.zeros([2, 4, 3, BLOCK, 64])
    view = caches[:, 1]  # strided: an in-place write would land in a temporary copy
    if view.is_contiguous():
        pytest.skip("this Paddle build copies on slicing")
    pos = paddle.to_tensor(np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="contiguous"):
        R.native_rotary_write_kv(paddle.zeros([1, 15 * 64]), pos, rotary, view, view, pos, 9, 3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_matches_numpy_without_native(interleaved):
    """The reference alone (the path a GPU build runs), so it is covered where native is unavailable."""
    heads = HEADS["gqa_9_3_64"]
    rotary = RotaryEmbedding(heads[2], MAX_POS, THETA, interleaved)
    batch = make_batch("chunked", seed=5)
    qkv, slots, kc, vc = make_inputs(batch, heads, seed=6, pad_every=2)
    positions = batch.positions.numpy()
    got = run("reference", qkv, positions, slots, (kc, vc), rotary, heads)
    want = expected(qkv, positions, slots, (kc, vc), heads, interleaved)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=5e-6 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("scenario", ["decode", "chunked", "large_prefill"])
def test_int8_cache(native, scenario, interleaved):
    """int8 caches (rows of head_dim codes and a float32 step): native and reference store the same
    bytes, whose values are the rotated keys and the values within half a step."""
    heads = HEADS["gqa_9_3_64"]
    head_dim = heads[2]
    rotary = RotaryEmbedding(head_dim, MAX_POS, THETA, interleaved)
    batch = make_batch(scenario, seed=5)
    qkv, slots, kc, vc = make_inputs(batch, heads, seed=6, pad_every=3 if scenario == "chunked" else 0)
    pad = np.zeros(kc.shape[:-1] + (4,), dtype=np.int8)
    caches = (np.concatenate([kc.astype(np.int8), pad], -1), np.concatenate([vc.astype(np.int8), pad], -1))
    positions = batch.positions.numpy()
    got = run("native", qkv, positions, slots, caches, rotary, heads)
    want = run("reference", qkv, positions, slots, caches, rotary, heads)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    q, k, v = expected(qkv, positions, slots, (kc, vc), heads, interleaved)
    np.testing.assert_allclose(got[0], q, rtol=0, atol=1e-5)
    written = np.zeros(caches[0].shape[:-1], dtype=bool)
    for slot in slots[slots >= 0]:
        written[slot // BLOCK, :, slot % BLOCK] = True
    for cache, before, dense in ((got[1], caches[0], k), (got[2], caches[1], v)):
        held = cache[..., :head_dim].astype(np.float64) * cache[..., head_dim:].copy().view(np.float32)
        half_step = np.abs(dense[written]).max(axis=-1, keepdims=True) / 254
        assert (np.abs(held[written] - dense[written]) <= half_step * 1.001 + 1e-6).all()
        np.testing.assert_array_equal(cache[~written], before[~written])
