// Micro-kernels of fd_linear (linear.cc): y tiles of a few rows x one 32-column panel of packed
// weights (layouts in linear.cc), plus the conversions they need (8-bit and bf16 dequantization,
// bf16 rounding, 16-bit activation quantization). Each Tile* function leaves the tile's
// accumulators in registers for StoreTile. Two instruction sets, chosen at compile time
// (-march=native): AVX-512F (with the AVX512-BF16 / AVX512-VNNI variants where built), else AVX2 +
// FMA, whose kernels have the same names and do the same arithmetic on 8-lane vectors, so linear.cc
// drives both alike. FD_LINEAR_SIMD says whether either set is built (0: no kernels at all).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define FD_LINEAR_SIMD 1
#else
#define FD_LINEAR_SIMD 0
#endif

// The 16-bit-activation integer kernels (TileU8Vnni, QuantizeRow16): vpdpbusd with AVX512-VNNI,
// vpmaddwd in the AVX2 build. An AVX-512 build without VNNI has none (its u8 paths are fp32).
#if (defined(__AVX512F__) && defined(__AVX512VNNI__)) || (!defined(__AVX512F__) && FD_LINEAR_SIMD)
#define FD_LINEAR_ACT16 1
#else
#define FD_LINEAR_ACT16 0
#endif

namespace fd_linear {

constexpr int kPanel = 32;  // output columns per packed panel (two zmm or four ymm of fp32)

// Software prefetch of the next panel slice, a few lines per k step of the current one. The
// hardware prefetchers stop at 4 KB page boundaries and a slice spans 6 to 50 of them; without this,
// a kernel that dequantizes a panel, or a tile that starts on a new one, stalls on DRAM latency.
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  inline void Step(int lines) {
    for (int i = 0; i < lines && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// 8-bit panels: per group of G rows, u8 [G/4][32][4], then float scale[32], then float zero[32].
inline int64_t U8GroupBytes(int group) { return static_cast<int64_t>(group) * kPanel + kPanel * 8; }

#ifdef __AVX512F__
constexpr int kMaxRows = 12;  // rows per micro-tile: 24 accumulators + operands fit in 32 zmm
// Rows per tile of the many-row fp32 path: the same kernel as every other path here (the AVX2
// build has a taller, narrower one).
constexpr int kWideRows = kMaxRows;
template <int MR>
using TileAcc = __m512[MR][2];  // the accumulators of a tile of MR rows x 32 columns
// Rows per TileU8Vnni tile: its hi and lo sums of 2 column blocks plus the fp32 tile take 6 zmm
// per row.
constexpr int kMaxVnniRows = 4;

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

// Writes the first `cols` columns of the tile to c (row stride ldc), adding the bias (per column,
// may be null) and, when `accumulate`, what c already holds (the partial sum of earlier K blocks).
// Masks cover a last panel narrower than 32 columns. `stream` (full, 64-byte aligned panels only)
// writes around the caches: see Problem::stream_output.
template <int MR>
inline void StoreTile(const __m512 (&acc)[MR][2], float* c, int64_t ldc, const float* bias, int cols,
                      bool accumulate, bool stream) {
  const auto m0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  const auto m1 = static_cast<__mmask16>(cols <= 16 ? 0u : cols >= 32 ? 0xFFFFu : (1u << (cols - 16)) - 1u);
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
// 8-bit panels (U8GroupBytes): w = u * scale + zero, with one (scale, zero) per group of G rows (G % 4 == 0) and
// column. The affine form holds both the symmetric grid of Q8_0 (zero = -128 scale) and the
// min-based grid of Q4_0/Q4_1/Q5_x, so requantizing a GGUF block of 32 onto it is exact (the
// Python quantizer picks the grid per group). Within a group the bytes come in k-quads,
// u8 [G/4][32][4]: one 64-byte load holds 4 consecutive k of 16 columns, byte j of 32-bit lane c
// being (k + j, column c). That is the operand layout of vpdpbusd, and the fp32 paths take
// row k + j out of it with a shift and a mask. `b` points at the first group of the K range; kc
// is a multiple of the group size.

// Row k + j (j = 0..3) of a 64-byte k-quad block of 16 columns, as 16 fp32.
template <int J>
inline __m512 QuadRowAsF32(__m512i quad) {
  __m512i v = quad;
  if constexpr (J > 0) v = _mm512_srli_epi32(v, 8 * J);
  if constexpr (J < 3) v = _mm512_and_si512(v, _mm512_set1_epi32(0xFF));
  return _mm512_cvtepi32_ps(v);
}

// fp32 activations, weights dequantized in registers. Few rows (MR <= 4): the conversion
// dominates, so each group accumulates x * float(u) and the affine map is applied once per group:
// acc += partial * scale + sum(x over the group) * zero (the sums come precomputed in `xsum`, row
// stride xsum_ld). More rows: the dequantized weights are shared by all rows and per-group partial
// sums would not fit in the registers, so w = u * scale + zero. (With AVX512-VNNI the default path
// is TileU8Vnni; this one keeps the activations in full fp32.)
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
      for (int kq = 0; kq < group; kq += 4) {
        const uint8_t* q = b + kq * kPanel;
        pf.Step(2);
        const __m512i q0 = _mm512_loadu_si512(q);
        const __m512i q1 = _mm512_loadu_si512(q + 64);
        const int64_t k = g0 + kq;
        FmaRow<MR>(part, a, lda, k, QuadRowAsF32<0>(q0), QuadRowAsF32<0>(q1));
        FmaRow<MR>(odd, a, lda, k + 1, QuadRowAsF32<1>(q0), QuadRowAsF32<1>(q1));
        FmaRow<MR>(part, a, lda, k + 2, QuadRowAsF32<2>(q0), QuadRowAsF32<2>(q1));
        FmaRow<MR>(odd, a, lda, k + 3, QuadRowAsF32<3>(q0), QuadRowAsF32<3>(q1));
      }
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 xs = _mm512_set1_ps(xsum[r * xsum_ld + g]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_add_ps(part[r][0], odd[r][0]), s0, _mm512_fmadd_ps(xs, z0, acc[r][0]));
        acc[r][1] = _mm512_fmadd_ps(_mm512_add_ps(part[r][1], odd[r][1]), s1, _mm512_fmadd_ps(xs, z1, acc[r][1]));
      }
    } else {
      for (int kq = 0; kq < group; kq += 4) {
        const uint8_t* q = b + kq * kPanel;
        pf.Step(2);
        const __m512i q0 = _mm512_loadu_si512(q);
        const __m512i q1 = _mm512_loadu_si512(q + 64);
        const int64_t k = g0 + kq;
        FmaRow<MR>(acc, a, lda, k, _mm512_fmadd_ps(QuadRowAsF32<0>(q0), s0, z0),
                   _mm512_fmadd_ps(QuadRowAsF32<0>(q1), s1, z1));
        FmaRow<MR>(acc, a, lda, k + 1, _mm512_fmadd_ps(QuadRowAsF32<1>(q0), s0, z0),
                   _mm512_fmadd_ps(QuadRowAsF32<1>(q1), s1, z1));
        FmaRow<MR>(acc, a, lda, k + 2, _mm512_fmadd_ps(QuadRowAsF32<2>(q0), s0, z0),
                   _mm512_fmadd_ps(QuadRowAsF32<2>(q1), s1, z1));
        FmaRow<MR>(acc, a, lda, k + 3, _mm512_fmadd_ps(QuadRowAsF32<3>(q0), s0, z0),
                   _mm512_fmadd_ps(QuadRowAsF32<3>(q1), s1, z1));
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
    for (int kq = 0; kq < group; kq += 4) {
      const __m512i q0 = _mm512_loadu_si512(b + kq * kPanel);
      const __m512i q1 = _mm512_loadu_si512(b + kq * kPanel + 64);
      float* o = out + (g0 + kq) * kPanel;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(QuadRowAsF32<0>(q0), s0, z0));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(QuadRowAsF32<0>(q1), s1, z1));
      _mm512_storeu_ps(o + kPanel, _mm512_fmadd_ps(QuadRowAsF32<1>(q0), s0, z0));
      _mm512_storeu_ps(o + kPanel + 16, _mm512_fmadd_ps(QuadRowAsF32<1>(q1), s1, z1));
      _mm512_storeu_ps(o + 2 * kPanel, _mm512_fmadd_ps(QuadRowAsF32<2>(q0), s0, z0));
      _mm512_storeu_ps(o + 2 * kPanel + 16, _mm512_fmadd_ps(QuadRowAsF32<2>(q1), s1, z1));
      _mm512_storeu_ps(o + 3 * kPanel, _mm512_fmadd_ps(QuadRowAsF32<3>(q0), s0, z0));
      _mm512_storeu_ps(o + 3 * kPanel + 16, _mm512_fmadd_ps(QuadRowAsF32<3>(q1), s1, z1));
    }
  }
}

