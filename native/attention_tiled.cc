// The vector kernels of fd_paged_attention (paged_attention.cc has the op, the metadata checks and
// the portable scalar kernel).
//
// Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its q_len queries are the
// last q_len positions of its context, so query j sits at p = context_len - q_len + j and sees
// cache positions 0..p (causal). Query head h reads kv head h / (num_heads / num_kv_heads).
//
// The vector path (AVX-512 or AVX2) works on tiles: one sequence, one kv head and up to kLanes
// (16 or 8) "rows", a row being a (query token, query head of that kv head's group) pair. Rows
// live in the lanes of one vector register, so one key row is broadcast against all rows at once:
// scores need no horizontal reductions, the K/V rows are read once per tile for all its rows, and
// the online softmax (running max, running sum, rescaled accumulator) is lane-wise. Keys are
// visited kKeyTile at a time in position order; causality is a lane mask. Single-token tiles of up
// to three rows (decode) take the narrow kernel instead, with lanes along head_dim (see
// AttendNarrowTile).
//
// The caches hold float32, float16 or int8 rows (kv_types.h); all arithmetic is fp32. The narrow
// kernel widens float16 and int8 chunks in registers as it loads them and applies an int8 row's step
// to its dot product and to its probability; the wide kernel, which broadcasts single key elements,
// widens (and scales) each step's rows once into a staging buffer (NextRowsF32).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_problem.h"
#include "attention_simd.h"
#include "kv_types.h"
#include "thread_pool.h"

namespace fd_paged_attention {

#ifndef FD_ATTENTION_TILED

bool TiledSupports(const Problem&) { return false; }
void RunTiled(const Problem&, int) {}

#else

namespace {

using fd_attention_simd::Simd;
using Vec = Simd::V;
constexpr int kLanes = Simd::kLanes;  // rows per tile: one register of fp32
constexpr int kKeyTile = 32;          // keys per online-softmax step (16: 1.03-1.08x the decode time)
constexpr int64_t kMinParallelKeyVisits = 2048;

// A tile is a run of one kv head's query rows of one sequence. The rows are flattened as
// (query token relative to the sequence's first query) * group + (query head within the group), so
// a tile of kLanes rows fills every lane whatever the group size (GQA groups of 3 left a quarter of
// 8 lanes idle when tiles held whole groups).
struct Tile {
  int32_t seq;
  int32_t kv_head;
  int32_t row_begin;
  int32_t row_count;
  int64_t cost;  // keys visited, for scheduling the long tiles first
};

// The query token (index into p.query) and head of a tile's row r, and the token's offset from the
// sequence's first query.
struct RowPlace {
  int64_t token;
  int64_t head;
  int64_t tok_rel;
};

inline RowPlace PlaceOf(const Problem& p, const Tile& tile, int r) {
  const int64_t group = p.group();
  const int64_t row = tile.row_begin + r;
  const int64_t tok_rel = row / group;
  return {p.query_start_loc[tile.seq] + tok_rel, tile.kv_head * group + row % group, tok_rel};
}

// Position of the sequence's first query in this step (its earlier tokens are cached).
inline int64_t FirstQueryPos(const Problem& p, int64_t seq) {
  return p.context_lens[seq] - (p.query_start_loc[seq + 1] - p.query_start_loc[seq]);
}

// Walks one sequence's positions in order, kKeyTile at a time, yielding the cache offset (in
// floats) of each position's row for one kv head; tracks block and offset incrementally (no
// divisions).
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
      offsets[n++] = (row0_ + in_block_) * p_.row_elems;
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
void LoadTileQueries(const Problem& p, const Tile& tile, float* qt, int32_t* qpos) {
  const int64_t d_len = p.head_dim;
  const int64_t first_pos = FirstQueryPos(p, tile.seq);
  std::fill(qt, qt + d_len * kLanes, 0.f);
  std::fill(qpos, qpos + kLanes, -1);
  for (int r = 0; r < tile.row_count; ++r) {
    const RowPlace at = PlaceOf(p, tile, r);
    const float* q = p.query + (at.token * p.num_heads + at.head) * d_len;
    for (int64_t d = 0; d < d_len; ++d) qt[d * kLanes + r] = q[d] * p.scale;
    qpos[r] = static_cast<int32_t>(first_pos + at.tok_rel);
  }
}

// Divides each row's accumulator by its softmax sum and writes it to the output.
void StoreTileOutputs(const Problem& p, const Tile& tile, const float* o, const float* sums) {
  const int64_t d_len = p.head_dim;
  for (int r = 0; r < tile.row_count; ++r) {
    const RowPlace at = PlaceOf(p, tile, r);
    float* dst = p.out + (at.token * p.num_heads + at.head) * d_len;
    const Vec inv = Simd::Set1(1.f / sums[r]);
    for (int64_t c = 0; c < d_len; c += kLanes) Simd::StoreU(dst + c, Simd::Mul(Simd::Load(o + r * d_len + c), inv));
  }
}

// Decode-like tiles (few rows) stream the context from DRAM once with little math per key:
// prefetching the next step's rows of K and V while this tile computes hides the latency of the
// scattered blocks. Wide (prefill) tiles are compute-bound and reread K/V from L2 instead.
template <typename T>
void PrefetchRows(const Problem& p, const int64_t* offsets, int count) {
  for (int j = 0; j < count; ++j) {
    const char* k_next = reinterpret_cast<const char*>(p.Keys<T>() + offsets[j]);
    const char* v_next = reinterpret_cast<const char*>(p.Values<T>() + offsets[j]);
    for (int64_t byte = 0; byte < p.row_elems * static_cast<int64_t>(sizeof(T)); byte += 64) {
      _mm_prefetch(k_next + byte, _MM_HINT_T0);
      _mm_prefetch(v_next + byte, _MM_HINT_T0);
    }
  }
}

// The K and V rows (elements of type T) of a tile's keys, kKeyTile per step, the next step's rows
// prefetched when `prefetch` (see PrefetchRows).
template <typename T>
class KeyRows {
 public:
  KeyRows(const Problem& p, const Tile& tile, int64_t num_keys, bool prefetch)
      : p_(p), cursor_(p, tile.seq, tile.kv_head), num_keys_(num_keys), prefetch_(prefetch) {
    next_count_ = cursor_.Next(num_keys_, next_offsets_);
  }

