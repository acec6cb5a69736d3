// Scatter of this step's keys/values into the paged KV cache.
//
// Cache layout (one pair per layer): [num_blocks, num_kv_heads, block_size, head_dim], float32 or
// float16, or int8 rows of head_dim + 4 (kv_types.h); key/value arrive in float32.
// Token t goes to slot_mapping[t] = block_id * block_size + offset; a negative slot is padding
// and is skipped. The caches are registered as in-place inputs (SetInplaceMap), so the kernel
// writes through the data pointer of the very tensors the caller owns; no output is allocated.

#include <cstdint>
#include <cstring>

#include "kv_types.h"
#include "paddle/extension.h"

namespace {

void CheckCache(const paddle::Tensor& cache, const char* name) {
  PD_CHECK(cache.is_cpu(), name, " must be a CPU tensor");
  fd_kv::CacheType type;
  PD_CHECK(fd_kv::CacheTypeOf(cache.dtype(), &type), name, " must be float32, float16 or int8");
  PD_CHECK(cache.shape().size() == 4, name, " must be [num_blocks, num_kv_heads, block_size, row]");
  // Paddle passes a contiguous copy of a strided input, so this cannot catch a view: the Python
  // wrapper checks is_contiguous() on the original tensor before the call.
  PD_CHECK(cache.is_contiguous(), name, " must be contiguous for an in-place write");
}

struct Rows {
  const float* k;
  const float* v;
  const int64_t* slots;
  int64_t num_tokens, num_kv_heads, block_size, head_dim, row_elems;
};

// Single-threaded on purpose: even a 512-token prefill moves under 1 MB per layer, less than the
// cost of waking a second thread.
template <typename T>
void Scatter(const Rows& r, T* kc, T* vc) {
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    const int64_t slot = r.slots[t];
    if (slot < 0) continue;
    const int64_t block = slot / r.block_size;
    const int64_t offset = slot % r.block_size;
    for (int64_t h = 0; h < r.num_kv_heads; ++h) {
      const int64_t dst = ((block * r.num_kv_heads + h) * r.block_size + offset) * r.row_elems;
      const int64_t src = (t * r.num_kv_heads + h) * r.head_dim;
      fd_kv::StoreRow(r.k + src, r.head_dim, kc + dst);
      fd_kv::StoreRow(r.v + src, r.head_dim, vc + dst);
    }
  }
}

void WriteKVCacheKernel(const paddle::Tensor& key, const paddle::Tensor& value,
                        paddle::Tensor& key_cache, paddle::Tensor& value_cache,
                        const paddle::Tensor& slot_mapping) {
  CheckCache(key_cache, "key_cache");
  CheckCache(value_cache, "value_cache");
  PD_CHECK(key_cache.shape() == value_cache.shape(), "key_cache and value_cache shapes differ");
  PD_CHECK(key_cache.dtype() == value_cache.dtype(), "key_cache and value_cache dtypes differ");
  PD_CHECK(key.is_cpu() && value.is_cpu() && slot_mapping.is_cpu(), "write_kv_cache inputs must be on CPU");
  PD_CHECK(key.dtype() == paddle::DataType::FLOAT32 && value.dtype() == paddle::DataType::FLOAT32,
           "key/value must be float32");
  PD_CHECK(slot_mapping.dtype() == paddle::DataType::INT64, "slot_mapping must be int64");

  const auto& cshape = key_cache.shape();
  const int64_t num_blocks = cshape[0];
  const int64_t num_kv_heads = cshape[1];
  const int64_t block_size = cshape[2];
  fd_kv::CacheType cache_type;
  fd_kv::CacheTypeOf(key_cache.dtype(), &cache_type);  // checked above
  const int64_t row_elems = cshape[3];
  const int64_t head_dim = cache_type == fd_kv::CacheType::kInt8 ? row_elems - fd_kv::kInt8RowExtra : row_elems;
  PD_CHECK(head_dim > 0, "int8 cache rows must hold head_dim + ", fd_kv::kInt8RowExtra, " bytes");

  PD_CHECK(key.shape().size() == 3 && key.shape() == value.shape(),
           "key/value must both be [num_tokens, num_kv_heads, head_dim]");
  const int64_t num_tokens = key.shape()[0];
  PD_CHECK(key.shape()[1] == num_kv_heads && key.shape()[2] == head_dim,
           "key/value heads or head_dim do not match the cache");
  PD_CHECK(slot_mapping.numel() == num_tokens, "slot_mapping must have one slot per token");

  const paddle::Tensor k_in = key.is_contiguous() ? key : key.contiguous();
  const paddle::Tensor v_in = value.is_contiguous() ? value : value.contiguous();
  const paddle::Tensor slots_in = slot_mapping.is_contiguous() ? slot_mapping : slot_mapping.contiguous();
  const float* k = k_in.data<float>();
  const float* v = v_in.data<float>();
  const int64_t* slots = slots_in.data<int64_t>();
  const int64_t num_slots = num_blocks * block_size;
  for (int64_t t = 0; t < num_tokens; ++t) {
    PD_CHECK(slots[t] < num_slots, "slot ", slots[t], " is outside the cache (", num_slots, " slots)");
  }
  const Rows rows{k, v, slots, num_tokens, num_kv_heads, block_size, head_dim, row_elems};
  fd_kv::Visit(cache_type, [&](auto element) {
    using T = decltype(element);
    Scatter(rows, static_cast<T*>(key_cache.data()), static_cast<T*>(value_cache.data()));
  });
}

}  // namespace

PD_BUILD_OP(fd_write_kv_cache)
    .Inputs({"Key", "Value", "KeyCache", "ValueCache", "SlotMapping"})
    .Outputs({"KeyCacheOut", "ValueCacheOut"})
    .SetInplaceMap({{"KeyCache", "KeyCacheOut"}, {"ValueCache", "ValueCacheOut"}})
    .SetKernelFn(PD_KERNEL(WriteKVCacheKernel));
