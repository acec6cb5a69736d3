// Linear layers y = x @ W (+ bias) with pre-packed fp32, bf16 or weight-only 8-bit weights, as a
// Paddle custom operator (fd_linear) for CPUs with AVX-512.
//
// Packed weight layout (built once in Python, fastdeploy/model_executor/layers/linear.py): W [K, N]
// is cut into panels of kPanel = 32 output columns (the last one zero-padded). Each panel is one
// contiguous block running along K, so a kernel walking a panel streams memory linearly and every
// cache line it pulls holds only weights it needs:
//   fp32 : float  [K][32]
//   bf16 : uint16 [K/2][32][2]   k-pairs interleaved: the operand layout of vdpbf16ps, which a
//                                fp32 kernel widens with one shift or one mask per 16 weights.
//   u8   : per group of G rows along K: uint8 [G][32], float scale[32], float zero[32]
//          (w = u * scale + zero)
//
// A micro-kernel computes a tile of MR <= 12 rows x 32 columns with its accumulators (MR x 2 zmm)
// in registers over the K range it is given. Small M (decode) streams each panel once, widening or
// dequantizing the weights in registers; fp32 activations keep full precision and the kernel is
// memory-bound anyway. Large M (prefill, big batches) cuts the rows into blocks of 96; all row
// tiles of a block pass over one panel slice while it sits in L2: quantized weights are
// dequantized once per slice into a buffer, and with bf16_dot the activations are rounded to bf16
// once and multiplied with vdpbf16ps at twice the fp32 FMA rate. Threads claim work items (an M
// block x a run of consecutive panels) from a shared counter.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "paddle/extension.h"

#ifdef __AVX512F__
namespace fd_linear {

constexpr int kPanel = 32;   // output columns per packed panel (two zmm of fp32)
constexpr int kMaxRows = 12;  // rows per micro-tile: 24 accumulators + operands fit in 32 zmm

// With few rows there are too few independent accumulators to hide the FMA latency (4 cycles,
// 2 pipes), so small tiles keep a second set for odd k and add the two at the end.
template <int MR>
constexpr bool kSplitK = MR <= 4;

template <int MR>
inline void ZeroTile(__m512 (&acc)[MR][2]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
}

template <int MR>
inline void AddTile(__m512 (&acc)[MR][2], const __m512 (&other)[MR][2]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm512_add_ps(acc[r][0], other[r][0]);
    acc[r][1] = _mm512_add_ps(acc[r][1], other[r][1]);
  }
}

// acc[r] += x[r] * (b0 | b1) for one k.
template <int MR>
inline void FmaRow(__m512 (&acc)[MR][2], const float* a, int64_t lda, int64_t k, __m512 b0, __m512 b1) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 av = _mm512_set1_ps(a[r * lda + k]);
    acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
    acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
  }
}

// Writes the tile to c (row stride ldc), adding the bias (per column, may be null) and, when
// `accumulate`, what c already holds (the partial sum of earlier K blocks). Masks cover a last
// panel narrower than 32 columns. `stream` (full, 64-byte aligned panels only) writes around the
// caches: see Problem::stream_output.
template <int MR>
inline void StoreTile(const __m512 (&acc)[MR][2], float* c, int64_t ldc, const float* bias, __mmask16 m0,
                      __mmask16 m1, bool accumulate, bool stream) {
  __m512 bias0 = _mm512_setzero_ps();
  __m512 bias1 = _mm512_setzero_ps();
  if (bias != nullptr) {
    bias0 = _mm512_maskz_loadu_ps(m0, bias);
    bias1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
    __m512 v0 = _mm512_add_ps(acc[r][0], bias0);
    __m512 v1 = _mm512_add_ps(acc[r][1], bias1);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    if (stream) {
      _mm512_stream_ps(row, v0);
      _mm512_stream_ps(row + 16, v1);
    } else {
      _mm512_mask_storeu_ps(row, m0, v0);
      _mm512_mask_storeu_ps(row + 16, m1, v1);
    }
  }
}

