// What the paged-attention kernels share (paged_attention.cc: the op, its checks and the portable
// scalar kernel; attention_tiled.cc: the vector kernels): the problem description and the thread
// plumbing.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>

// libiomp5's spin-wait control (see LimitSpinWait); weak, so under another runtime it is null.
extern "C" void kmp_set_blocktime(int msec) __attribute__((weak));

namespace fd_paged_attention {

struct Problem {
  const float* query;         // [num_tokens, num_heads, head_dim]
  const float* key_cache;     // [num_blocks, num_kv_heads, block_size, head_dim]
  const float* value_cache;   // same layout as key_cache
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
  const int32_t* context_lens;  // [num_seqs]
  const int32_t* query_start_loc;  // [num_seqs + 1]
  float* out;                 // [num_tokens, num_heads, head_dim]
  int64_t num_seqs;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;
  int64_t num_blocks;
  int64_t max_blocks_per_seq;
  float scale;

  int64_t group() const { return num_heads / num_kv_heads; }

  // Offset of (seq, kv_head, position) in a cache, in floats. Callers only pass positions below
  // context_lens[seq], whose block ids were range-checked before any thread started.
  int64_t CacheOffset(int64_t seq, int64_t kv_head, int64_t pos) const {
    const int64_t block = block_tables[seq * max_blocks_per_seq + pos / block_size];
    return ((block * num_kv_heads + kv_head) * block_size + pos % block_size) * head_dim;
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

// Threads: Paddle pins the OpenMP default to 1 thread at import (FLAGS_paddle_num_threads), so
// every parallel region names its thread count, which the Python wrapper passes in.
//
// Idle workers: Intel's runtime keeps them spinning for KMP_BLOCKTIME (200 ms) after a region.
// Attention runs once per layer, so with the default a worker would spin through every model step,
// taking a core from the tokenizer/detokenizer processes on a small machine. Unless the user set
// KMP_BLOCKTIME, workers spin 1 ms and then sleep.
inline void LimitSpinWait() {
  static const bool user_set = std::getenv("KMP_BLOCKTIME") != nullptr;
  if (!user_set && kmp_set_blocktime != nullptr) kmp_set_blocktime(1);
}

// Dynamic scheduling by hand: threads of a plain `omp parallel` region pull item indices from an
// atomic counter. `schedule(dynamic)` is avoided on purpose: GCC lowers it to
// GOMP_loop_nonmonotonic_dynamic_*, which Intel's libiomp5 (the runtime Paddle loads) does not
// export, so those calls would bind to libgomp while GOMP_parallel binds to libiomp5, mixing two
// runtimes inside one region. Only GOMP_parallel is needed this way, which every runtime provides.
class WorkQueue {
 public:
  WorkQueue() = default;
  // The next unclaimed index; a value >= size means the queue is drained.
  int64_t Take() { return next_.fetch_add(1, std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> next_{0};
};

// The vector kernels (attention_tiled.cc). TiledSupports: whether this build and head_dim allow
// them; RunTiled computes the whole problem with num_threads threads.
bool TiledSupports(const Problem& p);
void RunTiled(const Problem& p, int num_threads);

}  // namespace fd_paged_attention
