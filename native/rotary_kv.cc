// Rotary position embedding of q and k fused with the KV-cache write, as one Paddle custom op:
//
//   fd_rotary_kv(qkv [T, (H + 2 Hkv) * D], positions int64 [T], cos [P, D/2], sin [P, D/2],
//                key_cache, value_cache, slot_mapping int64 [T]) -> q [T, H, D]
//
// qkv is the fused projection's output (q heads, then k heads, then v heads per token). Each
// token's q heads are rotated into the fresh output q; its k heads are rotated straight into the
// key cache and its v heads copied into the value cache at slot_mapping[t] (block * block_size +
// offset; negative = padding, nothing written). The caches are in-place inputs (SetInplaceMap),
// layout [num_blocks, Hkv, block_size, D], float32 or float16, as in kv_cache.cc.
//
// Pairings (attribute `interleaved`): false rotates (x[i], x[i + D/2]) with angle i (HF
// Llama/Qwen2 "rotate_half"); true rotates (x[2i], x[2i + 1]) with angle i (ERNIE 4.5).
// Rotation is x1 * cos - x2 * sin, x2 * cos + x1 * sin with each product rounded on its own (no
// FMA contraction), the operation order of the plain-Paddle reference and of HF transformers, so
// the results agree bit for bit.
//
// This replaces ~12 Paddle ops per layer (reshape, splits, the rotary's elementwise ops and
// concat, the cache write's index arithmetic), whose dispatch cost dwarfs the arithmetic.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "kv_types.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace {

// Below this many floats of q|k|v a second thread costs more than it saves (decode batches).
constexpr int64_t kMinParallelElements = 1 << 17;

paddle::Tensor Contiguous(const paddle::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

struct Dims {
  int64_t tokens, heads, kv_heads, head_dim, max_pos, block_size, num_slots;
  int64_t row_elems;  // elements per cache row (kv_types.h)
  fd_kv::CacheType cache_type;
};

// Separate products and a separate add/sub, as the reference computes them: contraction into an
// FMA (which -march=native would otherwise allow) would change the last bit.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// (x[i], x[i + half]) pairs; cos/sin hold the `half` angles of this token's position.
void RotateHalf(const float* x, const float* cos, const float* sin, int64_t half, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i];
    const float x2 = x[i + half];
    const float a = x1 * cos[i];
    const float b = x2 * sin[i];
    const float c = x2 * cos[i];
    const float d = x1 * sin[i];
    out[i] = a - b;
    out[i + half] = c + d;
  }
}

// (x[2i], x[2i + 1]) pairs.
void RotateInterleaved(const float* x, const float* cos, const float* sin, int64_t half, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[2 * i];
    const float x2 = x[2 * i + 1];
    const float a = x1 * cos[i];
    const float b = x2 * sin[i];
    const float c = x2 * cos[i];
    const float d = x1 * sin[i];
    out[2 * i] = a - b;
    out[2 * i + 1] = c + d;
  }
}

#pragma GCC pop_options

struct Pointers {
  const float* qkv;
  const int64_t* positions;
  const float* cos;
  const float* sin;
  const int64_t* slots;
  float* q;
  void* key_cache;    // float, fd_kv::Half or int8_t rows, as the caches' dtype
  void* value_cache;
};

// Token t: rotate its q heads into q, its k heads into the cache, copy its v heads (converted to
// the cache's element type T).
template <typename T>
void ProcessToken(const Pointers& p, const Dims& d, bool interleaved, int64_t t) {
  const int64_t half = d.head_dim / 2;
  const int64_t pos = p.positions[t];
  const float* cos = p.cos + pos * half;
  const float* sin = p.sin + pos * half;
  auto rotate = interleaved ? RotateInterleaved : RotateHalf;
  const float* row = p.qkv + t * (d.heads + 2 * d.kv_heads) * d.head_dim;
  for (int64_t h = 0; h < d.heads; ++h) {
    rotate(row + h * d.head_dim, cos, sin, half, p.q + (t * d.heads + h) * d.head_dim);
  }
  const int64_t slot = p.slots[t];
  if (slot < 0) return;
  const int64_t block = slot / d.block_size;
  const int64_t offset = slot % d.block_size;
  const float* k = row + d.heads * d.head_dim;
  const float* v = k + d.kv_heads * d.head_dim;
  T* key_cache = static_cast<T*>(p.key_cache);
  T* value_cache = static_cast<T*>(p.value_cache);
  for (int64_t h = 0; h < d.kv_heads; ++h) {
    const int64_t dst = ((block * d.kv_heads + h) * d.block_size + offset) * d.row_elems;
    if constexpr (std::is_same_v<T, float>) {
      rotate(k + h * d.head_dim, cos, sin, half, key_cache + dst);
    } else {
      static thread_local std::vector<float> rotated;
      rotated.resize(static_cast<size_t>(d.head_dim));
      rotate(k + h * d.head_dim, cos, sin, half, rotated.data());
      fd_kv::StoreRow(rotated.data(), d.head_dim, key_cache + dst);
    }
    fd_kv::StoreRow(v + h * d.head_dim, d.head_dim, value_cache + dst);
  }
}

