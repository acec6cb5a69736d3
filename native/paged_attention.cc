// Paged attention over a varlen batch: full prefill, chunked prefill and decode in one op.
//
// Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its q_len queries are the
// last q_len positions of its context, so query j sits at p = context_len - q_len + j and sees
// cache positions 0..p (causal). Query head h reads kv head h / (num_heads / num_kv_heads).
//
// The vector path (AVX-512 or AVX2) works on tiles: one sequence, one kv head and up to kLanes
// (16 or 8) "rows", a row being a (query token, query head of that kv head's group) pair. Rows
// live in the lanes of one vector register, so one key row is broadcast against all rows at once:
// scores need no horizontal reductions, the K/V rows are read once per tile for the whole GQA
// group, and the online softmax (running max, running sum, rescaled accumulator) is lane-wise.
// Keys are visited 16 at a time in position order; causality is a lane mask. The scalar path
// (neither ISA, or head_dim % kLanes != 0) computes one (token, head) row at a time with a
// two-pass softmax.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "attention.h"
#include "attention_simd.h"
#include "paddle/extension.h"

// libiomp5's spin-wait control (see LimitSpinWait); weak, so under another runtime it is null.
extern "C" void kmp_set_blocktime(int msec) __attribute__((weak));

namespace {

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
void LimitSpinWait() {
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

// ---------------------------------------------------------------------------------------------
// Scalar path: one (token, head) row at a time.

void AttendRowScalar(const Problem& p, int64_t seq, int64_t token, int64_t head, int64_t qpos,
                     float* scores) {
  const int64_t d_len = p.head_dim;
  const int64_t kv_head = head / p.group();
  const float* __restrict q = p.query + (token * p.num_heads + head) * d_len;
  float* __restrict o = p.out + (token * p.num_heads + head) * d_len;

  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t pos = 0; pos <= qpos; ++pos) {
    const float* __restrict k = p.key_cache + p.CacheOffset(seq, kv_head, pos);
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < d_len; ++d) dot += q[d] * k[d];
    scores[pos] = dot * p.scale;
    max_score = std::max(max_score, scores[pos]);
  }
  float sum = 0.f;
  for (int64_t pos = 0; pos <= qpos; ++pos) {
    scores[pos] = std::exp(scores[pos] - max_score);
    sum += scores[pos];
  }
  for (int64_t d = 0; d < d_len; ++d) o[d] = 0.f;
  for (int64_t pos = 0; pos <= qpos; ++pos) {
    const float* __restrict v = p.value_cache + p.CacheOffset(seq, kv_head, pos);
    const float w = scores[pos];
#pragma omp simd
    for (int64_t d = 0; d < d_len; ++d) o[d] += w * v[d];
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < d_len; ++d) o[d] *= inv;
}