// Software prefetch of the next panel slice, a few lines per k step of the current one. The
// hardware prefetchers stop at 4 KB page boundaries and a slice spans 5-18 pages; without this,
// a kernel that dequantizes a panel, or a tile that starts on a new one, stalls on DRAM latency.
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  inline void Step(int lines) {
    for (int i = 0; i < lines && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// ---------------------------------------------------------------------------------------------
// fp32 activations x fp32 panel [kc][32] (packed weights, or a panel dequantized into a buffer).

template <int MR>
inline void TileF32(const float* a, int64_t lda, const float* b, int64_t kc, Prefetcher& pf,
                    __m512 (&acc)[MR][2]) {
  ZeroTile(acc);
  int64_t k = 0;
  if constexpr (kSplitK<MR>) {
    __m512 odd[MR][2];
    ZeroTile(odd);
    for (; k + 1 < kc; k += 2) {
      const float* bk = b + k * kPanel;
      pf.Step(4);
      FmaRow<MR>(acc, a, lda, k, _mm512_loadu_ps(bk), _mm512_loadu_ps(bk + 16));
      FmaRow<MR>(odd, a, lda, k + 1, _mm512_loadu_ps(bk + kPanel), _mm512_loadu_ps(bk + kPanel + 16));
    }
    AddTile(acc, odd);
  }
  for (; k < kc; ++k) {
    const float* bk = b + k * kPanel;
    pf.Step(2);
    FmaRow<MR>(acc, a, lda, k, _mm512_loadu_ps(bk), _mm512_loadu_ps(bk + 16));
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 activations x bf16 panel [kc/2][32][2], widened to fp32 in registers (kc even). A bf16 is
// the top half of an fp32, so the even element of a pair becomes fp32 by a left shift of its
// 32-bit lane and the odd one by masking off the low half: exact, two integer ops per 16 weights.

inline __m512 WidenLow(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline __m512 WidenHigh(__m512i pairs, __m512i high_mask) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, high_mask));
}

template <int MR>
inline void TileBF16Widen(const float* a, int64_t lda, const uint16_t* b, int64_t kc, Prefetcher& pf,
                          __m512 (&acc)[MR][2]) {
  const __m512i high_mask = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  ZeroTile(acc);
  __m512 odd[MR][2];
  if constexpr (kSplitK<MR>) ZeroTile(odd);
  for (int64_t k = 0; k < kc; k += 2) {
    const uint16_t* bk = b + k * kPanel;  // k/2 pairs of 64 bf16
    pf.Step(2);
    const __m512i p0 = _mm512_loadu_si512(bk);
    const __m512i p1 = _mm512_loadu_si512(bk + kPanel);
    if constexpr (kSplitK<MR>) {
      FmaRow<MR>(acc, a, lda, k, WidenLow(p0), WidenLow(p1));
      FmaRow<MR>(odd, a, lda, k + 1, WidenHigh(p0, high_mask), WidenHigh(p1, high_mask));
    } else {
      FmaRow<MR>(acc, a, lda, k, WidenLow(p0), WidenLow(p1));
      FmaRow<MR>(acc, a, lda, k + 1, WidenHigh(p0, high_mask), WidenHigh(p1, high_mask));
    }
  }
  if constexpr (kSplitK<MR>) AddTile(acc, odd);
}

// ---------------------------------------------------------------------------------------------
// fp32 activations x 8-bit panel, dequantized in registers: w = float(u) * scale + zero, with one
// (scale, zero) per group of G rows and column. The affine form holds both the symmetric grid of
// Q8_0 (zero = -128 scale) and the min-based grid of Q4_0/Q4_1/Q5_x, so requantizing a GGUF block
// of 32 onto it is exact (the Python quantizer picks the grid per group).
// `b` points at the first group of the K range; kc is a multiple of the group size.

inline __m512 LoadU8AsF32(const uint8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

// u8 [G][32], then float scale[32], then float zero[32].
inline int64_t U8GroupBytes(int group) { return static_cast<int64_t>(group) * kPanel + kPanel * 8; }

// Few rows (MR <= 4): the conversion dominates, so each group accumulates x * float(u) and the
// affine map is applied once per group: acc += partial * scale + sum(x over the group) * zero
// (the sums come precomputed in `xsum`, row stride xsum_ld). Three vector ops per 16 weights
// (widen, convert, FMA) instead of four. More rows: the dequantized weights are shared by all
// rows and per-group partial sums would not fit in the registers, so w = u * scale + zero.
template <int MR>
inline void TileU8(const float* a, int64_t lda, const uint8_t* b, int64_t kc, int group, const float* xsum,
                   int64_t xsum_ld, Prefetcher& pf, __m512 (&acc)[MR][2]) {
  ZeroTile(acc);
  const int64_t group_bytes = U8GroupBytes(group);
  for (int64_t g0 = 0, g = 0; g0 < kc; g0 += group, ++g, b += group_bytes) {
    const float* scale = reinterpret_cast<const float*>(b + static_cast<int64_t>(group) * kPanel);
    const __m512 s0 = _mm512_loadu_ps(scale);
    const __m512 s1 = _mm512_loadu_ps(scale + 16);
    const __m512 z0 = _mm512_loadu_ps(scale + kPanel);
    const __m512 z1 = _mm512_loadu_ps(scale + kPanel + 16);
    if constexpr (MR <= 4) {
      __m512 part[MR][2];
      __m512 odd[MR][2];
      ZeroTile(part);
      ZeroTile(odd);
      for (int kk = 0; kk < group; kk += 2) {  // group is even: two k per step
        const uint8_t* q = b + kk * kPanel;
        pf.Step(2);
        FmaRow<MR>(part, a, lda, g0 + kk, LoadU8AsF32(q), LoadU8AsF32(q + 16));
        FmaRow<MR>(odd, a, lda, g0 + kk + 1, LoadU8AsF32(q + kPanel), LoadU8AsF32(q + kPanel + 16));
      }
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 xs = _mm512_set1_ps(xsum[r * xsum_ld + g]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_add_ps(part[r][0], odd[r][0]), s0, _mm512_fmadd_ps(xs, z0, acc[r][0]));
        acc[r][1] = _mm512_fmadd_ps(_mm512_add_ps(part[r][1], odd[r][1]), s1, _mm512_fmadd_ps(xs, z1, acc[r][1]));
      }
    } else {
      for (int kk = 0; kk < group; kk += 2) {
        const uint8_t* q = b + kk * kPanel;
        const int64_t k = g0 + kk;
        pf.Step(2);
        FmaRow<MR>(acc, a, lda, k, _mm512_fmadd_ps(LoadU8AsF32(q), s0, z0),
                   _mm512_fmadd_ps(LoadU8AsF32(q + 16), s1, z1));
        FmaRow<MR>(acc, a, lda, k + 1, _mm512_fmadd_ps(LoadU8AsF32(q + kPanel), s0, z0),
                   _mm512_fmadd_ps(LoadU8AsF32(q + kPanel + 16), s1, z1));
      }
    }
  }
}

// Dequantizes kc rows of an 8-bit panel into fp32 [kc][32] (the large-M fp32 path reuses it for
// many row tiles, so the conversion is paid once per panel and M block, not once per tile).
inline void DequantU8ToF32(const uint8_t* b, int64_t kc, int group, float* out) {
  const int64_t group_bytes = U8GroupBytes(group);
  for (int64_t g0 = 0; g0 < kc; g0 += group, b += group_bytes) {
    const float* scale = reinterpret_cast<const float*>(b + static_cast<int64_t>(group) * kPanel);
    const __m512 s0 = _mm512_loadu_ps(scale);
    const __m512 s1 = _mm512_loadu_ps(scale + 16);
    const __m512 z0 = _mm512_loadu_ps(scale + kPanel);
    const __m512 z1 = _mm512_loadu_ps(scale + kPanel + 16);
    for (int kk = 0; kk < group; ++kk) {
      float* o = out + (g0 + kk) * kPanel;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(LoadU8AsF32(b + kk * kPanel), s0, z0));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(LoadU8AsF32(b + kk * kPanel + 16), s1, z1));
    }
  }
}