void CheckInputs(const paddle::Tensor& qkv, const paddle::Tensor& positions, const paddle::Tensor& cos,
                 const paddle::Tensor& sin, const paddle::Tensor& key_cache, const paddle::Tensor& value_cache,
                 const paddle::Tensor& slot_mapping) {
  for (const paddle::Tensor* t : {&qkv, &positions, &cos, &sin, &key_cache, &value_cache, &slot_mapping}) {
    PD_CHECK(t->is_cpu(), "fd_rotary_kv inputs must be CPU tensors");
  }
  for (const paddle::Tensor* t : {&qkv, &cos, &sin}) {
    PD_CHECK(t->dtype() == paddle::DataType::FLOAT32, "qkv, cos and sin must be float32");
  }
  fd_kv::CacheType type;
  PD_CHECK(key_cache.dtype() == value_cache.dtype() && fd_kv::CacheTypeOf(key_cache.dtype(), &type),
           "the caches must both be float32, both float16 or both int8");
  PD_CHECK(positions.dtype() == paddle::DataType::INT64 && slot_mapping.dtype() == paddle::DataType::INT64,
           "positions and slot_mapping must be int64");
  PD_CHECK(key_cache.shape().size() == 4 && key_cache.shape() == value_cache.shape(),
           "key_cache and value_cache must both be [num_blocks, num_kv_heads, block_size, row]");
  // Paddle passes a contiguous copy of a strided input, so this cannot catch a view: the Python
  // wrapper checks is_contiguous() on the original tensors before the call.
  PD_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "the caches must be contiguous");
  PD_CHECK(cos.shape().size() == 2 && cos.shape() == sin.shape(), "cos and sin must both be [max_pos, head_dim / 2]");
}

Dims CheckShapes(const paddle::Tensor& qkv, const paddle::Tensor& positions, const paddle::Tensor& cos,
                 const paddle::Tensor& key_cache, const paddle::Tensor& slot_mapping, int num_heads,
                 int num_kv_heads) {
  const auto& cs = key_cache.shape();
  fd_kv::CacheType type;
  fd_kv::CacheTypeOf(key_cache.dtype(), &type);  // checked in CheckInputs
  const int64_t head_dim = type == fd_kv::CacheType::kInt8 ? cs[3] - fd_kv::kInt8RowExtra : cs[3];
  Dims d{qkv.shape().empty() ? 0 : qkv.shape()[0], num_heads, num_kv_heads, head_dim, cos.shape()[0], cs[2],
         cs[0] * cs[2], cs[3], type};
  PD_CHECK(head_dim > 0, "int8 cache rows must hold head_dim + ", fd_kv::kInt8RowExtra, " bytes");
  PD_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
           "num_heads must be a positive multiple of num_kv_heads");
  PD_CHECK(cs[1] == num_kv_heads, "the caches hold ", cs[1], " kv heads, not ", num_kv_heads);
  PD_CHECK(d.head_dim % 2 == 0 && cos.shape()[1] == d.head_dim / 2, "cos/sin must have head_dim / 2 columns");
  PD_CHECK(qkv.numel() == d.tokens * (d.heads + 2 * d.kv_heads) * d.head_dim,
           "qkv must be [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]");
  PD_CHECK(positions.numel() == d.tokens && slot_mapping.numel() == d.tokens,
           "positions and slot_mapping must have one entry per token");
  return d;
}

// Out-of-range positions or slots would read or write outside the tables: refuse them up front
// (before any write, so a bad call leaves the cache untouched).
void CheckIndices(const int64_t* positions, const int64_t* slots, const Dims& d) {
  for (int64_t t = 0; t < d.tokens; ++t) {
    PD_CHECK(positions[t] >= 0 && positions[t] < d.max_pos, "position ", positions[t],
             " is outside the rotary table (", d.max_pos, " positions)");
    PD_CHECK(slots[t] < d.num_slots, "slot ", slots[t], " is outside the cache (", d.num_slots, " slots)");
  }
}