void RunScalar(const Problem& p, int64_t max_context, int num_threads) {
  std::vector<int32_t> token_seq(static_cast<size_t>(p.num_tokens));
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    for (int64_t t = p.query_start_loc[s]; t < p.query_start_loc[s + 1]; ++t) token_seq[t] = s;
  }
  const int64_t rows = p.num_tokens * p.num_heads;
  if (num_threads > 1) LimitSpinWait();
  WorkQueue queue;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && rows > 1)
  {
    std::vector<float> scores(static_cast<size_t>(std::max<int64_t>(max_context, 1)));
    for (int64_t row = queue.Take(); row < rows; row = queue.Take()) {
      const int64_t token = row / p.num_heads;
      const int64_t head = row % p.num_heads;
      const int64_t seq = token_seq[token];
      const int64_t q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
      const int64_t qpos = p.context_lens[seq] - q_len + (token - p.query_start_loc[seq]);
      AttendRowScalar(p, seq, token, head, qpos, scores.data());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tiled path (AVX-512 or AVX2 + FMA; the vector type comes from attention_simd.h).

#ifdef FD_ATTENTION_TILED

using fd_attention_simd::Simd;
using Vec = Simd::V;
constexpr int kLanes = Simd::kLanes;  // rows per tile: one register of fp32
constexpr int kKeyTile = 16;          // keys per online-softmax step
constexpr int64_t kMinParallelKeyVisits = 2048;

struct Tile {
  int32_t seq;
  int32_t kv_head;
  int32_t tok_begin;   // first query of the tile, relative to the sequence's first query
  int32_t tok_count;
  int32_t head_begin;  // first query head of the tile, relative to the kv head's group
  int32_t head_count;
  int64_t cost;        // keys visited, for scheduling the long tiles first
};

// Walks one sequence's positions in order, 16 at a time, yielding the cache offset (in floats) of
// each position's row for one kv head; tracks block and offset incrementally (no divisions).
class KeyCursor {
 public:
  KeyCursor(const Problem& p, int64_t seq, int64_t kv_head)
      : p_(p), table_(p.block_tables + seq * p.max_blocks_per_seq), kv_head_(kv_head), in_block_(p.block_size) {}

  // Fills offsets for up to kKeyTile positions below `end`; returns how many.
  int Next(int64_t end, int64_t* offsets) {
    int n = 0;
    while (n < kKeyTile && pos_ < end) {
      if (in_block_ == p_.block_size) {
        ++block_index_;
        in_block_ = 0;
        row0_ = (static_cast<int64_t>(table_[block_index_]) * p_.num_kv_heads + kv_head_) * p_.block_size;
      }
      offsets[n++] = (row0_ + in_block_) * p_.head_dim;
      ++in_block_;
      ++pos_;
    }
    return n;
  }

 private:
  const Problem& p_;
  const int32_t* table_;
  int64_t kv_head_;
  int64_t pos_ = 0;
  int64_t block_index_ = -1;  // before the first block: the first Next() steps into block 0
  int64_t in_block_;
  int64_t row0_ = 0;
};

// scores[j] (lanes = rows) = sum_d key_j[d] * qt[d][:] for 8 keys. Eight independent accumulators
// hide the FMA latency; qt is the tile's queries transposed to [head_dim][kLanes], pre-scaled.
__attribute__((noinline)) void ScoreEightKeys(const float* const* keys, const float* __restrict qt, int64_t head_dim, Vec* scores) {
  Vec acc0 = Simd::Zero(), acc1 = Simd::Zero(), acc2 = Simd::Zero(), acc3 = Simd::Zero();
  Vec acc4 = Simd::Zero(), acc5 = Simd::Zero(), acc6 = Simd::Zero(), acc7 = Simd::Zero();
  const float *k0 = keys[0], *k1 = keys[1], *k2 = keys[2], *k3 = keys[3];
  const float *k4 = keys[4], *k5 = keys[5], *k6 = keys[6], *k7 = keys[7];
  for (int64_t d = 0; d < head_dim; ++d) {
    const Vec q = Simd::Load(qt + d * kLanes);
    acc0 = Simd::Fmadd(Simd::Set1(k0[d]), q, acc0);
    acc1 = Simd::Fmadd(Simd::Set1(k1[d]), q, acc1);
    acc2 = Simd::Fmadd(Simd::Set1(k2[d]), q, acc2);
    acc3 = Simd::Fmadd(Simd::Set1(k3[d]), q, acc3);
    acc4 = Simd::Fmadd(Simd::Set1(k4[d]), q, acc4);
    acc5 = Simd::Fmadd(Simd::Set1(k5[d]), q, acc5);
    acc6 = Simd::Fmadd(Simd::Set1(k6[d]), q, acc6);
    acc7 = Simd::Fmadd(Simd::Set1(k7[d]), q, acc7);
  }
  scores[0] = acc0; scores[1] = acc1; scores[2] = acc2; scores[3] = acc3;
  scores[4] = acc4; scores[5] = acc5; scores[6] = acc6; scores[7] = acc7;
}

// o[r][c] = o[r][c] * alpha[r] + sum_j probs[j][r] * v_j[c] for rows r0..r0+3 and the CHUNKS
// kLanes-float chunks starting at c0: 4 x CHUNKS accumulators stay in registers over the keys.
template <int CHUNKS>
inline void UpdateOutput(float* __restrict o, int64_t head_dim, int r0, int64_t c0, const float* alpha,
                         const float (*probs)[kLanes], const float* const* values, int num_keys) {
  Vec acc[4][CHUNKS];
  for (int a = 0; a < 4; ++a) {
    const Vec scale = Simd::Set1(alpha[r0 + a]);
    for (int b = 0; b < CHUNKS; ++b) {
      acc[a][b] = Simd::Mul(Simd::Load(o + (r0 + a) * head_dim + c0 + b * kLanes), scale);
    }
  }
  for (int j = 0; j < num_keys; ++j) {
    Vec v[CHUNKS];
    for (int b = 0; b < CHUNKS; ++b) v[b] = Simd::LoadU(values[j] + c0 + b * kLanes);
    for (int a = 0; a < 4; ++a) {
      const Vec w = Simd::Set1(probs[j][r0 + a]);
      for (int b = 0; b < CHUNKS; ++b) acc[a][b] = Simd::Fmadd(w, v[b], acc[a][b]);
    }
  }
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < CHUNKS; ++b) Simd::Store(o + (r0 + a) * head_dim + c0 + b * kLanes, acc[a][b]);
  }
}