#ifdef __AVX512VNNI__
// ---------------------------------------------------------------------------------------------
// 16-bit activations x 8-bit panel with vpdpbusd (u8 x s8, four products per 32-bit lane, exact
// int32 sums). Each activation group (the weights' group along K) is quantized to q = x / s_x with
// |q| <= 32639 and split into two signed bytes, q = 256 hi + lo: two vpdpbusd per k-quad and
// column block give the exact sums of u * hi and u * lo, and per group
//   acc += float(256 sum_hi + sum_lo) * (scale * s_x) + zero * (s_x * sum q)
// The activation error is at most s_x / 2 = max|x of the group| / 65278 per element (bf16
// activations: up to |x| / 256), the weights are exact, and it runs at the multiply rate of vdpbf16ps.

// The group size is a template parameter so the k-quad loop unrolls completely: with a runtime
// trip count GCC shuffles the 16 integer accumulators through spare registers and the stack on
// every step (measured: 35% slower).
template <int MR, int G>
inline void TileU8Vnni(const int8_t* hi, const int8_t* lo, int64_t ldx, const float* x_scale, const float* x_sum,
                       int64_t xs_ld, const uint8_t* b, int64_t kc, Prefetcher& pf, __m512 (&acc)[MR][2]) {
  static_assert(MR <= kMaxVnniRows, "too many rows for the registers");
  constexpr int group = G;
  ZeroTile(acc);
  const int64_t group_bytes = U8GroupBytes(group);
  for (int64_t g0 = 0, g = 0; g0 < kc; g0 += group, ++g, b += group_bytes) {
    __m512i sum_hi[MR][2];
    __m512i sum_lo[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      sum_hi[r][0] = sum_hi[r][1] = sum_lo[r][0] = sum_lo[r][1] = _mm512_setzero_si512();
    }
#pragma GCC unroll 32
    for (int kq = 0; kq < group; kq += 4) {
      const uint8_t* q = b + kq * kPanel;
      pf.Step(2);
      const __m512i q0 = _mm512_loadu_si512(q);
      const __m512i q1 = _mm512_loadu_si512(q + 64);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t quad_hi;  // activations k .. k+3 of row r, broadcast as one 32-bit lane
        int32_t quad_lo;
        __builtin_memcpy(&quad_hi, hi + r * ldx + g0 + kq, sizeof(quad_hi));
        __builtin_memcpy(&quad_lo, lo + r * ldx + g0 + kq, sizeof(quad_lo));
        const __m512i vh = _mm512_set1_epi32(quad_hi);
        const __m512i vl = _mm512_set1_epi32(quad_lo);
        sum_hi[r][0] = _mm512_dpbusd_epi32(sum_hi[r][0], q0, vh);
        sum_hi[r][1] = _mm512_dpbusd_epi32(sum_hi[r][1], q1, vh);
        sum_lo[r][0] = _mm512_dpbusd_epi32(sum_lo[r][0], q0, vl);
        sum_lo[r][1] = _mm512_dpbusd_epi32(sum_lo[r][1], q1, vl);
      }
    }
    // |sum_hi| <= G * 255 * 128, so 256 * sum_hi + sum_lo stays far inside int32 for G <= 256.
    const float* scale = reinterpret_cast<const float*>(b + static_cast<int64_t>(group) * kPanel);
    const __m512 s0 = _mm512_loadu_ps(scale);
    const __m512 s1 = _mm512_loadu_ps(scale + 16);
    const __m512 z0 = _mm512_loadu_ps(scale + kPanel);
    const __m512 z1 = _mm512_loadu_ps(scale + kPanel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xs = _mm512_set1_ps(x_scale[r * xs_ld + g]);
      const __m512 xz = _mm512_set1_ps(x_sum[r * xs_ld + g]);
      const __m512 d0 = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sum_hi[r][0], 8), sum_lo[r][0]));
      const __m512 d1 = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sum_hi[r][1], 8), sum_lo[r][1]));
      acc[r][0] = _mm512_fmadd_ps(d0, _mm512_mul_ps(s0, xs), _mm512_fmadd_ps(z0, xz, acc[r][0]));
      acc[r][1] = _mm512_fmadd_ps(d1, _mm512_mul_ps(s1, xs), _mm512_fmadd_ps(z1, xz, acc[r][1]));
    }
  }
}