inline void WidenBF16ToF32(const uint16_t* b, int64_t kc, float* out) {
  const __m512i high_mask = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t k = 0; k < kc; k += 2) {
    const __m512i p0 = _mm512_loadu_si512(b + k * kPanel);
    const __m512i p1 = _mm512_loadu_si512(b + k * kPanel + kPanel);
    float* o = out + k * kPanel;
    _mm512_storeu_ps(o, WidenLow(p0));
    _mm512_storeu_ps(o + 16, WidenLow(p1));
    _mm512_storeu_ps(o + kPanel, WidenHigh(p0, high_mask));
    _mm512_storeu_ps(o + kPanel + 16, WidenHigh(p1, high_mask));
  }
}

#ifdef __AVX512BF16__
// ---------------------------------------------------------------------------------------------
// bf16 activations x bf16 panel [kc/2][32][2] with vdpbf16ps: each fp32 lane accumulates the
// exact products of one k-pair, twice the multiply rate of fp32 FMA. Used when M is large enough
// for the GEMM to be compute-bound; activations are rounded to bf16 (RNE) once per call.

template <int MR>
inline void DotRow(__m512 (&acc)[MR][2], const uint16_t* a, int64_t lda, int64_t k, const uint16_t* bk) {
  const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bk));
  const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bk + kPanel));
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    int32_t pair;  // the (k, k+1) activations of row r, broadcast as one 32-bit lane
    __builtin_memcpy(&pair, a + r * lda + k, sizeof(pair));
    const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
  }
}