// Accumulates one step's probability-weighted values into o, for every row group and chunk.
void UpdateAllOutputs(float* o, int64_t head_dim, int rows, const float* alpha, const float (*probs)[kLanes],
                      const float* const* values, int num_keys) {
  const int64_t chunks = head_dim / kLanes;
  constexpr int kMax = Simd::kMaxChunks;
  for (int r0 = 0; r0 < rows; r0 += 4) {
    int64_t c = 0;
    for (; c + kMax <= chunks; c += kMax) UpdateOutput<kMax>(o, head_dim, r0, c * kLanes, alpha, probs, values, num_keys);
    switch (chunks - c) {
      case 3: UpdateOutput<3>(o, head_dim, r0, c * kLanes, alpha, probs, values, num_keys); break;
      case 2: UpdateOutput<2>(o, head_dim, r0, c * kLanes, alpha, probs, values, num_keys); break;
      case 1: UpdateOutput<1>(o, head_dim, r0, c * kLanes, alpha, probs, values, num_keys); break;
      default: break;
    }
  }
}

// Transposes the tile's queries into qt [head_dim][kLanes], pre-scaled, and records each row's
// position. Unused lanes are zero and have position -1 (fully masked whenever masking applies;
// their results are never stored either way).
void LoadTileQueries(const Problem& p, const Tile& tile, int64_t first_pos, float* qt, int32_t* qpos) {
  const int64_t d_len = p.head_dim;
  const int64_t q_begin = p.query_start_loc[tile.seq];
  std::fill(qt, qt + d_len * kLanes, 0.f);
  std::fill(qpos, qpos + kLanes, -1);
  for (int t = 0; t < tile.tok_count; ++t) {
    const int64_t token = q_begin + tile.tok_begin + t;
    for (int h = 0; h < tile.head_count; ++h) {
      const int r = t * tile.head_count + h;
      const int64_t head = tile.kv_head * p.group() + tile.head_begin + h;
      const float* q = p.query + (token * p.num_heads + head) * d_len;
      for (int64_t d = 0; d < d_len; ++d) qt[d * kLanes + r] = q[d] * p.scale;
      qpos[r] = static_cast<int32_t>(first_pos + t);
    }
  }
}

// Divides each row's accumulator by its softmax sum and writes it to the output.
void StoreTileOutputs(const Problem& p, const Tile& tile, const float* o, const float* sums) {
  const int64_t d_len = p.head_dim;
  const int64_t q_begin = p.query_start_loc[tile.seq];
  for (int t = 0; t < tile.tok_count; ++t) {
    const int64_t token = q_begin + tile.tok_begin + t;
    for (int h = 0; h < tile.head_count; ++h) {
      const int r = t * tile.head_count + h;
      const int64_t head = tile.kv_head * p.group() + tile.head_begin + h;
      float* dst = p.out + (token * p.num_heads + head) * d_len;
      const Vec inv = Simd::Set1(1.f / sums[r]);
      for (int64_t c = 0; c < d_len; c += kLanes) Simd::StoreU(dst + c, Simd::Mul(Simd::Load(o + r * d_len + c), inv));
    }
  }
}

// Decode-like tiles (few rows) stream the context from DRAM once with little math per key:
// prefetching the next 16 rows of K and V while this tile computes hides the latency of the
// scattered blocks. Wide (prefill) tiles are compute-bound and reread K/V from L2 instead.
void PrefetchRows(const Problem& p, const int64_t* offsets, int count) {
  for (int j = 0; j < count; ++j) {
    const char* k_next = reinterpret_cast<const char*>(p.key_cache + offsets[j]);
    const char* v_next = reinterpret_cast<const char*>(p.value_cache + offsets[j]);
    for (int64_t byte = 0; byte < p.head_dim * static_cast<int64_t>(sizeof(float)); byte += 64) {
      _mm_prefetch(k_next + byte, _MM_HINT_T0);
      _mm_prefetch(v_next + byte, _MM_HINT_T0);
    }
  }
}

