// Element types of the paged KV cache: float32, or IEEE binary16 ("float16") held as its 16 bits.
// Half a decode step's attention time is reading K and V from memory, so float16 halves that
// traffic (and doubles the tokens a given amount of RAM holds); every kernel computes in fp32.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "paddle/phi/common/float16.h"

namespace fd_kv {

using Half = uint16_t;  // binary16 bits, the layout of a paddle.float16 tensor

// Paddle's own scalar conversions (round to nearest even), so a native cache write stores exactly
// what paddle's cast to float16 stores.
inline float ToFloat(float x) { return x; }
inline float ToFloat(Half bits) {
  phi::dtype::float16 h;
  h.x = bits;
  return static_cast<float>(h);
}

// dst[0, n) = src[0, n) in the cache's element type.
template <typename T>
inline void StoreRow(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = phi::dtype::float16(src[i]).x;
  }
}

}  // namespace fd_kv