std::vector<paddle::Tensor> RotaryKVKernel(const paddle::Tensor& qkv, const paddle::Tensor& positions,
                                           const paddle::Tensor& cos, const paddle::Tensor& sin,
                                           paddle::Tensor& key_cache, paddle::Tensor& value_cache,
                                           const paddle::Tensor& slot_mapping, int num_heads, int num_kv_heads,
                                           bool interleaved, int num_threads) {
  CheckInputs(qkv, positions, cos, sin, key_cache, value_cache, slot_mapping);
  const Dims d = CheckShapes(qkv, positions, cos, key_cache, slot_mapping, num_heads, num_kv_heads);
  paddle::Tensor q = paddle::empty({d.tokens, d.heads, d.head_dim}, paddle::DataType::FLOAT32, qkv.place());
  if (d.tokens == 0) return {q};
  const paddle::Tensor qkv_c = Contiguous(qkv);
  const paddle::Tensor pos_c = Contiguous(positions);
  const paddle::Tensor cos_c = Contiguous(cos);
  const paddle::Tensor sin_c = Contiguous(sin);
  const paddle::Tensor slots_c = Contiguous(slot_mapping);
  const Pointers p{qkv_c.data<float>(), pos_c.data<int64_t>(), cos_c.data<float>(), sin_c.data<float>(),
                   slots_c.data<int64_t>(), q.data<float>(), key_cache.data(), value_cache.data()};
  CheckIndices(p.positions, p.slots, d);
  const int64_t elements = qkv.numel();
  const int threads = elements >= kMinParallelElements ? std::max(num_threads, 1) : 1;
  // Tokens write disjoint q rows and (distinct slots) disjoint cache rows: no synchronization.
  fd_threads::ParallelChunks(d.tokens, threads, [&](int64_t begin, int64_t end) {
    fd_kv::Visit(d.cache_type, [&](auto element) {
      for (int64_t t = begin; t < end; ++t) ProcessToken<decltype(element)>(p, d, interleaved, t);
    });
  });
  return {q};
}

std::vector<std::vector<int64_t>> RotaryKVInferShape(
    const std::vector<int64_t>& qkv_shape, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const int& num_heads, const int& num_kv_heads, const bool&, const int&) {
  // From qkv [T, (H + 2 * Hkv) * D]: an int8 cache's rows are longer than head_dim.
  const int64_t heads = num_heads + 2 * static_cast<int64_t>(num_kv_heads);
  const int64_t head_dim = qkv_shape.size() == 2 && qkv_shape[1] > 0 && heads > 0 ? qkv_shape[1] / heads : -1;
  return {{qkv_shape.empty() ? -1 : qkv_shape[0], num_heads, head_dim}};
}

std::vector<paddle::DataType> RotaryKVInferDtype(const paddle::DataType&, const paddle::DataType&,
                                                 const paddle::DataType&, const paddle::DataType&,
                                                 const paddle::DataType&, const paddle::DataType&,
                                                 const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace

paddle::Tensor fd_attention::RotaryKV(const paddle::Tensor& qkv, const paddle::Tensor& positions,
                                      const paddle::Tensor& cos, const paddle::Tensor& sin, paddle::Tensor& key_cache,
                                      paddle::Tensor& value_cache, const paddle::Tensor& slot_mapping, int num_heads,
                                      int num_kv_heads, bool interleaved, int num_threads) {
  return RotaryKVKernel(qkv, positions, cos, sin, key_cache, value_cache, slot_mapping, num_heads, num_kv_heads,
                        interleaved, num_threads)[0];
}

PD_BUILD_OP(fd_rotary_kv)
    .Inputs({"QKV", "Positions", "Cos", "Sin", "KeyCache", "ValueCache", "SlotMapping"})
    .Outputs({"Q", "KeyCacheOut", "ValueCacheOut"})
    .SetInplaceMap({{"KeyCache", "KeyCacheOut"}, {"ValueCache", "ValueCacheOut"}})
    .Attrs({"num_heads: int", "num_kv_heads: int", "interleaved: bool", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(RotaryKVKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(RotaryKVInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RotaryKVInferDtype));