// Online softmax over the tile's keys, 16 at a time: running max, running sum and an accumulator
// rescaled whenever the max grows.
void AttendTile(const Problem& p, const Tile& tile, float* qt, float* o) {
  const int64_t d_len = p.head_dim;
  const int64_t q_len = p.query_start_loc[tile.seq + 1] - p.query_start_loc[tile.seq];
  const int64_t first_pos = p.context_lens[tile.seq] - q_len + tile.tok_begin;
  const int rows = tile.tok_count * tile.head_count;
  alignas(64) int32_t qpos[kLanes];
  LoadTileQueries(p, tile, first_pos, qt, qpos);
  std::fill(o, o + kLanes * d_len, 0.f);

  const Vec neg_inf = Simd::Set1(-std::numeric_limits<float>::infinity());
  Vec run_max = neg_inf;
  Vec run_sum = Simd::Zero();
  const int64_t num_keys = first_pos + tile.tok_count;  // last query's position + 1

  alignas(64) float probs[kKeyTile][kLanes];
  alignas(64) float alpha[kLanes];
  const float* keys[kKeyTile];
  const float* values[kKeyTile];
  Vec scores[kKeyTile];

  const bool prefetch = rows <= kLanes / 2;
  KeyCursor cursor(p, tile.seq, tile.kv_head);
  int64_t next_offsets[kKeyTile];
  int next_count = cursor.Next(num_keys, next_offsets);
  for (int64_t k0 = 0; k0 < num_keys; k0 += kKeyTile) {
    const int nk = next_count;
    for (int j = 0; j < kKeyTile; ++j) {
      // Past the end, repeat the last key so the 8-wide score kernel reads valid memory.
      const int64_t offset = next_offsets[std::min(j, nk - 1)];
      keys[j] = p.key_cache + offset;
      values[j] = p.value_cache + offset;
    }
    next_count = cursor.Next(num_keys, next_offsets);
    if (prefetch) PrefetchRows(p, next_offsets, next_count);
    ScoreEightKeys(keys, qt, d_len, scores);
    if (nk > 8) ScoreEightKeys(keys + 8, qt, d_len, scores + 8);

    if (k0 + nk - 1 > first_pos) {  // some key is in the future of some row
      for (int j = 0; j < nk; ++j) scores[j] = Simd::MaskFuture(scores[j], static_cast<int32_t>(k0 + j), qpos);
    }
    Vec block_max = scores[0];
    for (int j = 1; j < nk; ++j) block_max = Simd::Max(block_max, scores[j]);
    const Vec new_max = Simd::Max(run_max, block_max);
    const Vec safe_max = Simd::ZeroWhereNegInf(new_max);
    const Vec rescale = Simd::Exp(Simd::Sub(run_max, safe_max));
    Vec block_sum = Simd::Zero();
    for (int j = 0; j < nk; ++j) {
      const Vec pj = Simd::Exp(Simd::Sub(scores[j], safe_max));
      Simd::Store(probs[j], pj);
      block_sum = Simd::Add(block_sum, pj);
    }
    run_sum = Simd::Fmadd(run_sum, rescale, block_sum);
    run_max = new_max;
    Simd::Store(alpha, rescale);
    UpdateAllOutputs(o, d_len, rows, alpha, probs, values, nk);
  }

  alignas(64) float sums[kLanes];
  Simd::Store(sums, run_sum);
  StoreTileOutputs(p, tile, o, sums);
}