// TileU8Vnni serves calls of any M: vpdpbusd multiplies four bytes per lane, twice the rate of the
// fp32 paths at every size.
constexpr int64_t kAct16MaxRows = int64_t{1} << 40;

// Group sizes with a TileU8Vnni instance (and a multiple of QuantizeRow16's 16).
constexpr bool VnniGroupOk(int group) { return group == 16 || group == 32 || group == 64 || group == 128; }

// The largest |q| of a 16-bit activation: 127 * 257, so q = 256 hi + lo with lo in [-128, 127]
// always leaves hi in [-128, 127].
constexpr float kAct16Max = 32639.0f;

// Quantizes row x (k elements, k % group == 0, group % 16 == 0) group by group: hi/lo bytes,
// the step s_x and s_x * sum(q) per group.
inline void QuantizeRow16(const float* x, int64_t k, int group, int8_t* hi, int8_t* lo, float* scale,
                          float* sum) {
  const __m512i byte_bias = _mm512_set1_epi32(128);
  const __m512i low_byte = _mm512_set1_epi32(0xFF);
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += group, ++g) {
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < group; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + g0 + i)));
    const float max_abs = _mm512_reduce_max_ps(amax);
    const float inv = max_abs > 0.f ? kAct16Max / max_abs : 0.f;
    const float step = max_abs / kAct16Max;
    __m512i total = _mm512_setzero_si512();
    for (int i = 0; i < group; i += 16) {
      // Round to nearest even, as the default MXCSR mode of vcvtps2dq does.
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + g0 + i), _mm512_set1_ps(inv)));
      const __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, byte_bias), low_byte), byte_bias);
      const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(q, l), 8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + g0 + i), _mm512_cvtepi32_epi8(h));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + g0 + i), _mm512_cvtepi32_epi8(l));
      total = _mm512_add_epi32(total, q);
    }
    scale[g] = step;
    sum[g] = step * static_cast<float>(_mm512_reduce_add_epi32(total));
  }
}
#endif  // __AVX512VNNI__

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
    for (int kq = 0; kq < group; kq += 4) {
      const __m512i q0 = _mm512_loadu_si512(b + kq * kPanel);
      const __m512i q1 = _mm512_loadu_si512(b + kq * kPanel + 64);
      uint16_t* o = out + (g0 + kq) * kPanel;  // pairs (k, k+1) then (k+2, k+3), 64 bf16 each
      _mm512_storeu_si512(o, PackPairsBF16(_mm512_fmadd_ps(QuadRowAsF32<0>(q0), s0, z0),
                                           _mm512_fmadd_ps(QuadRowAsF32<1>(q0), s0, z0)));
      _mm512_storeu_si512(o + kPanel, PackPairsBF16(_mm512_fmadd_ps(QuadRowAsF32<0>(q1), s1, z1),
                                                    _mm512_fmadd_ps(QuadRowAsF32<1>(q1), s1, z1)));
      _mm512_storeu_si512(o + 2 * kPanel, PackPairsBF16(_mm512_fmadd_ps(QuadRowAsF32<2>(q0), s0, z0),
                                                        _mm512_fmadd_ps(QuadRowAsF32<3>(q0), s0, z0)));
      _mm512_storeu_si512(o + 3 * kPanel, PackPairsBF16(_mm512_fmadd_ps(QuadRowAsF32<2>(q1), s1, z1),
                                                        _mm512_fmadd_ps(QuadRowAsF32<3>(q1), s1, z1)));
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

#elif FD_LINEAR_SIMD  // AVX2 + FMA
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA (Zen 1-3, Haswell and later without AVX-512): a panel row is four ymm of fp32 and
// there are 16 ymm registers. Same packed layouts and the same arithmetic as the AVX-512 kernels
// (each output is the same fp32 sums, in a different order), no bf16-dot variant, and a vpmaddwd
// form of the 16-bit-activation kernel (TileU8Vnni) in place of vpdpbusd.

// Rows per micro-tile: 3 x 4 = 12 accumulators, leaving four registers for the broadcast
// activation and the (converted) weights; 4 rows would need all 16 for accumulators. The fp32 FMAs
// take their weights as memory operands: per k, 4 panel loads and 3 broadcasts feed 12 FMAs.
constexpr int kMaxRows = 3;
constexpr int kVecs = kPanel / 8;  // ymm per panel row
template <int MR>
using TileAcc = __m256[MR][kVecs];

// Zen 3 has two FMA pipes of latency 4: 8 independent accumulators keep them busy. A one-row tile
// has 4, so it keeps a second set for odd k; two rows already have 8.
template <int MR>
constexpr bool kSplitK = MR <= 1;

// Every loop over an accumulator tile is fully unrolled (#pragma GCC unroll), including the rare
// StorePartialTile: one index into acc that is not a compile-time constant makes GCC keep the whole
// tile in memory and store it back on every k step (measured on Zen 3: 3-row fp32 tiles ran at
// about half speed).

template <int MR>
inline void ZeroTile(__m256 (&acc)[MR][kVecs]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) acc[r][j] = _mm256_setzero_ps();
  }
}