template <int MR>
inline void TileBF16Dot(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t kc, Prefetcher& pf,
                        __m512 (&acc)[MR][2]) {
  ZeroTile(acc);
  int64_t k = 0;
  if constexpr (kSplitK<MR>) {
    __m512 odd[MR][2];
    ZeroTile(odd);
    for (; k + 3 < kc; k += 4) {
      pf.Step(4);
      DotRow<MR>(acc, a, lda, k, b + k * kPanel);
      DotRow<MR>(odd, a, lda, k + 2, b + (k + 2) * kPanel);
    }
    AddTile(acc, odd);
  }
  for (; k < kc; k += 2) {
    pf.Step(2);
    DotRow<MR>(acc, a, lda, k, b + k * kPanel);
  }
}

// Interleaves two rows of 16 fp32 (k and k+1 of 16 columns) into 16 bf16 pairs.
inline __m512i PackPairsBF16(__m512 row_k, __m512 row_k1) {
  // cvtne2ps puts its second operand in elements 0..15 and its first in 16..31; the permutation
  // turns [k0..k15 | k1_0..k1_15] into (k_j, k1_j) pairs.
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(row_k1, row_k));
  return _mm512_permutexvar_epi16(index, both);
}

// Dequantizes kc rows of an 8-bit panel straight into the bf16 pair layout TileBF16Dot reads.
// u * scale + zero is computed in fp32 and rounded once to bf16.
inline void DequantU8ToBF16Pairs(const uint8_t* b, int64_t kc, int group, uint16_t* out) {
  const int64_t group_bytes = U8GroupBytes(group);
  for (int64_t g0 = 0; g0 < kc; g0 += group, b += group_bytes) {
    const float* scale = reinterpret_cast<const float*>(b + static_cast<int64_t>(group) * kPanel);
    const __m512 s0 = _mm512_loadu_ps(scale);
    const __m512 s1 = _mm512_loadu_ps(scale + 16);
    const __m512 z0 = _mm512_loadu_ps(scale + kPanel);
    const __m512 z1 = _mm512_loadu_ps(scale + kPanel + 16);
    for (int kk = 0; kk < group; kk += 2) {
      const uint8_t* q = b + kk * kPanel;
      uint16_t* o = out + (g0 + kk) * kPanel;
      const __m512 w00 = _mm512_fmadd_ps(LoadU8AsF32(q), s0, z0);
      const __m512 w01 = _mm512_fmadd_ps(LoadU8AsF32(q + 16), s1, z1);
      const __m512 w10 = _mm512_fmadd_ps(LoadU8AsF32(q + kPanel), s0, z0);
      const __m512 w11 = _mm512_fmadd_ps(LoadU8AsF32(q + kPanel + 16), s1, z1);
      _mm512_storeu_si512(o, PackPairsBF16(w00, w10));
      _mm512_storeu_si512(o + kPanel, PackPairsBF16(w01, w11));
    }
  }
}

// Rounds n (even) fp32 values to bf16, RNE.
inline void RoundRowToBF16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, reinterpret_cast<__m512i>(v));
  }
  for (; i < n; i += 16) {
    const int64_t left = n - i < 16 ? n - i : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + i));
    _mm256_mask_storeu_epi16(out + i, mask, reinterpret_cast<__m256i>(v));
  }
}
#endif  // __AVX512BF16__


enum Format : int { kFormatF32 = 0, kFormatBF16 = 1, kFormatU8 = 2 };
enum class Kernel { kF32, kBF16Widen, kU8, kBF16Dot };

// K block of the large-M path. A row tile walks the whole K block of its panel, so each output is
// written once; the panel slice (up to 256 KB) and the activations of one M block stay in the
// 1 MB L2 while all row tiles use them. Measured on Zen 5: blocking K down to L1-sized slices
// (256) was slower (each extra block re-reads and re-writes the output tile, and an M block of
// output rows spans ~100 pages), so only very long K is blocked. Multiples of every 8-bit group.
constexpr int64_t kKBlockF32 = 2048;
constexpr int64_t kKBlockBF16 = 4096;
// Rows per M block: its activations (kMBlock x K) stay in L2 next to the panel slice.
constexpr int64_t kMBlock = 96;
// Outputs at least this big are written with non-temporal stores (Problem::stream_output).
constexpr int64_t kStreamOutputBytes = int64_t{8} << 20;
// Below this many multiply-adds a second thread costs more (fork/join) than it saves.
constexpr int64_t kMinParallelMacs = 1 << 16;