std::vector<Tile> MakeTiles(const Problem& p) {
  const int64_t group = p.group();
  // A tile holds whole GQA groups of as many tokens as fit in kLanes lanes; a group wider than
  // kLanes heads is split into kLanes-head slices of one token.
  const int64_t heads_per_tile = std::min<int64_t>(group, kLanes);
  const int64_t tokens_per_tile = std::max<int64_t>(1, kLanes / group);
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    const int64_t first_pos = p.context_lens[s] - q_len;
    for (int64_t t0 = 0; t0 < q_len; t0 += tokens_per_tile) {
      const int64_t nt = std::min(tokens_per_tile, q_len - t0);
      for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh) {
        for (int64_t h0 = 0; h0 < group; h0 += heads_per_tile) {
          Tile tile;
          tile.seq = static_cast<int32_t>(s);
          tile.kv_head = static_cast<int32_t>(kvh);
          tile.tok_begin = static_cast<int32_t>(t0);
          tile.tok_count = static_cast<int32_t>(nt);
          tile.head_begin = static_cast<int32_t>(h0);
          tile.head_count = static_cast<int32_t>(std::min(heads_per_tile, group - h0));
          tile.cost = first_pos + t0 + nt;
          tiles.push_back(tile);
        }
      }
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  return tiles;
}

void RunTiled(const Problem& p, int num_threads) {
  const std::vector<Tile> tiles = MakeTiles(p);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  // Below ~2k key visits (tens of microseconds) waking a second thread costs more than it saves.
  int64_t key_visits = 0;
  for (const Tile& tile : tiles) key_visits += tile.cost;
  const bool parallel = num_threads > 1 && num_tiles > 1 && key_visits >= kMinParallelKeyVisits;
  if (parallel) LimitSpinWait();
  WorkQueue queue;
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    AlignedFloats qt(static_cast<size_t>(p.head_dim) * kLanes);
    AlignedFloats o(static_cast<size_t>(p.head_dim) * kLanes);
    for (int64_t i = queue.Take(); i < num_tiles; i = queue.Take()) AttendTile(p, tiles[i], qt.get(), o.get());
  }
}

#endif  // FD_ATTENTION_TILED

// ---------------------------------------------------------------------------------------------
// Op entry.

paddle::Tensor Contiguous(const paddle::Tensor& x) { return x.is_contiguous() ? x : x.contiguous(); }

// Checks every index the kernels will follow so the parallel section cannot read out of bounds.
int64_t ValidateMetadata(const Problem& p) {
  PD_CHECK(p.query_start_loc[0] == 0, "query_start_loc[0] must be 0");
  PD_CHECK(p.query_start_loc[p.num_seqs] == p.num_tokens,
           "query_start_loc[-1] (", p.query_start_loc[p.num_seqs], ") must equal num_tokens (", p.num_tokens, ")");
  int64_t max_context = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    const int64_t ctx = p.context_lens[s];
    PD_CHECK(q_len >= 0, "query_start_loc must be non-decreasing");
    PD_CHECK(q_len <= ctx, "sequence ", s, " has ", q_len, " queries but context_len ", ctx);
    PD_CHECK(ctx <= p.max_blocks_per_seq * p.block_size, "sequence ", s, " context_len ", ctx,
             " exceeds its block table");
    if (q_len == 0) continue;
    const int64_t used_blocks = (ctx + p.block_size - 1) / p.block_size;
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int64_t block = p.block_tables[s * p.max_blocks_per_seq + b];
      PD_CHECK(block >= 0 && block < p.num_blocks, "sequence ", s, " block table entry ", b, " = ", block,
               " is outside [0, ", p.num_blocks, ")");
    }
    max_context = std::max(max_context, ctx);
  }
  return max_context;
}