template <int MR>
inline void AddTile(__m256 (&acc)[MR][kVecs], const __m256 (&other)[MR][kVecs]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) acc[r][j] = _mm256_add_ps(acc[r][j], other[r][j]);
  }
}

// acc[r] += x[r] * b for one k (b: one panel row of 32 fp32).
template <int MR>
inline void FmaRow(__m256 (&acc)[MR][kVecs], const float* a, int64_t lda, int64_t k, const __m256 (&b)[kVecs]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) acc[r][j] = _mm256_fmadd_ps(av, b[j], acc[r][j]);
  }
}

inline void LoadRowF32(const float* bk, __m256 (&b)[kVecs]) {
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) b[j] = _mm256_loadu_ps(bk + 8 * j);
}

inline void StoreRowF32(float* out, const __m256 (&b)[kVecs]) {
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) _mm256_storeu_ps(out + 8 * j, b[j]);
}

// A last panel narrower than 32 columns (rare: N % 32 != 0), through a buffer, column by column,
// with the additions in StoreTile's order.
template <int MR>
inline void StorePartialTile(const __m256 (&acc)[MR][kVecs], float* c, int64_t ldc, const float* bias, int cols,
                             bool accumulate) {
  alignas(32) float tile[kPanel];
  // Unrolled, so that acc is indexed by constants only and stays in registers in the kernels.
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) _mm256_store_ps(tile + 8 * j, acc[r][j]);
    float* row = c + r * ldc;
    for (int col = 0; col < cols; ++col) {
      float v = tile[col] + (bias != nullptr ? bias[col] : 0.f);
      row[col] = accumulate ? v + row[col] : v;
    }
  }
}

// Writes the first `cols` columns of the tile to c (row stride ldc), adding the bias (per column,
// may be null) and, when `accumulate`, what c already holds (the partial sum of earlier K blocks).
// `stream` (full, 64-byte aligned panels only) writes around the caches: see Problem::stream_output.
template <int MR>
inline void StoreTile(const __m256 (&acc)[MR][kVecs], float* c, int64_t ldc, const float* bias, int cols,
                      bool accumulate, bool stream) {
  if (cols < kPanel) {
    StorePartialTile<MR>(acc, c, ldc, bias, cols, accumulate);
    return;
  }
  __m256 bv[kVecs];
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) bv[j] = bias != nullptr ? _mm256_loadu_ps(bias + 8 * j) : _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      __m256 v = _mm256_add_ps(acc[r][j], bv[j]);
      if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(row + 8 * j));
      if (stream) {
        _mm256_stream_ps(row + 8 * j, v);
      } else {
        _mm256_storeu_ps(row + 8 * j, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 activations x fp32 panel [kc][32].

template <int MR>
inline void TileF32(const float* a, int64_t lda, const float* b, int64_t kc, Prefetcher& pf,
                    __m256 (&acc)[MR][kVecs]) {
  ZeroTile(acc);
  __m256 w[kVecs];
  int64_t k = 0;
  if constexpr (kSplitK<MR>) {
    __m256 odd[MR][kVecs];
    ZeroTile(odd);
    for (; k + 1 < kc; k += 2) {
      pf.Step(4);
      LoadRowF32(b + k * kPanel, w);
      FmaRow<MR>(acc, a, lda, k, w);
      LoadRowF32(b + (k + 1) * kPanel, w);
      FmaRow<MR>(odd, a, lda, k + 1, w);
    }
    AddTile(acc, odd);
  }
  for (; k < kc; ++k) {
    pf.Step(2);
    LoadRowF32(b + k * kPanel, w);
    FmaRow<MR>(acc, a, lda, k, w);
  }
}

// Many-row fp32 tiles (the prefill / big-batch path, over fp32 panels or slices dequantized into
// scratch) of up to kWideRows rows, computed as the panel's two 16-column halves in turn, each over
// the whole K range: 6 x 2 accumulators, the two weight vectors of a k row held in registers and
// shared by all rows, six broadcasts per k. TileF32's 3 x 32 tile leaves too few registers for its
// four weight vectors, so GCC reads them from memory once per FMA (15 loads per 12 FMAs, bound by
// the load ports). Each half reads its own cache line of every 128-byte k row.
constexpr int kWideRows = 6;

template <int MR>
inline void HalfPanelF32(const float* a, int64_t lda, const float* b, int64_t kc, Prefetcher& pf,
                         __m256 (&acc)[MR][2]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    pf.Step(1);
    const __m256 w0 = _mm256_loadu_ps(b + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(b + k * kPanel + 8);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, w1, acc[r][1]);
    }
  }
}