  // Points keys[j] and values[j] at the next step's rows and returns how many there are. Past the
  // end the last row is repeated, so kernels that read keys in fixed groups read valid memory.
  int Next(const T** keys, const T** values) {
    const int nk = next_count_;
    for (int j = 0; j < kKeyTile; ++j) {
      const int64_t offset = next_offsets_[std::min(j, nk - 1)];
      keys[j] = p_.Keys<T>() + offset;
      values[j] = p_.Values<T>() + offset;
    }
    next_count_ = cursor_.Next(num_keys_, next_offsets_);
    if (prefetch_) PrefetchRows<T>(p_, next_offsets_, next_count_);
    return nk;
  }

 private:
  const Problem& p_;
  KeyCursor cursor_;
  int64_t num_keys_;
  bool prefetch_;
  int64_t next_offsets_[kKeyTile];
  int next_count_;
};

// The next step's rows as fp32 for the wide kernel, which broadcasts single key elements: float16
// and int8 rows are widened (int8 ones times their step) once into `stage` ([2][kKeyTile][head_dim])
// rather than element by element in the inner loop. Padding entries point at the last widened row,
// as KeyRows's do.
// One key row and one value row as fp32 (int8 codes times their row's step).
template <typename T>
void WidenRows(const T* k_src, const T* v_src, int64_t head_dim, float* k_dst, float* v_dst) {
  if constexpr (std::is_same_v<T, int8_t>) {
    const Vec k_step = Simd::Set1(fd_kv::RowStep(k_src, head_dim));
    const Vec v_step = Simd::Set1(fd_kv::RowStep(v_src, head_dim));
    for (int64_t c = 0; c < head_dim; c += kLanes) {
      Simd::Store(k_dst + c, Simd::Mul(Simd::LoadU(k_src + c), k_step));
      Simd::Store(v_dst + c, Simd::Mul(Simd::LoadU(v_src + c), v_step));
    }
  } else {
    for (int64_t c = 0; c < head_dim; c += kLanes) {
      Simd::Store(k_dst + c, Simd::LoadU(k_src + c));
      Simd::Store(v_dst + c, Simd::LoadU(v_src + c));
    }
  }
}

template <typename T>
int NextRowsF32(KeyRows<T>& rows, int64_t head_dim, float* stage, const float** keys, const float** values) {
  if constexpr (std::is_same_v<T, float>) {
    return rows.Next(keys, values);
  } else {
    const T* k_src[kKeyTile];
    const T* v_src[kKeyTile];
    const int nk = rows.Next(k_src, v_src);
    for (int j = 0; j < kKeyTile; ++j) {
      float* k_dst = stage + std::min(j, nk - 1) * head_dim;
      float* v_dst = k_dst + kKeyTile * head_dim;
      if (j < nk) WidenRows(k_src[j], v_src[j], head_dim, k_dst, v_dst);
      keys[j] = k_dst;
      values[j] = v_dst;
    }
    return nk;
  }
}

// Online softmax over the tile's keys, kKeyTile at a time: running max, running sum and an
// accumulator rescaled whenever the max grows. stage: 2 x kKeyTile x head_dim floats (float16 and
// int8 caches).
template <typename T>
void AttendTile(const Problem& p, const Tile& tile, float* qt, float* o, float* stage) {
  const int64_t d_len = p.head_dim;
  const int rows = tile.row_count;
  alignas(64) int32_t qpos[kLanes];
  LoadTileQueries(p, tile, qt, qpos);
  const int64_t first_pos = qpos[0];  // the tile's first row has its earliest position
  std::fill(o, o + kLanes * d_len, 0.f);

  const Vec neg_inf = Simd::Set1(-std::numeric_limits<float>::infinity());
  Vec run_max = neg_inf;
  Vec run_sum = Simd::Zero();
  const int64_t num_keys = qpos[rows - 1] + 1;  // the last row's position + 1

  alignas(64) float probs[kKeyTile][kLanes];
  alignas(64) float alpha[kLanes];
  const float* keys[kKeyTile];
  const float* values[kKeyTile];
  Vec scores[kKeyTile];

  KeyRows<T> rows_of_keys(p, tile, num_keys, /*prefetch=*/rows <= kLanes / 2);
  for (int64_t k0 = 0; k0 < num_keys; k0 += kKeyTile) {
    const int nk = NextRowsF32(rows_of_keys, d_len, stage, keys, values);
    for (int j0 = 0; j0 < nk; j0 += 8) ScoreEightKeys(keys + j0, qt, d_len, scores + j0);

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

// ---------------------------------------------------------------------------------------------
// Narrow tiles: one query token and at most kMaxNarrowRows heads (decode with GQA groups of up to
// three query heads). A lane-per-row tile would leave most lanes idle (3 rows of 8 or 16) and
// broadcast head_dim scalars per key; here lanes run along head_dim: each key chunk is loaded once
// for all rows, four keys' dot products are reduced together, and the probability-weighted values
// are accumulated per row. A single query sees every key of the tile (num_keys = its position + 1),
// so nothing is masked.

constexpr int kMaxNarrowRows = 3;

// scores[h][j0 + j] = q[h] . keys[j] for j = 0..3 (q pre-scaled). Keys of type T (float, or float16
// or int8 widened as they are loaded; an int8 key's step multiplies its dot products).
template <int R, typename T>
inline void ScoreFourKeysNarrow(const float* const* q, const T* const* keys, int64_t head_dim,
                                float (*scores)[kKeyTile], int j0) {
  Vec acc[R][4];
  for (int h = 0; h < R; ++h) {
    for (int j = 0; j < 4; ++j) acc[h][j] = Simd::Zero();
  }
  for (int64_t c = 0; c < head_dim; c += kLanes) {
    for (int j = 0; j < 4; ++j) {
      const Vec k = Simd::LoadU(keys[j] + c);
      for (int h = 0; h < R; ++h) acc[h][j] = Simd::Fmadd(Simd::Load(q[h] + c), k, acc[h][j]);
    }
  }
  for (int h = 0; h < R; ++h) {
    __m128 dots = Simd::Sum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    if constexpr (std::is_same_v<T, int8_t>) {
      dots = _mm_mul_ps(dots, _mm_setr_ps(fd_kv::RowStep(keys[0], head_dim), fd_kv::RowStep(keys[1], head_dim),
                                          fd_kv::RowStep(keys[2], head_dim), fd_kv::RowStep(keys[3], head_dim)));
    }
    _mm_storeu_ps(&scores[h][j0], dots);
  }
}

// Online-softmax step of each row over nk scores (entries from nk on are ignored): probs, the
// rescale factor alpha of the row's accumulator, and the updated running max and sum.
template <int R>
inline void SoftmaxStepNarrow(float (*scores)[kKeyTile], int nk, float* run_max, float* run_sum,
                              float (*probs)[kKeyTile], float* alpha) {
  for (int h = 0; h < R; ++h) {
    for (int j = nk; j < kKeyTile; ++j) scores[h][j] = -std::numeric_limits<float>::infinity();
    // A vector max, then its lanes: a scalar chain over the step's keys was 3 cycles per key.
    Vec lanes_max = Simd::Load(&scores[h][0]);
    for (int j = kLanes; j < kKeyTile; j += kLanes) lanes_max = Simd::Max(lanes_max, Simd::Load(&scores[h][j]));
    const float new_max = std::max(run_max[h], Simd::MaxLane(lanes_max));
    Vec sum = Simd::Zero();
    for (int j = 0; j < kKeyTile; j += kLanes) {
      const Vec e = Simd::Exp(Simd::Sub(Simd::Load(&scores[h][j]), Simd::Set1(new_max)));
      Simd::Store(&probs[h][j], e);
      sum = Simd::Add(sum, e);
    }
    const float block_sum = Simd::SumLane(sum);
    // 0 on the first step (run_max = -inf). Past the first few steps the max rarely moves, and
    // the scalar exp per row and step was ~1 % of a 32-stream decode step.
    alpha[h] = new_max == run_max[h] ? 1.f : std::exp(run_max[h] - new_max);
    run_sum[h] = run_sum[h] * alpha[h] + block_sum;
    run_max[h] = new_max;
  }
}

// o[h][c0 .. c0 + CHUNKS * kLanes) = o * alpha[h] + sum_j probs[h][j] * v_j, accumulators in registers.
// One value chunk is live at a time, so R x CHUNKS accumulators + R weights + 1 value fit the
// register file with CHUNKS = kNarrowChunks (AVX2: 3 x 4 + 3 + 1 = 16): fewer passes over the keys,
// each with enough independent FMA chains to hide the FMA latency.
template <int R, int CHUNKS, typename T>
inline void UpdateNarrow(float* __restrict o, int64_t head_dim, int64_t c0, const float* alpha,
                         const float (*probs)[kKeyTile], const T* const* values, int nk) {
  Vec acc[R][CHUNKS];
  for (int h = 0; h < R; ++h) {
    const Vec scale = Simd::Set1(alpha[h]);
    for (int b = 0; b < CHUNKS; ++b) acc[h][b] = Simd::Mul(Simd::Load(o + h * head_dim + c0 + b * kLanes), scale);
  }
  for (int j = 0; j < nk; ++j) {
    const float step = fd_kv::RowStep(values[j], head_dim);  // 1 but for int8 rows
    Vec w[R];
    for (int h = 0; h < R; ++h) w[h] = Simd::Set1(probs[h][j] * step);
    for (int b = 0; b < CHUNKS; ++b) {
      const Vec v = Simd::LoadU(values[j] + c0 + b * kLanes);
      for (int h = 0; h < R; ++h) acc[h][b] = Simd::Fmadd(w[h], v, acc[h][b]);
    }
  }
  for (int h = 0; h < R; ++h) {
    for (int b = 0; b < CHUNKS; ++b) Simd::Store(o + h * head_dim + c0 + b * kLanes, acc[h][b]);
  }
}

template <int R, typename T>
void UpdateAllNarrow(float* o, int64_t head_dim, const float* alpha, const float (*probs)[kKeyTile],
                     const T* const* values, int nk) {
  constexpr int kChunks = Simd::kNarrowChunks;
  const int64_t chunks = head_dim / kLanes;
  int64_t c = 0;
  for (; c + kChunks <= chunks; c += kChunks) {
    UpdateNarrow<R, kChunks>(o, head_dim, c * kLanes, alpha, probs, values, nk);
  }
  for (; c < chunks; ++c) UpdateNarrow<R, 1>(o, head_dim, c * kLanes, alpha, probs, values, nk);
}

// qbuf and o hold at least R x head_dim floats, 64-byte aligned.
template <int R, typename T>
void AttendNarrowTile(const Problem& p, const Tile& tile, float* qbuf, float* o) {
  const int64_t d_len = p.head_dim;
  const RowPlace first = PlaceOf(p, tile, 0);  // all R rows are heads of this token
  const int64_t num_keys = FirstQueryPos(p, tile.seq) + first.tok_rel + 1;
  const float* q[R];
  for (int h = 0; h < R; ++h) {
    const float* src = p.query + (first.token * p.num_heads + first.head + h) * d_len;
    float* dst = qbuf + h * d_len;
    for (int64_t d = 0; d < d_len; ++d) dst[d] = src[d] * p.scale;
    q[h] = dst;
  }
  std::fill(o, o + R * d_len, 0.f);

  float run_max[R];
  float run_sum[R];
  std::fill(run_max, run_max + R, -std::numeric_limits<float>::infinity());
  std::fill(run_sum, run_sum + R, 0.f);
  alignas(64) float scores[R][kKeyTile];
  alignas(64) float probs[R][kKeyTile];
  float alpha[R];
  const T* keys[kKeyTile];
  const T* values[kKeyTile];

  KeyRows<T> rows_of_keys(p, tile, num_keys, /*prefetch=*/true);
  for (int64_t k0 = 0; k0 < num_keys; k0 += kKeyTile) {
    const int nk = rows_of_keys.Next(keys, values);
    for (int j0 = 0; j0 < nk; j0 += 4) ScoreFourKeysNarrow<R>(q, keys + j0, d_len, scores, j0);
    SoftmaxStepNarrow<R>(scores, nk, run_max, run_sum, probs, alpha);
    UpdateAllNarrow<R>(o, d_len, alpha, probs, values, nk);
  }

  for (int h = 0; h < R; ++h) {
    float* dst = p.out + (first.token * p.num_heads + first.head + h) * d_len;
    const Vec inv = Simd::Set1(1.f / run_sum[h]);
    for (int64_t c = 0; c < d_len; c += kLanes) Simd::StoreU(dst + c, Simd::Mul(Simd::Load(o + h * d_len + c), inv));
  }
}

// A tile by the kernel that suits it, over a cache of element type T.
template <typename T>
void AttendAnyTile(const Problem& p, const Tile& tile, float* qt, float* o, float* stage) {
  const int64_t group = p.group();
  const bool one_token = tile.row_begin / group == (tile.row_begin + tile.row_count - 1) / group;
  if (one_token && tile.row_count <= kMaxNarrowRows) {
    switch (tile.row_count) {
      case 1: AttendNarrowTile<1, T>(p, tile, qt, o); return;
      case 2: AttendNarrowTile<2, T>(p, tile, qt, o); return;
      case 3: AttendNarrowTile<3, T>(p, tile, qt, o); return;
      default: break;
    }
  }
  AttendTile<T>(p, tile, qt, o, stage);
}

std::vector<Tile> MakeTiles(const Problem& p) {
  const int64_t group = p.group();
  std::vector<Tile> tiles;
  auto add = [&](int64_t seq, int64_t kv_head, int64_t row_begin, int64_t row_count) {
    const int64_t last_tok_rel = (row_begin + row_count - 1) / group;
    tiles.push_back(Tile{static_cast<int32_t>(seq), static_cast<int32_t>(kv_head), static_cast<int32_t>(row_begin),
                         static_cast<int32_t>(row_count), FirstQueryPos(p, seq) + last_tok_rel + 1});
  };
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    const int64_t total_rows = q_len * group;
    for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      if (q_len == 1 || group > kLanes) {
        // One token's group per tile (a decode token's group is the narrow kernel's shape), in
        // kLanes-head slices where the group is wider than a register.
        for (int64_t t = 0; t < q_len; ++t) {
          for (int64_t h0 = 0; h0 < group; h0 += kLanes) {
            add(s, kvh, t * group + h0, std::min<int64_t>(kLanes, group - h0));
          }
        }
      } else {
        for (int64_t r0 = 0; r0 < total_rows; r0 += kLanes) add(s, kvh, r0, std::min<int64_t>(kLanes, total_rows - r0));
      }
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  return tiles;
}

}  // namespace

bool TiledSupports(const Problem& p) { return p.head_dim % kLanes == 0; }

void RunTiled(const Problem& p, int num_threads) {
  const std::vector<Tile> tiles = MakeTiles(p);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  // Below ~2k key visits (tens of microseconds) waking a second thread costs more than it saves.
  int64_t key_visits = 0;
  for (const Tile& tile : tiles) key_visits += tile.cost;
  const bool parallel = num_threads > 1 && num_tiles > 1 && key_visits >= kMinParallelKeyVisits;
  fd_threads::ParallelFor(num_tiles, parallel ? num_threads : 1, [&](int64_t i) {
    static thread_local ThreadFloats qt, o, stage;
    const size_t floats = static_cast<size_t>(p.head_dim) * kLanes;
    fd_kv::Visit(p.cache_type, [&](auto element) {
      using T = decltype(element);
      float* staging = std::is_same_v<T, float> ? nullptr : stage.Get(2 * kKeyTile * static_cast<size_t>(p.head_dim));
      AttendAnyTile<T>(p, tiles[i], qt.Get(floats), o.Get(floats), staging);
    });
  });
}


#endif  // FD_ATTENTION_TILED

}  // namespace fd_paged_attention