struct Problem {
  const float* x = nullptr;        // [m, k] row-major
  const uint16_t* x_bf16 = nullptr;  // x rounded to bf16, only with bf16_dot
  const uint8_t* w = nullptr;      // packed panels
  const float* bias = nullptr;     // [n] or null
  float* y = nullptr;              // [m, n]
  int64_t m = 0, k = 0, n = 0;
  int64_t panel_bytes = 0;
  int format = kFormatF32;
  int group = 0;                   // 8-bit only: rows per (scale, zero)
  const float* xsum = nullptr;     // 8-bit with few rows: [m, k / group] sums of x per group
  bool bf16_dot = false;
  // Non-temporal stores for outputs too big to be read back from cache (e.g. the 49152-wide
  // lm_head at batch 64: 12.6 MB). Besides saving the read-for-ownership, this keeps the output
  // rows out of L2: their stride there is a multiple of 64 KB, so they all fall in one L2 set and
  // would evict the panel and activations the tiles are using (measured: -25% throughput).
  bool stream_output = false;
};

int64_t PanelBytes(int format, int64_t k, int group) {
  switch (format) {
    case kFormatF32: return k * kPanel * 4;
    case kFormatBF16: return k * kPanel * 2;
    default: return (k / group) * U8GroupBytes(group);
  }
}

// Address of row k0 of a packed panel (k0 is a multiple of the group size for 8-bit).
const uint8_t* PanelAt(const Problem& p, int64_t panel, int64_t k0) {
  const uint8_t* base = p.w + panel * p.panel_bytes;
  switch (p.format) {
    case kFormatF32: return base + k0 * kPanel * 4;
    case kFormatBF16: return base + k0 * kPanel * 2;
    default: return base + (k0 / p.group) * U8GroupBytes(p.group);
  }
}

// Bytes of rows [k0, k0 + kc) of one packed panel.
int64_t SliceBytes(const Problem& p, int64_t kc) {
  switch (p.format) {
    case kFormatF32: return kc * kPanel * 4;
    case kFormatBF16: return kc * kPanel * 2;
    default: return (kc / p.group) * U8GroupBytes(p.group);
  }
}

struct Tile {
  int64_t row, k0, kc;
  const void* b;
  Prefetcher prefetch;  // this tile's share of the next panel's slice
  bool stream;
  float* c;
  const float* bias;
  __mmask16 m0, m1;
  bool accumulate;
};

template <int MR>
void RunTile(Kernel kernel, const Problem& p, const Tile& t) {
  __m512 acc[MR][2];
  const float* a = p.x + t.row * p.k + t.k0;
  Prefetcher pf = t.prefetch;
  switch (kernel) {
    case Kernel::kF32: TileF32<MR>(a, p.k, static_cast<const float*>(t.b), t.kc, pf, acc); break;
    case Kernel::kBF16Widen: TileBF16Widen<MR>(a, p.k, static_cast<const uint16_t*>(t.b), t.kc, pf, acc); break;
    case Kernel::kU8:
      TileU8<MR>(a, p.k, static_cast<const uint8_t*>(t.b), t.kc, p.group,
                 p.xsum + t.row * (p.k / p.group) + t.k0 / p.group, p.k / p.group, pf, acc);
      break;
    case Kernel::kBF16Dot:
#ifdef __AVX512BF16__
      TileBF16Dot<MR>(p.x_bf16 + t.row * p.k + t.k0, p.k, static_cast<const uint16_t*>(t.b), t.kc, pf, acc);
#endif
      break;
  }
  StoreTile<MR>(acc, t.c, p.n, t.bias, t.m0, t.m1, t.accumulate, t.stream);
}

using TileFn = void (*)(Kernel, const Problem&, const Tile&);
constexpr TileFn kTileFns[kMaxRows + 1] = {nullptr,      RunTile<1>, RunTile<2>,  RunTile<3>, RunTile<4>,
                                           RunTile<5>,  RunTile<6>, RunTile<7>,  RunTile<8>, RunTile<9>,
                                           RunTile<10>, RunTile<11>, RunTile<12>};

// Per-thread slice buffers (256 KB each), reused across calls (OpenMP keeps its workers alive).
struct Scratch {
  alignas(64) float f32[kKBlockF32 * kPanel];
  alignas(64) uint16_t bf16[kKBlockBF16 * kPanel];
};

Scratch& ThreadScratch() {
  static thread_local std::unique_ptr<Scratch> scratch(new Scratch);
  return *scratch;
}