template <int MR>
inline void TileF32Halves(const float* a, int64_t lda, const float* b, int64_t kc, Prefetcher& pf,
                          __m256 (&acc)[MR][kVecs]) {
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    __m256 part[MR][2];
    HalfPanelF32<MR>(a, lda, b + 16 * half, kc, pf, part);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      acc[r][2 * half] = part[r][0];
      acc[r][2 * half + 1] = part[r][1];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 activations x bf16 panel [kc/2][32][2] (kc even). A 32-bit lane holds the (k, k+1) pair of
// one column; a bf16 is the top half of an fp32, so k becomes fp32 by a left shift of the lane and
// k+1 by masking off its low half: exact, one integer op per 8 weights.

inline void WidenPairs(const uint16_t* bk, __m256 (&even)[kVecs], __m256 (&odd)[kVecs]) {
  const __m256i high_mask = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + 16 * j));
    even[j] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    odd[j] = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_mask));
  }
}

template <int MR>
inline void TileBF16Widen(const float* a, int64_t lda, const uint16_t* b, int64_t kc, Prefetcher& pf,
                          __m256 (&acc)[MR][kVecs]) {
  ZeroTile(acc);
  __m256 w_even[kVecs];
  __m256 w_odd[kVecs];
  if constexpr (kSplitK<MR>) {
    __m256 odd[MR][kVecs];
    ZeroTile(odd);
    for (int64_t k = 0; k < kc; k += 2) {
      pf.Step(2);  // a k-pair is 128 bytes
      WidenPairs(b + k * kPanel, w_even, w_odd);
      FmaRow<MR>(acc, a, lda, k, w_even);
      FmaRow<MR>(odd, a, lda, k + 1, w_odd);
    }
    AddTile(acc, odd);
  } else {
    for (int64_t k = 0; k < kc; k += 2) {
      pf.Step(2);
      WidenPairs(b + k * kPanel, w_even, w_odd);
      FmaRow<MR>(acc, a, lda, k, w_even);
      FmaRow<MR>(acc, a, lda, k + 1, w_odd);
    }
  }
}

inline void WidenBF16ToF32(const uint16_t* b, int64_t kc, float* out) {
  __m256 even[kVecs];
  __m256 odd[kVecs];
  for (int64_t k = 0; k < kc; k += 2) {
    WidenPairs(b + k * kPanel, even, odd);
    StoreRowF32(out + k * kPanel, even);
    StoreRowF32(out + (k + 1) * kPanel, odd);
  }
}

// ---------------------------------------------------------------------------------------------
// 8-bit panels (U8GroupBytes): a k-quad of 32 columns is 128 bytes, four ymm of 8 columns each,
// byte j of 32-bit lane c being (k + j, column c); row k + j comes out with a shift and a mask.

template <int J>
inline __m256 QuadRowAsF32(__m256i quad) {
  __m256i v = quad;
  if constexpr (J > 0) v = _mm256_srli_epi32(v, 8 * J);
  if constexpr (J < 3) v = _mm256_and_si256(v, _mm256_set1_epi32(0xFF));
  return _mm256_cvtepi32_ps(v);
}

inline void LoadQuads(const uint8_t* q, __m256i (&quads)[kVecs]) {
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) quads[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
}

// Row k + J of the k-quad as float(u) (no scale and zero).
template <int J>
inline void QuadRow(const __m256i (&quads)[kVecs], __m256 (&w)[kVecs]) {
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) w[j] = QuadRowAsF32<J>(quads[j]);
}

// Row k + J of the k-quad dequantized: u * scale + zero, one FMA (as the reference rounds it).
template <int J>
inline void QuadRowDequant(const __m256i (&quads)[kVecs], const __m256 (&s)[kVecs], const __m256 (&z)[kVecs],
                           __m256 (&w)[kVecs]) {
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) w[j] = _mm256_fmadd_ps(QuadRowAsF32<J>(quads[j]), s[j], z[j]);
}

inline void LoadScaleZero(const uint8_t* group_start, int group, __m256 (&s)[kVecs], __m256 (&z)[kVecs]) {
  const float* scale = reinterpret_cast<const float*>(group_start + static_cast<int64_t>(group) * kPanel);
#pragma GCC unroll 4
  for (int j = 0; j < kVecs; ++j) {
    s[j] = _mm256_loadu_ps(scale + 8 * j);
    z[j] = _mm256_loadu_ps(scale + kPanel + 8 * j);
  }
}

