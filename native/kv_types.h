// Element types of the paged KV cache: float32; IEEE binary16 ("float16") held as its 16 bits; or
// int8 rows, each head_dim codes followed by the row's float32 step (x ~= code * step, step =
// max |x| / 127, per token and kv head), so a row takes head_dim + 4 bytes and the cache's last
// dimension is head_dim + kInt8RowExtra. Decode attention is bound by reading K and V from memory
// (docs/benchmarks.md): float16 halves that traffic against float32 and int8 rows take 0.53x of
// float16's, and every kernel computes in fp32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "paddle/phi/common/data_type.h"
#include "paddle/phi/common/float16.h"

namespace fd_kv {

using Half = uint16_t;  // binary16 bits, the layout of a paddle.float16 tensor

enum class CacheType { kFloat32, kFloat16, kInt8 };

// Bytes after an int8 row's codes: its float32 step.
constexpr int64_t kInt8RowExtra = sizeof(float);

// The cache type of a paddle dtype; false for dtypes a cache cannot have.
inline bool CacheTypeOf(phi::DataType dtype, CacheType* type) {
  switch (dtype) {
    case phi::DataType::FLOAT32: *type = CacheType::kFloat32; return true;
    case phi::DataType::FLOAT16: *type = CacheType::kFloat16; return true;
    case phi::DataType::INT8: *type = CacheType::kInt8; return true;
    default: return false;
  }
}

// Elements of type T per cache row of head_dim values: the last dimension of the cache tensor.
inline int64_t RowElems(CacheType type, int64_t head_dim) {
  return type == CacheType::kInt8 ? head_dim + kInt8RowExtra : head_dim;
}

// f(T{}) with T the element type of `type`: float, Half or int8_t.
template <typename F>
decltype(auto) Visit(CacheType type, F&& f) {
  switch (type) {
    case CacheType::kFloat16: return f(Half{});
    case CacheType::kInt8: return f(int8_t{});
    default: return f(float{});
  }
}

// Paddle's own scalar conversions (round to nearest even), so a native cache write stores exactly
// what paddle's cast to float16 stores. An int8 code converts unscaled: RowStep scales.
inline float ToFloat(float x) { return x; }
inline float ToFloat(Half bits) {
  phi::dtype::float16 h;
  h.x = bits;
  return static_cast<float>(h);
}
inline float ToFloat(int8_t code) { return static_cast<float>(code); }

// The factor of a row's converted elements: its step for int8 rows, 1 otherwise.
template <typename T>
inline float RowStep(const T* row, int64_t head_dim) {
  if constexpr (std::is_same_v<T, int8_t>) {
    float step;
    std::memcpy(&step, row + head_dim, sizeof(step));
    return step;
  } else {
    (void)row;
    (void)head_dim;
    return 1.f;
  }
}

// The row of n values src, in the cache's element type, at dst.
template <typename T>
inline void StoreRow(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else if constexpr (std::is_same_v<T, Half>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = phi::dtype::float16(src[i]).x;
  } else {
    float max_abs = 0.f;
    for (int64_t i = 0; i < n; ++i) max_abs = std::max(max_abs, std::fabs(src[i]));
    const float step = max_abs / 127.f;
    const float inv = max_abs > 0.f ? 127.f / max_abs : 0.f;
    // Halves round away from zero, as paddle.round in the reference write; |src * inv| <= 127 up
    // to rounding, and the clamp keeps an overshoot in range.
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<int8_t>(std::clamp(std::round(src[i] * inv), -127.f, 127.f));
    }
    std::memcpy(dst + n, &step, sizeof(step));
  }
}

}  // namespace fd_kv