// K block of at most max_block rows, split evenly (576 = 3 x 192 rather than 256 + 256 + 64: the
// short tail block would cost a full pass of reading and writing the output tile) and rounded up
// to `multiple` (the 8-bit group, or the bf16 pair). max_block is a multiple of every `multiple`,
// so the result never exceeds it and the scratch buffers hold it.
int64_t BalancedKBlock(int64_t k, int64_t max_block, int64_t multiple) {
  const int64_t blocks = (k + max_block - 1) / max_block;
  const int64_t size = (k + blocks - 1) / blocks;
  return std::min(max_block, (size + multiple - 1) / multiple * multiple);
}

// Rows [m0, m1) x panels [p0, p1) on the calling thread.
void RunBlock(const Problem& p, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m0 >= m1 || p0 >= p1) return;
  const bool few_rows = m1 - m0 <= kMaxRows;
  const int64_t multiple = p.format == kFormatU8 ? p.group : p.format == kFormatBF16 ? 2 : 1;
  Kernel kernel;
  int64_t k_block;
  if (p.bf16_dot) {
    kernel = Kernel::kBF16Dot;
    k_block = BalancedKBlock(p.k, kKBlockBF16, multiple);
  } else if (few_rows) {
    // Each weight is used by one row tile only: nothing to block for, stream the whole K.
    kernel = p.format == kFormatBF16 ? Kernel::kBF16Widen : p.format == kFormatU8 ? Kernel::kU8 : Kernel::kF32;
    k_block = p.k;
  } else {
    // Many rows: quantized weights are dequantized once per slice into the fp32 buffer.
    kernel = Kernel::kF32;
    k_block = BalancedKBlock(p.k, kKBlockF32, multiple);
  }
  Scratch* scratch = (kernel == Kernel::kF32 && p.format != kFormatF32) ||
                             (kernel == Kernel::kBF16Dot && p.format == kFormatU8)
                         ? &ThreadScratch()
                         : nullptr;

  for (int64_t mb = m0; mb < m1; mb += kMBlock) {
    const int64_t me = std::min(mb + kMBlock, m1);
    for (int64_t k0 = 0; k0 < p.k; k0 += k_block) {
      const int64_t kc = std::min(k_block, p.k - k0);
      const bool last_k = k0 + kc == p.k;
      for (int64_t panel = p0; panel < p1; ++panel) {
        const void* b = PanelAt(p, panel, k0);
        if (scratch != nullptr) {
          if (kernel == Kernel::kBF16Dot) {
#ifdef __AVX512BF16__
            DequantU8ToBF16Pairs(static_cast<const uint8_t*>(b), kc, p.group, scratch->bf16);
#endif
            b = scratch->bf16;
          } else {
            if (p.format == kFormatU8) {
              DequantU8ToF32(static_cast<const uint8_t*>(b), kc, p.group, scratch->f32);
            } else {
              WidenBF16ToF32(static_cast<const uint16_t*>(b), kc, scratch->f32);
            }
            b = scratch->f32;
          }
        }
        const int64_t col = panel * kPanel;
        const int64_t cols = std::min<int64_t>(kPanel, p.n - col);
        Tile t;
        t.k0 = k0;
        t.kc = kc;
        t.b = b;
        t.bias = last_k && p.bias != nullptr ? p.bias + col : nullptr;
        t.m0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
        t.m1 = static_cast<__mmask16>(cols <= 16 ? 0u : cols >= 32 ? 0xFFFFu : (1u << (cols - 16)) - 1u);
        t.accumulate = k0 > 0;
        t.stream = p.stream_output && last_k && cols == kPanel;
        // The row tiles of this panel share the prefetch of the next one, so the requests are
        // spread over the whole panel instead of flooding the miss buffers during the first tile.
        const int64_t tiles = (me - mb + kMaxRows - 1) / kMaxRows;
        const char* next = panel + 1 < p1 ? reinterpret_cast<const char*>(PanelAt(p, panel + 1, k0)) : nullptr;
        const int64_t share = next != nullptr ? (SliceBytes(p, kc) + tiles * 64 - 1) / (tiles * 64) * 64 : 0;
        // Rows are dealt evenly over the tiles (16 = 8 + 8, not 12 + 4): a short tile has too few
        // accumulators to keep both FMA pipes busy.
        for (int64_t tile = 0; tile < tiles; ++tile) {
          const int64_t row = mb + (me - mb) * tile / tiles;
          const int64_t rows = mb + (me - mb) * (tile + 1) / tiles - row;
          t.row = row;
          t.c = p.y + row * p.n + col;
          t.prefetch.next = next + tile * share;
          t.prefetch.end = t.prefetch.next + share;
          kTileFns[rows](kernel, p, t);
        }
      }
    }
  }
  // Non-temporal stores are weakly ordered: make them visible before the op returns.
  if (p.stream_output) _mm_sfence();
}