// even += x * float(u) for k = g0, g0 + 2, ... of one group, odd += the same for g0 + 1, g0 + 3, ...
template <int MR>
inline void QuadsTimesX(const float* a, int64_t lda, const uint8_t* b, int64_t g0, int group, Prefetcher& pf,
                        __m256 (&even)[MR][kVecs], __m256 (&odd)[MR][kVecs]) {
  __m256i quads[kVecs];
  __m256 w[kVecs];
  for (int kq = 0; kq < group; kq += 4) {
    pf.Step(2);  // a k-quad is 128 bytes
    LoadQuads(b + kq * kPanel, quads);
    const int64_t k = g0 + kq;
    QuadRow<0>(quads, w);
    FmaRow<MR>(even, a, lda, k, w);
    QuadRow<1>(quads, w);
    FmaRow<MR>(odd, a, lda, k + 1, w);
    QuadRow<2>(quads, w);
    FmaRow<MR>(even, a, lda, k + 2, w);
    QuadRow<3>(quads, w);
    FmaRow<MR>(odd, a, lda, k + 3, w);
  }
}

// One group of a tile with few rows, where the conversion dominates: each row accumulates
// x * float(u) over the group and the affine map is applied once at its end,
//   acc += partial * scale + sum(x over the group) * zero   (the sums precomputed in xsum_g).
template <int MR>
inline void GroupU8Partial(const float* a, int64_t lda, const uint8_t* b, int64_t g0, int group,
                           const float* xsum_g, int64_t xsum_ld, Prefetcher& pf, __m256 (&acc)[MR][kVecs]) {
  __m256 part[MR][kVecs];
  ZeroTile(part);
  if constexpr (kSplitK<MR>) {
    __m256 odd[MR][kVecs];
    ZeroTile(odd);
    QuadsTimesX<MR>(a, lda, b, g0, group, pf, part, odd);
    AddTile(part, odd);
  } else {
    QuadsTimesX<MR>(a, lda, b, g0, group, pf, part, part);
  }
  __m256 s[kVecs];
  __m256 z[kVecs];
  LoadScaleZero(b, group, s, z);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m256 xs = _mm256_set1_ps(xsum_g[r * xsum_ld]);
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) acc[r][j] = _mm256_fmadd_ps(part[r][j], s[j], _mm256_fmadd_ps(xs, z[j], acc[r][j]));
  }
}

// One group of a tile with more rows: per-group partial sums would not fit in the registers, and
// the dequantized weights w = u * scale + zero are shared by all rows.
template <int MR>
inline void GroupU8Dequant(const float* a, int64_t lda, const uint8_t* b, int64_t g0, int group, Prefetcher& pf,
                           __m256 (&acc)[MR][kVecs]) {
  __m256 s[kVecs];
  __m256 z[kVecs];
  LoadScaleZero(b, group, s, z);
  __m256i quads[kVecs];
  __m256 w[kVecs];
  for (int kq = 0; kq < group; kq += 4) {
    pf.Step(2);
    LoadQuads(b + kq * kPanel, quads);
    const int64_t k = g0 + kq;
    QuadRowDequant<0>(quads, s, z, w);
    FmaRow<MR>(acc, a, lda, k, w);
    QuadRowDequant<1>(quads, s, z, w);
    FmaRow<MR>(acc, a, lda, k + 1, w);
    QuadRowDequant<2>(quads, s, z, w);
    FmaRow<MR>(acc, a, lda, k + 2, w);
    QuadRowDequant<3>(quads, s, z, w);
    FmaRow<MR>(acc, a, lda, k + 3, w);
  }
}

// fp32 activations x 8-bit panel, dequantized in registers (kc a multiple of the group; xsum:
// per row and group sums of x, row stride xsum_ld, used by the few-row form).
template <int MR>
inline void TileU8(const float* a, int64_t lda, const uint8_t* b, int64_t kc, int group, const float* xsum,
                   int64_t xsum_ld, Prefetcher& pf, __m256 (&acc)[MR][kVecs]) {
  ZeroTile(acc);
  const int64_t group_bytes = U8GroupBytes(group);
  for (int64_t g0 = 0, g = 0; g0 < kc; g0 += group, ++g, b += group_bytes) {
    if constexpr (MR <= 2) {
      GroupU8Partial<MR>(a, lda, b, g0, group, xsum + g, xsum_ld, pf, acc);
    } else {
      GroupU8Dequant<MR>(a, lda, b, g0, group, pf, acc);
    }
  }
}

// The four rows of a k-quad of codes dequantized into fp32 out[0 .. 4][32].
inline void StoreQuadDequant(const __m256i (&quads)[kVecs], const __m256 (&s)[kVecs], const __m256 (&z)[kVecs],
                             float* out) {
  __m256 w[kVecs];
  QuadRowDequant<0>(quads, s, z, w);
  StoreRowF32(out, w);
  QuadRowDequant<1>(quads, s, z, w);
  StoreRowF32(out + kPanel, w);
  QuadRowDequant<2>(quads, s, z, w);
  StoreRowF32(out + 2 * kPanel, w);
  QuadRowDequant<3>(quads, s, z, w);
  StoreRowF32(out + 3 * kPanel, w);
}

