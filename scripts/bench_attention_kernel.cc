// The vector paged-attention kernels (native/attention_tiled.cc) timed alone, without Paddle: for
// comparing two builds of the kernel in alternating runs, where the engine-level scripts drown a
// 10 % change in the host's noise. Shapes follow SmolLM2-135M (9 query heads, 3 kv heads,
// head_dim 64), 64-token blocks in shuffled order, random K/V.
//
// Build against a checkout (repeat with another checkout's native/ for an A/B):
//   P=.venv/lib/python3.11/site-packages/paddle/include
//   S="scripts/bench_attention_kernel.cc native/attention_tiled.cc native/thread_pool.cc"
//   g++ -O3 -march=native -std=c++17 -Inative -I$P -I$P/third_party $S -o /tmp/attn_kernel -lpthread
//   (add -DFD_BENCH_F32 for float32 caches)
// Run:
//   /tmp/attn_kernel SEQS CONTEXT LAYERS THREADS ROUNDS [prefill]
//   e.g. 1 300 1 1 20000     one decode tile set held in L2 (the kernel's compute)
//        32 300 30 2 6       a 32-stream decode step's attention, K/V streamed from DRAM
//        1 512 1 1 20 prefill  a 512-token prompt (the wide kernel)
// It prints the best round's time per layer and, for decode, per key visit (one sequence, kv head
// and key).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <immintrin.h>

#include "attention_problem.h"

namespace {

#ifdef FD_BENCH_F32
using Element = float;
constexpr fd_kv::CacheType kCacheType = fd_kv::CacheType::kFloat32;
Element FromFloat(float x) { return x; }
#else
using Element = uint16_t;  // float16 bits
constexpr fd_kv::CacheType kCacheType = fd_kv::CacheType::kFloat16;
Element FromFloat(float x) { return _cvtss_sh(x, 0); }
#endif

constexpr int kHeads = 9, kKvHeads = 3, kHeadDim = 64, kBlock = 64;

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s SEQS CONTEXT LAYERS THREADS ROUNDS [prefill]\n", argv[0]);
    return 2;
  }
  const int seqs = std::atoi(argv[1]), context = std::atoi(argv[2]), layers = std::atoi(argv[3]);
  const int threads = std::atoi(argv[4]), rounds = std::atoi(argv[5]);
  const bool prefill = argc > 6;
  const int blocks_per_seq = (context + kBlock - 1) / kBlock, num_blocks = seqs * blocks_per_seq;
  const int tokens = prefill ? seqs * context : seqs;

  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  // One cache pair per layer, so a many-layer run streams K/V from DRAM as a real step does.
  std::vector<std::vector<Element>> keys(layers), values(layers);
  for (int l = 0; l < layers; ++l) {
    keys[l].resize(static_cast<size_t>(num_blocks) * kKvHeads * kBlock * kHeadDim);
    values[l].resize(keys[l].size());
    for (auto& x : keys[l]) x = FromFloat(uniform(rng));
    for (auto& x : values[l]) x = FromFloat(uniform(rng));
  }
  std::vector<int32_t> table(num_blocks);
  for (int i = 0; i < num_blocks; ++i) table[i] = i;
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<int32_t> context_lens(seqs, context), starts(seqs + 1);
  for (int i = 0; i <= seqs; ++i) starts[i] = prefill ? i * context : i;
  std::vector<float> query(static_cast<size_t>(tokens) * kHeads * kHeadDim), out(query.size());
  for (auto& x : query) x = uniform(rng);

  fd_paged_attention::Problem p{};
  p.query = query.data();
  p.cache_type = kCacheType;
  p.block_tables = table.data();
  p.context_lens = context_lens.data();
  p.query_start_loc = starts.data();
  p.out = out.data();
  p.num_seqs = seqs;
  p.num_tokens = tokens;
  p.num_heads = kHeads;
  p.num_kv_heads = kKvHeads;
  p.head_dim = kHeadDim;
  p.row_elems = kHeadDim;
  p.block_size = kBlock;
  p.num_blocks = num_blocks;
  p.max_blocks_per_seq = blocks_per_seq;
  p.scale = 0.125f;

  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) {
      p.key_cache = keys[l].data();
      p.value_cache = values[l].data();
      fd_paged_attention::RunTiled(p, threads);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::printf("%.0f us per layer", best / layers * 1e6);
  if (!prefill) std::printf(", %.1f ns per key visit", best / (static_cast<double>(seqs) * context * kKvHeads * layers) * 1e9);
  std::printf("\n");
  return 0;
}
