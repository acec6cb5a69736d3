// What the paged-attention kernels share (paged_attention.cc: the op, its checks and the portable
// scalar kernel; attention_tiled.cc: the vector kernels): the problem description and per-thread
// scratch. Threads come from thread_pool.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "kv_types.h"

namespace fd_paged_attention {

struct Problem {
  const float* query;         // [num_tokens, num_heads, head_dim]
  const void* key_cache;      // [num_blocks, num_kv_heads, block_size, row_elems] of cache_type
  const void* value_cache;    // same layout and type as key_cache
  fd_kv::CacheType cache_type;  // float, fd_kv::Half or int8_t rows (kv_types.h)
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
  const int32_t* context_lens;  // [num_seqs]
  const int32_t* query_start_loc;  // [num_seqs + 1]
  float* out;                 // [num_tokens, num_heads, head_dim]
  int64_t num_seqs;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t row_elems;          // elements per cache row: fd_kv::RowElems(cache_type, head_dim)
  int64_t block_size;
  int64_t num_blocks;
  int64_t max_blocks_per_seq;
  float scale;

  int64_t group() const { return num_heads / num_kv_heads; }

  // The caches as arrays of T, the type cache_type names.
  template <typename T>
  const T* Keys() const {
    return static_cast<const T*>(key_cache);
  }
  template <typename T>
  const T* Values() const {
    return static_cast<const T*>(value_cache);
  }

  // Offset of (seq, kv_head, position)'s row in a cache, in elements. Callers only pass positions below
  // context_lens[seq], whose block ids were range-checked before any thread started.
  int64_t CacheOffset(int64_t seq, int64_t kv_head, int64_t pos) const {
    const int64_t block = block_tables[seq * max_blocks_per_seq + pos / block_size];
    return ((block * num_kv_heads + kv_head) * block_size + pos % block_size) * row_elems;
  }
};

struct AlignedFloats {
  explicit AlignedFloats(size_t n) {
    const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    ptr.reset(static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes)));
  }
  float* get() const { return ptr.get(); }
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr;
};

// A thread's scratch floats, kept across calls (the pool's threads live on) and only ever grown.
class ThreadFloats {
 public:
  float* Get(size_t n) {
    if (n > size_) {
      buffer_ = AlignedFloats(n);
      size_ = n;
    }
    return buffer_.get();
  }

 private:
  AlignedFloats buffer_{0};
  size_t size_ = 0;
};

// The vector kernels (attention_tiled.cc). TiledSupports: whether this build and head_dim allow
// them; RunTiled computes the whole problem with num_threads threads.
bool TiledSupports(const Problem& p);
void RunTiled(const Problem& p, int num_threads);

}  // namespace fd_paged_attention