// Threads claim work items from an atomic counter instead of taking a fixed half each. On two
// cores shared with the server's other processes, one thread is often preempted for a while; a
// static split would leave the whole call waiting for its half, a queue lets the other thread
// take over the remaining items. (A hand-made queue rather than schedule(dynamic): GCC lowers
// that to GOMP_loop_*dynamic* entry points that Intel's libiomp5, the runtime Paddle loads, does
// not all export; see WorkQueue in paged_attention.cc.)
class WorkQueue {
 public:
  int64_t Take() { return next_.fetch_add(1, std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> next_{0};
};

// An item is one M block x one run of consecutive panels: a run streams its weights linearly,
// and there are about kItemsPerThread items per thread to balance with.
constexpr int64_t kItemsPerThread = 8;

void Run(const Problem& p, int num_threads) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  const int threads = p.m * p.n * p.k >= kMinParallelMacs ? std::max(num_threads, 1) : 1;
  if (threads == 1) {
    RunBlock(p, 0, p.m, 0, panels);
    return;
  }
  // Few rows form one M block (one tile per panel); many rows are cut into kMBlock blocks.
  const int64_t m_block = p.m <= kMaxRows ? p.m : kMBlock;
  const int64_t m_blocks = (p.m + m_block - 1) / m_block;
  const int64_t runs = std::clamp<int64_t>((threads * kItemsPerThread + m_blocks - 1) / m_blocks, 1, panels);
  const int64_t items = m_blocks * runs;
  WorkQueue queue;
#pragma omp parallel num_threads(threads)
  for (int64_t item = queue.Take(); item < items; item = queue.Take()) {
    // Consecutive items share an M block, so a thread's activations stay warm in L2.
    const int64_t mb = item / runs;
    const int64_t run = item % runs;
    RunBlock(p, mb * m_block, std::min(p.m, (mb + 1) * m_block), panels * run / runs, panels * (run + 1) / runs);
  }
}

// The bf16 copy of the activations, kept per calling thread and only ever grown: a fresh
// allocation per call would be a fresh mmap of up to a few MB, page-faulted in on every call.
uint16_t* ActivationBuffer(int64_t elements) {
  struct Free {
    void operator()(uint16_t* ptr) const { std::free(ptr); }
  };
  static thread_local std::unique_ptr<uint16_t, Free> buffer;
  static thread_local int64_t capacity = 0;
  if (elements > capacity) {
    const int64_t bytes = (elements * 2 + 63) / 64 * 64;
    buffer.reset(static_cast<uint16_t*>(std::aligned_alloc(64, static_cast<size_t>(bytes))));
    PD_CHECK(buffer != nullptr, "out of memory for ", bytes, " bytes of bf16 activations");
    capacity = elements;
  }
  return buffer.get();
}

// Per-group activation sums for the few-row 8-bit kernel: at most kMaxRows x K / group floats.
float* GroupSumBuffer(int64_t elements) {
  static thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(static_cast<size_t>(elements));
  return buffer.data();
}

#ifdef __AVX512BF16__
void RoundToBF16(const float* x, int64_t m, int64_t k, uint16_t* out, int num_threads) {
  const int threads = m * k >= (1 << 15) ? std::max(num_threads, 1) : 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t row = 0; row < m; ++row) RoundRowToBF16(x + row * k, k, out + row * k);
}
#endif

}  // namespace fd_linear
#endif  // __AVX512F__

