// 4-bit weight codes x 8-bit activations with vpmaddubsw: fd_linear's AVX2 kernel for calls of
// kS8MinRows (2) rows or more on 4-bit panels (u4: a GGUF Q4_0/Q4_1 source, whose groups of 32
// lie on 16-level grids; the Python side stores such layers as their 4-bit codes with the block's
// own scale and zero) that ask for it (vnni = 2). Opt-in: 8-bit activations shift SmolLM2's
// logits by ~0.65 (median over steps of the largest change), enough to flip greedy tokens whose
// fp32 top-2 gap is 0.4, where the 16-bit kernel's (U4Group below) stay within 1e-3.
//
// Why: on AVX2 the fp32 FMA path is the only fast many-row path, and fp32 multiplies 8 pairs per
// instruction. vpmaddubsw multiplies 32 u8 x s8 pairs into 16 int16 pair sums; with a vpaddw per
// product vector that is 16 multiply-adds per integer op against 8 per FMA (measured by
// scripts/bench_machine.py on Zen 3: 1.5-1.6x the FMA rate in multiply-adds). Its catch is int16
// saturation, which 4-bit weights avoid: one lane sums 2 products per vpmaddubsw and 16 over a
// group of 32 k, at most 16 * 15 * 127 = 30480 < 32767, so a group's sums are exact.
//
// 4-bit panels (U4GroupBytes): per group of 32 rows along K, uint8 [4][32][4] holding the 8 k-quads
// two to a byte (quad 2i in the low nibbles, quad 2i + 1 in the high ones, each in the u8 panels'
// [32][4] byte order), then IEEE half scale[32] and zero[32]: GGUF stores a 4-bit block's step and
// offset as halves, so they are exact (the Python side keeps a layer 8-bit otherwise). 5 bits per
// weight, half the bytes of the 8-bit panels: at decode the weights stream from DRAM once per step.
//
// Activations are quantized per row and group of 32 to q = round(x / s_x), |q| <= 127 (s_x = max
// |x| / 127): llama.cpp's Q8_1 grid for its Q4_1 dot products. Per group and row:
//   acc += float(sum u * q) * (scale * s_x) + zero * (s_x * sum q)
// where the int16 pair sums are widened to int32 column sums by one vpmaddwd with ones.
//
// Loop order as TileU8Vnni's many-row form: one 8-column block of the panel at a time over the
// whole K range, the int16 sums of MR rows in registers, the fp32 accumulators (touched once per
// group) in acc (memory). The activations are stored by pairs of k-quads, int32 [K/8][M][2] (the
// 4 bytes of one row's k-quad as one int32, a row's quads 2i and 2i + 1 side by side), and the
// steps and sums group-major, [K/32][M]: every broadcast of a step of the loops then sits at a
// constant offset of one pointer. With a row stride, or with the second quad a dynamic M away,
// GCC has no registers left for the offsets and reloads one from the stack per broadcast
// (measured: 0.75-0.85x the speed at prefill sizes).
#pragma once

#include "linear_kernels.h"

#if !defined(__AVX512F__) && FD_LINEAR_SIMD
#define FD_LINEAR_S8 1
#else
#define FD_LINEAR_S8 0
#endif

#if FD_LINEAR_S8
namespace fd_linear {

// The only group size of 4-bit panels: GGUF's block, and the largest whose int16 sums cannot
// saturate (a group of 64 could reach 60960).
constexpr int kS8Group = 32;
constexpr int64_t U4GroupBytes() { return int64_t{kS8Group} / 2 * kPanel + kPanel * 4; }
// Eight halves of a 4-bit panel's scales or zeros, widened (F16C, which every AVX2 + FMA CPU has).
inline __m256 LoadHalves(const uint8_t* at) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
}
// The low and the high nibbles of a 4-bit panel's bytes: two k-quads in the u8 panels' layout.
inline __m256i LowNibbles(__m256i pair, __m256i mask) { return _mm256_and_si256(pair, mask); }
inline __m256i HighNibbles(__m256i pair, __m256i mask) {
  return _mm256_and_si256(_mm256_srli_epi16(pair, 4), mask);
}
// Rows per tile: MR int16 sums, the weight vector, a broadcast and the constants fit in 16 ymm.
constexpr int kMaxS8Rows = 8;
// Calls of fewer rows take the 16-bit kernel (TileU8Vnni's one-pass form, which streams the panel
// once). Time of this kernel / that one, Q4_1-shaped weights of SmolLM2's layers, 2 threads: M = 1
// 0.80-1.10, M = 2 0.90-1.00, M = 4 0.57-0.81, M = 8 0.56-0.84, M = 12 0.61-0.67; against the fp32
// path 0.4-0.8 from M = 2 to 256 (scripts/bench_linear.py --act8-ab).
constexpr int64_t kS8MinRows = 2;
// Row tiles of the 16-bit kernel on 4-bit panels: TileVnniOnePass holds two rows' sums beside the
// panel's four column blocks. It serves the calls that do not take the 8-bit kernel (the calls
// below kS8MinRows rows, and all calls that do not ask for 8-bit activations) of up to
// kU4Act16MaxRows rows; longer ones run the fp32 tiles on slices from DequantU4ToF32. Time of the
// 16-bit tiles / the fp32 ones, SmolLM2's qkv, gate_up and down on 2 threads (bench_linear.py
// --act8-ab, two builds alternating): M = 16 0.91-0.95, M = 32 0.99-1.03, M = 256 1.04-1.12.
constexpr int64_t kU4Act16TileRows = 2;
constexpr int64_t kU4Act16MaxRows = 32;