// Dequantizes kc rows of an 8-bit panel into fp32 [kc][32] (the many-row path, see the AVX-512
// version).
inline void DequantU8ToF32(const uint8_t* b, int64_t kc, int group, float* out) {
  const int64_t group_bytes = U8GroupBytes(group);
  __m256 s[kVecs];
  __m256 z[kVecs];
  __m256i quads[kVecs];
  for (int64_t g0 = 0; g0 < kc; g0 += group, b += group_bytes) {
    LoadScaleZero(b, group, s, z);
    for (int kq = 0; kq < group; kq += 4) {
      LoadQuads(b + kq * kPanel, quads);
      StoreQuadDequant(quads, s, z, out + (g0 + kq) * kPanel);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 16-bit activations x 8-bit panel with vpmaddwd: the AVX2 form of TileU8Vnni, on the same
// activation grid (q = x / s_x, |q| <= 32639, one step per row and group) with exact int32 sums.
// AVX2 has no u8 x s8 dot without saturation (vpmaddubsw clips at 32767, and 255 * 127 * 2 is
// more), so the weights are widened to 16 bits instead: a k-quad lane (k0 k1 k2 k3 bytes of one
// column) gives the words (k0, k2) with a mask and (k1, k3) with a 16-bit shift, and the
// activations are stored in the matching order [k0 k2 k1 k3] per quad, so each product needs one
// 32-bit broadcast. Per 8 columns, 4 k and one row: two vpmaddwd and two vpaddd, where fp32 needs
// four FMAs. On paper that is twice the rate (Zen 3 issues two vpmaddwd per cycle, as many as
// FMAs); measured, the tiles run at about the FMA rate, and the gain is at few rows, where the
// kernel skips the int-to-float conversion of every weight (kAct16MaxRows). Per group:
//   acc += float(sum u * q) * (scale * s_x) + zero * (s_x * sum q)
// |sum u * q| <= G * 255 * 32639 < 2^31 for G <= 128.
//
// One 8-column block of the panel at a time, over the whole K range: the int32 sums of MR rows
// stay in registers beside the two widened weight vectors and the broadcasts, and the fp32
// accumulators, touched once per group, live in acc (memory). The block's bytes are a quarter of
// each 128-byte quad row, so a panel slice (at most 4096 / 4 * 128 bytes) is read four times, from
// L1 or L2.
constexpr int kMaxVnniRows = 6;

// Calls of up to this many rows take TileU8Vnni. Its advantage is that it needs no int-to-float
// conversion of the weights, which the few-row fp32 kernels pay per row tile; from about a dozen
// rows on, the many-row fp32 path (weights dequantized once per slice, 6 x 16 FMA tiles) is as fast
// on Zen 3. Time of this kernel / the fp32 path (scripts/bench_linear.py --act16-ab, SmolLM2's
// layers): M = 1 0.76-0.87 (lm_head 1.07), M = 4 0.59-0.73, M = 8 0.65-0.78, M = 12 0.84-1.10; in
// a build without this limit, M = 16 0.85-1.05 and M = 32 0.86-1.27.
constexpr int64_t kAct16MaxRows = 8;

// sums[r] += row r's (q_k0, q_k2) * even + (q_k1, q_k3) * odd for the k-quad at xq (row stride ldx),
// where even/odd are one block's weights of that quad as (k0, k2) / (k1, k3) words.
template <int MR>
inline void QuadMadd(const int16_t* xq, int64_t ldx, __m256i even, __m256i odd, __m256i (&sums)[MR]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    // Each pair broadcast as one 32-bit lane through vbroadcastss, a load-port op: a broadcast
    // from a general register costs two vector ops.
    const auto* xr = reinterpret_cast<const float*>(xq + r * ldx);
    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(even, _mm256_castps_si256(_mm256_broadcast_ss(xr))));
    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(odd, _mm256_castps_si256(_mm256_broadcast_ss(xr + 1))));
  }
}

// f (fp32, memory) += float(sums) * (scale * s_x) + zero * (s_x * sum q), per row, for one group.
template <int MR>
inline void ApplyGroup(const __m256i (&sums)[MR], __m256 s, __m256 z, const float* x_scale, const float* x_sum,
                       int64_t xs_ld, float* f) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* fr = f + r * kPanel;
    const __m256 partial = _mm256_fmadd_ps(z, _mm256_set1_ps(x_sum[r * xs_ld]), _mm256_loadu_ps(fr));
    const __m256 step = _mm256_mul_ps(s, _mm256_set1_ps(x_scale[r * xs_ld]));
    _mm256_storeu_ps(fr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), step, partial));
  }
}

// One group of an 8-bit panel as the one-pass kernel below reads it: k-quads of bytes, each
// widened to the (k0, k2) and (k1, k3) words QuadMadd takes, then fp32 scales and zeros.
template <int G>
struct U8Group {
  static constexpr int kRows = G;
  static constexpr int64_t kBytes = int64_t{G} * kPanel + kPanel * 8;  // U8GroupBytes(G)
  // sums[v][r] += row r's products with column block v over the group (rows xg, stride ldx).
  template <int MR>
  static void Madd(const uint8_t* group, const int16_t* xg, int64_t ldx, Prefetcher& pf,
                   __m256i (&sums)[kVecs][MR]) {
    const __m256i low_bytes = _mm256_set1_epi32(0x00FF00FF);
    for (int kq = 0; kq < G; kq += 4) {
      pf.Step(2);  // a k-quad is 128 bytes
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        const __m256i quad = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kq * kPanel + 32 * v));
        QuadMadd<MR>(xg + kq, ldx, _mm256_and_si256(quad, low_bytes), _mm256_srli_epi16(quad, 8), sums[v]);
      }
    }
  }
  static __m256 Scale(const uint8_t* group, int v) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(group + int64_t{G} * kPanel) + 8 * v);
  }
  static __m256 Zero(const uint8_t* group, int v) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(group + int64_t{G} * kPanel) + kPanel + 8 * v);
  }
};