namespace {

constexpr bool kHaveAvx512 =
#ifdef __AVX512F__
    true;
#else
    false;
#endif
constexpr bool kHaveBF16Dot =
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    true;
#else
    false;
#endif

paddle::Tensor Contiguous(const paddle::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// fd_linear(x [M, K] fp32, packed_w uint8, bias fp32 [N] or [0]) -> y [M, N] fp32.
// format: 0 fp32, 1 bf16, 2 u8 (group = rows per scale and zero). bf16_dot_min_rows: use
// vdpbf16ps with bf16-rounded activations when M >= this (0 = never; bf16 and u8 formats only).
std::vector<paddle::Tensor> LinearKernel(const paddle::Tensor& x, const paddle::Tensor& packed_w,
                                         const paddle::Tensor& bias, int64_t n, int format, int group,
                                         int bf16_dot_min_rows, int num_threads) {
  PD_CHECK(kHaveAvx512, "fd_linear needs a CPU with AVX-512 (built without it); use the reference path");
  PD_CHECK(x.is_cpu() && packed_w.is_cpu() && bias.is_cpu(), "fd_linear inputs must be CPU tensors");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "x must be float32");
  PD_CHECK(packed_w.dtype() == paddle::DataType::UINT8, "packed weights must be uint8 bytes");
  PD_CHECK(bias.dtype() == paddle::DataType::FLOAT32, "bias must be float32");
  PD_CHECK(x.shape().size() == 2, "x must be [M, K]");
  PD_CHECK(format >= 0 && format <= 2, "unknown weight format ", format);
  const int64_t m = x.shape()[0];
  const int64_t k = x.shape()[1];
  PD_CHECK(n > 0 && k > 0, "empty weight");
  if (format == 1) PD_CHECK(k % 2 == 0, "bf16 weights need an even K, got ", k);
  if (format == 2) {
    PD_CHECK(group >= 2 && group % 2 == 0 && k % group == 0, "8-bit group ", group, " must be even and divide K ", k);
  }
  PD_CHECK(bias.numel() == 0 || bias.numel() == n, "bias must have N or 0 elements");
  paddle::Tensor y = paddle::empty({m, n}, paddle::DataType::FLOAT32, x.place());
  if (m == 0) return {y};
#ifdef __AVX512F__
  fd_linear::Problem p;
  p.m = m;
  p.k = k;
  p.n = n;
  p.format = format;
  p.group = group;
  p.panel_bytes = fd_linear::PanelBytes(format, k, group);
  const int64_t panels = (n + fd_linear::kPanel - 1) / fd_linear::kPanel;
  PD_CHECK(packed_w.numel() == panels * p.panel_bytes, "packed weights hold ", packed_w.numel(),
           " bytes, expected ", panels * p.panel_bytes, " for K=", k, " N=", n);
  const paddle::Tensor x_c = Contiguous(x);
  const paddle::Tensor w_c = Contiguous(packed_w);
  const paddle::Tensor b_c = Contiguous(bias);
  p.x = x_c.data<float>();
  p.w = w_c.data<uint8_t>();
  p.bias = bias.numel() > 0 ? b_c.data<float>() : nullptr;
  p.y = y.data<float>();
  p.bf16_dot = kHaveBF16Dot && format != 0 && bf16_dot_min_rows > 0 && m >= bf16_dot_min_rows;
#ifdef __AVX512BF16__
  if (p.bf16_dot) {
    uint16_t* x_bf16 = fd_linear::ActivationBuffer(m * k);
    fd_linear::RoundToBF16(p.x, m, k, x_bf16, num_threads);
    p.x_bf16 = x_bf16;
  }
#endif
  if (format == fd_linear::kFormatU8 && !p.bf16_dot && m <= fd_linear::kMaxRows) {
    // Per-group sums of x for the zero points of the few-row kernel (TileU8).
    const int64_t groups = k / group;
    float* xsum = fd_linear::GroupSumBuffer(m * groups);
    for (int64_t row = 0; row < m; ++row) {
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.f;
        for (int64_t i = 0; i < group; ++i) sum += p.x[row * k + g * group + i];
        xsum[row * groups + g] = sum;
      }
    }
    p.xsum = xsum;
  }
  p.stream_output = m * n * 4 >= fd_linear::kStreamOutputBytes && n % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.y) % 64 == 0;
  fd_linear::Run(p, num_threads);
#endif
  return {y};
}

std::vector<std::vector<int64_t>> LinearInferShape(const std::vector<int64_t>& x_shape,
                                                   const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                   const int64_t& n, const int&, const int&, const int&,
                                                   const int&) {
  return {{x_shape.empty() ? 0 : x_shape[0], n}};
}

std::vector<paddle::DataType> LinearInferDtype(const paddle::DataType&, const paddle::DataType&,
                                               const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

// fd_linear_caps(any) -> int32 [2]: {AVX-512 kernels built, vdpbf16ps kernels built}.
std::vector<paddle::Tensor> LinearCapsKernel(const paddle::Tensor& probe) {
  paddle::Tensor caps = paddle::empty({2}, paddle::DataType::INT32, paddle::CPUPlace());
  caps.data<int32_t>()[0] = kHaveAvx512 ? 1 : 0;
  caps.data<int32_t>()[1] = kHaveBF16Dot ? 1 : 0;
  return {caps};
}

}  // namespace

PD_BUILD_OP(fd_linear)
    .Inputs({"X", "PackedW", "Bias"})
    .Outputs({"Out"})
    .Attrs({"n: int64_t", "format: int", "group: int", "bf16_dot_min_rows: int", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(LinearKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LinearInferDtype));

PD_BUILD_OP(fd_linear_caps)
    .Inputs({"Probe"})
    .Outputs({"Caps"})
    .SetKernelFn(PD_KERNEL(LinearCapsKernel));