// sum += products (vpaddw) as an opaque instruction. Written as _mm256_add_epi16, GCC
// reassociates the adds of an unrolled group into trees of products that are all live at once
// and spills them to the stack (measured: 0.6x the speed).
inline void AddWords(__m256i& sum, __m256i products) {
  asm("vpaddw %1, %0, %0" : "+x"(sum) : "x"(products));
}

// xq: the tile's first row at its first k-quad pair in the [K/8][M][2] layout; x_scale, x_sum:
// the tile's first row at its first group in the [K/32][M] layout.
template <int MR>
inline void TileS8(const int32_t* xq, int64_t m, const float* x_scale, const float* x_sum,
                   const uint8_t* b, int64_t kc, Prefetcher& pf, __m256 (&acc)[MR][kVecs]) {
  static_assert(MR <= kMaxS8Rows, "too many rows for the registers");
  constexpr int G = kS8Group;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  constexpr int64_t group_bytes = U4GroupBytes();
  const int64_t groups = kc / G;
  float* out = reinterpret_cast<float*>(&acc[0][0]);  // row r, block v at out + r * kPanel + 8 * v
#pragma GCC unroll 1
  for (int v = 0; v < kVecs; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + r * kPanel + 8 * v, _mm256_setzero_ps());
    const uint8_t* group_start = b + 32 * v;
    const int32_t* xg = xq;
    for (int64_t g = 0; g < groups; ++g, group_start += group_bytes) {
      pf.Step(3);  // a group is 10 lines: the four passes together fetch the next panel's slice once
      __m256i sums[MR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int kp = 0; kp < G / 8; ++kp, xg += 2 * m) {
        // 8 columns x two k-quads: byte j of 32-bit lane c is (k + j, column c) in each nibble, and
        // the broadcast activations are (k .. k + 3) of one row in the same byte order.
        const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_start + kp * 4 * kPanel));
        const __m256i w0 = LowNibbles(pair, nibble);
        const __m256i w1 = HighNibbles(pair, nibble);
        const auto* xk = reinterpret_cast<const float*>(xg);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          AddWords(sums[r], _mm256_maddubs_epi16(w0, _mm256_castps_si256(_mm256_broadcast_ss(xk + 2 * r))));
          AddWords(sums[r], _mm256_maddubs_epi16(w1, _mm256_castps_si256(_mm256_broadcast_ss(xk + 2 * r + 1))));
        }
      }
      __m256i wide[MR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) wide[r] = _mm256_madd_epi16(sums[r], ones);
      const uint8_t* scale = group_start - 32 * v + G / 2 * kPanel;
      ApplyGroup<MR>(wide, LoadHalves(scale + 16 * v), LoadHalves(scale + 2 * kPanel + 16 * v), x_scale + g * m,
                     x_sum + g * m, 1, out + 8 * v);
    }
  }
}