// Tiles of one or two rows: all four blocks in one pass, so the panel streams linearly (it comes
// from DRAM at decode, where four strided passes would each pull half its lines). Group says how
// a group of the panel is stored (U8Group here, U4Group in linear_s8.h).
template <int MR, typename Group>
inline void TileVnniOnePass(const int16_t* xq, int64_t ldx, const float* x_scale, const float* x_sum,
                            int64_t xs_ld, const uint8_t* b, int64_t kc, Prefetcher& pf,
                            __m256 (&acc)[MR][kVecs]) {
  static_assert(MR <= 2, "the one-pass form holds two rows' sums of four blocks");
  float* out = reinterpret_cast<float*>(&acc[0][0]);
  ZeroTile(acc);
  const int16_t* xg = xq;
  const uint8_t* end = b + kc / Group::kRows * Group::kBytes;
  for (const uint8_t* group_start = b; group_start < end; group_start += Group::kBytes, xg += Group::kRows) {
    __m256i sums[kVecs][MR];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) sums[v][r] = _mm256_setzero_si256();
    }
    Group::template Madd<MR>(group_start, xg, ldx, pf, sums);
    const int64_t g = (xg - xq) / Group::kRows;
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      ApplyGroup<MR>(sums[v], Group::Scale(group_start, v), Group::Zero(group_start, v), x_scale + g, x_sum + g,
                     xs_ld, out + 8 * v);
    }
  }
}

template <int MR, int G>
inline void TileU8Vnni(const int16_t* xq, int64_t ldx, const float* x_scale, const float* x_sum, int64_t xs_ld,
                       const uint8_t* b, int64_t kc, Prefetcher& pf, __m256 (&acc)[MR][kVecs]) {
  static_assert(MR <= kMaxVnniRows, "too many rows for the registers");
  if constexpr (MR <= 2) {
    TileVnniOnePass<MR, U8Group<G>>(xq, ldx, x_scale, x_sum, xs_ld, b, kc, pf, acc);
    return;
  }
  const __m256i low_bytes = _mm256_set1_epi32(0x00FF00FF);
  const int64_t group_bytes = U8GroupBytes(G);
  const int64_t groups = kc / G;
  float* out = reinterpret_cast<float*>(&acc[0][0]);  // row r, block v at out + r * kPanel + 8 * v
  // Not unrolled: four copies of the group loop overflow the registers and GCC spills the sums.
#pragma GCC unroll 1
  for (int v = 0; v < kVecs; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + r * kPanel + 8 * v, _mm256_setzero_ps());
    const uint8_t* group_start = b + 32 * v;
    const int16_t* xg = xq;
    for (int64_t g = 0; g < groups; ++g, group_start += group_bytes, xg += G) {
      pf.Step(G / 8);  // the four passes together fetch the next panel's slice once
      __m256i sums[MR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int kq = 0; kq < G; kq += 4) {
        const __m256i quad = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_start + kq * kPanel));
        QuadMadd<MR>(xg + kq, ldx, _mm256_and_si256(quad, low_bytes), _mm256_srli_epi16(quad, 8), sums);
      }
      const float* scale = reinterpret_cast<const float*>(group_start - 32 * v + static_cast<int64_t>(G) * kPanel);
      ApplyGroup<MR>(sums, _mm256_loadu_ps(scale + 8 * v), _mm256_loadu_ps(scale + kPanel + 8 * v), x_scale + g,
                     x_sum + g, xs_ld, out + 8 * v);
    }
  }
}

// Group sizes with a TileU8Vnni instance (and a multiple of QuantizeRow16's 8).
constexpr bool VnniGroupOk(int group) { return group == 16 || group == 32 || group == 64 || group == 128; }

// The largest |q| of a 16-bit activation: the AVX-512 kernels' grid, kept so both builds multiply
// the same activations.
constexpr float kAct16Max = 32639.0f;

// Quantizes row x (k elements, k % group == 0, group % 8 == 0) group by group to int16 q in the
// [k0 k2 k1 k3] order of each k-quad that TileU8Vnni reads, with the step s_x and s_x * sum(q)
// per group.
inline void QuantizeRow16(const float* x, int64_t k, int group, int16_t* q_out, float* scale, float* sum) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  // Lanes k0 k1 k2 k3 | k4 k5 k6 k7 -> k0 k2 k1 k3 | k4 k6 k5 k7.
  const __m256i quad_order = _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += group, ++g) {
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < group; i += 8) {
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + g0 + i)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float max_abs = 0.f;
    for (float lane : lanes) max_abs = std::max(max_abs, lane);
    const float inv = max_abs > 0.f ? kAct16Max / max_abs : 0.f;
    const float step = max_abs / kAct16Max;
    __m256i total = _mm256_setzero_si256();
    for (int i = 0; i < group; i += 8) {
      // Round to nearest even, as the default MXCSR mode of vcvtps2dq does.
      const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + g0 + i), _mm256_set1_ps(inv)));
      total = _mm256_add_epi32(total, q);
      const __m256i ordered = _mm256_permutevar8x32_epi32(q, quad_order);
      // packs works within 128-bit halves: (lo half, lo half | hi half, hi half), then pick 0 and 2.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(ordered, ordered), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q_out + g0 + i), _mm256_castsi256_si128(packed));
    }
    alignas(32) int32_t parts[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(parts), total);
    int64_t q_sum = 0;
    for (int32_t part : parts) q_sum += part;
    scale[g] = step;
    sum[g] = step * static_cast<float>(q_sum);
  }
}
#endif  // __AVX512F__, FD_LINEAR_SIMD

}  // namespace fd_linear