std::vector<paddle::Tensor> PagedAttentionKernel(const paddle::Tensor& query, const paddle::Tensor& key_cache,
                                                 const paddle::Tensor& value_cache,
                                                 const paddle::Tensor& block_tables,
                                                 const paddle::Tensor& context_lens,
                                                 const paddle::Tensor& query_start_loc, float scale,
                                                 int impl, int num_threads) {
  for (const paddle::Tensor* t : {&query, &key_cache, &value_cache, &block_tables, &context_lens, &query_start_loc}) {
    PD_CHECK(t->is_cpu(), "paged_attention (native) takes CPU tensors only");
  }
  PD_CHECK(query.dtype() == paddle::DataType::FLOAT32, "query must be float32");
  PD_CHECK(key_cache.dtype() == paddle::DataType::FLOAT32 && value_cache.dtype() == paddle::DataType::FLOAT32,
           "caches must be float32");
  PD_CHECK(block_tables.dtype() == paddle::DataType::INT32 && context_lens.dtype() == paddle::DataType::INT32 &&
               query_start_loc.dtype() == paddle::DataType::INT32,
           "block_tables, context_lens and query_start_loc must be int32");
  PD_CHECK(query.shape().size() == 3, "query must be [num_tokens, num_heads, head_dim]");
  PD_CHECK(key_cache.shape().size() == 4 && key_cache.shape() == value_cache.shape(),
           "caches must both be [num_blocks, num_kv_heads, block_size, head_dim]");
  PD_CHECK(block_tables.shape().size() == 2, "block_tables must be [num_seqs, max_blocks_per_seq]");

  const paddle::Tensor q_c = Contiguous(query);
  const paddle::Tensor kc_c = Contiguous(key_cache);
  const paddle::Tensor vc_c = Contiguous(value_cache);
  const paddle::Tensor bt_c = Contiguous(block_tables);
  const paddle::Tensor cl_c = Contiguous(context_lens);
  const paddle::Tensor qsl_c = Contiguous(query_start_loc);

  Problem p;
  p.num_tokens = query.shape()[0];
  p.num_heads = query.shape()[1];
  p.head_dim = query.shape()[2];
  p.num_blocks = key_cache.shape()[0];
  p.num_kv_heads = key_cache.shape()[1];
  p.block_size = key_cache.shape()[2];
  p.num_seqs = block_tables.shape()[0];
  p.max_blocks_per_seq = block_tables.shape()[1];
  p.scale = scale;
  PD_CHECK(key_cache.shape()[3] == p.head_dim, "cache head_dim differs from query head_dim");
  PD_CHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0, "num_heads (", p.num_heads,
           ") must be a multiple of num_kv_heads (", p.num_kv_heads, ")");
  PD_CHECK(context_lens.numel() == p.num_seqs, "context_lens must have num_seqs entries");
  PD_CHECK(query_start_loc.numel() == p.num_seqs + 1, "query_start_loc must have num_seqs + 1 entries");

  paddle::Tensor out = paddle::empty({p.num_tokens, p.num_heads, p.head_dim}, paddle::DataType::FLOAT32,
                                     query.place());
  if (p.num_tokens == 0) return {out};

  p.query = q_c.data<float>();
  p.key_cache = kc_c.data<float>();
  p.value_cache = vc_c.data<float>();
  p.block_tables = bt_c.data<int32_t>();
  p.context_lens = cl_c.data<int32_t>();
  p.query_start_loc = qsl_c.data<int32_t>();
  p.out = out.data<float>();
  const int64_t max_context = ValidateMetadata(p);

  // impl: 0 = best available, 1 = scalar (kept reachable so tests cover it on AVX-512 hosts).
  num_threads = std::max(num_threads, 1);
#ifdef FD_ATTENTION_TILED
  if (impl != 1 && p.head_dim % kLanes == 0) {
    RunTiled(p, num_threads);
    return {out};
  }
#endif
  RunScalar(p, max_context, num_threads);
  return {out};
}

std::vector<std::vector<int64_t>> PagedAttentionInferShape(const std::vector<int64_t>& query_shape,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&) {
  return {query_shape};
}

std::vector<paddle::DataType> PagedAttentionInferDtype(const paddle::DataType& query_dtype,
                                                       const paddle::DataType&, const paddle::DataType&,
                                                       const paddle::DataType&, const paddle::DataType&,
                                                       const paddle::DataType&) {
  return {query_dtype};
}

}  // namespace

paddle::Tensor fd_attention::PagedAttention(const paddle::Tensor& query, const paddle::Tensor& key_cache,
                                            const paddle::Tensor& value_cache, const paddle::Tensor& block_tables,
                                            const paddle::Tensor& context_lens,
                                            const paddle::Tensor& query_start_loc, float scale, int impl,
                                            int num_threads) {
  return PagedAttentionKernel(query, key_cache, value_cache, block_tables, context_lens, query_start_loc, scale,
                              impl, num_threads)[0];
}

PD_BUILD_OP(fd_paged_attention)
    .Inputs({"Query", "KeyCache", "ValueCache", "BlockTables", "ContextLens", "QueryStartLoc"})
    .Outputs({"Out"})
    .Attrs({"scale: float", "impl: int", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(PagedAttentionKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(PagedAttentionInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PagedAttentionInferDtype));