// One group of a 4-bit panel for TileVnniOnePass (linear_kernels.h), which runs the calls below
// kS8MinRows rows with 16-bit activations (QuantizeRow16's grid, TileU8Vnni's arithmetic): each
// pair of k-quads is widened to the two word operands per quad that QuadMadd takes, four masks and
// shifts per 32 bytes; the scales and zeros are halves.
struct U4Group {
  static constexpr int kRows = kS8Group;
  static constexpr int64_t kBytes = U4GroupBytes();
  template <int MR>
  static void Madd(const uint8_t* group, const int16_t* xg, int64_t ldx, Prefetcher& pf,
                   __m256i (&sums)[kVecs][MR]) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i low_bytes = _mm256_set1_epi32(0x00FF00FF);
    for (int kp = 0; kp < kRows / 8; ++kp) {
      pf.Step(3);  // a group is 10 lines: four steps of 3 keep ahead of it
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kp * 4 * kPanel + 32 * v));
        const __m256i q0 = LowNibbles(pair, nibble);
        const __m256i q1 = HighNibbles(pair, nibble);
        QuadMadd<MR>(xg + 8 * kp, ldx, _mm256_and_si256(q0, low_bytes), _mm256_srli_epi16(q0, 8), sums[v]);
        QuadMadd<MR>(xg + 8 * kp + 4, ldx, _mm256_and_si256(q1, low_bytes), _mm256_srli_epi16(q1, 8), sums[v]);
      }
    }
  }
  static __m256 Scale(const uint8_t* group, int v) { return LoadHalves(group + kRows / 2 * kPanel + 16 * v); }
  static __m256 Zero(const uint8_t* group, int v) {
    return LoadHalves(group + kRows / 2 * kPanel + 2 * kPanel + 16 * v);
  }
};

// Dequantizes kc rows of a 4-bit panel into fp32 [kc][32], as DequantU8ToF32 does 8-bit ones: the
// calls of more than kU4Act16MaxRows rows that do not take 8-bit activations run the fp32 tiles on
// these slices.
inline void DequantU4ToF32(const uint8_t* b, int64_t kc, float* out) {
  constexpr int G = kS8Group;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256 s[kVecs];
  __m256 z[kVecs];
  __m256i low[kVecs];
  __m256i high[kVecs];
  for (int64_t g0 = 0; g0 < kc; g0 += G, b += U4GroupBytes()) {
    const uint8_t* scale = b + G / 2 * kPanel;
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      s[v] = LoadHalves(scale + 16 * v);
      z[v] = LoadHalves(scale + 2 * kPanel + 16 * v);
    }
    for (int kp = 0; kp < G / 8; ++kp) {
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kp * 4 * kPanel + 32 * v));
        low[v] = LowNibbles(pair, nibble);
        high[v] = HighNibbles(pair, nibble);
      }
      float* o = out + (g0 + 8 * kp) * kPanel;
      StoreQuadDequant(low, s, z, o);  // quad 2 kp, then quad 2 kp + 1
      StoreQuadDequant(high, s, z, o + 4 * kPanel);
    }
  }
}

// Quantizes row x (k elements, k % 32 == 0) per group of 32 to int8 q, k-quad j of the row going
// to q_out[(j / 2) * 2m + j % 2] (the [K/8][M][2] layout of TileS8), with the step s_x and
// s_x * sum(q) of group g at scale[g * m] and sum[g * m] (the [K/32][M] layout).
inline void QuantizeRow8(const float* x, int64_t k, int64_t m, int32_t* q_out, float* scale, float* sum) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  // packs_epi32 then packs_epi16 interleave 128-bit halves: dwords come out as
  // q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] q1[4:8] q2[4:8] q3[4:8]; this puts them back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += kS8Group, ++g) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + g0 + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float max_abs = 0.f;
    for (float lane : lanes) max_abs = std::max(max_abs, lane);
    const __m256 inv = _mm256_set1_ps(max_abs > 0.f ? 127.0f / max_abs : 0.f);
    __m256i q[4];
    __m256i total = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      // Round to nearest even (the default MXCSR mode of vcvtps2dq); |q| <= 127, so no packing
      // below saturates.
      q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      total = _mm256_add_epi32(total, q[i]);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    alignas(32) int32_t quads[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(quads), _mm256_permutevar8x32_epi32(bytes, order));
    for (int j = 0; j < 8; j += 2) {
      int32_t* pair = q_out + (g0 / 8 + j / 2) * 2 * m;
      pair[0] = quads[j];
      pair[1] = quads[j + 1];
    }
    alignas(32) int32_t parts[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(parts), total);
    int32_t q_sum = 0;
    for (int32_t part : parts) q_sum += part;
    const float step = max_abs / 127.0f;
    scale[g * m] = step;
    sum[g * m] = step * static_cast<float>(q_sum);
  }
}

}  // namespace fd_linear
#endif  // FD_LINEAR_S8
