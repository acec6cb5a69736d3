// Vector traits for the tiled paged-attention kernel (paged_attention.cc), also used by the
// element-wise rows of norm.cc: one fp32 register of kLanes lanes and the handful of operations
// they need, for AVX-512 (16 lanes) and for AVX2 + FMA + F16C (8 lanes). The kernels are written
// once against these; FD_ATTENTION_TILED is defined when either instruction set is available at
// compile time (-march=native).
#pragma once

#include <cstdint>
#include <limits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#define FD_ATTENTION_TILED 1
#endif

namespace fd_attention_simd {

#ifdef FD_ATTENTION_TILED
// The sums of the 8 lanes of each of a0..a3, as [sum a0, sum a1, sum a2, sum a3].
inline __m128 HorizontalSums(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t0 = _mm256_hadd_ps(a0, a1);  // per 128-bit half: a0 pair sums, a1 pair sums
  const __m256 t1 = _mm256_hadd_ps(a2, a3);
  const __m256 t2 = _mm256_hadd_ps(t0, t1);  // per half: the quad sums of a0, a1, a2, a3
  return _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
}

// The sum of the 4 lanes of x.
inline float SumLane4(__m128 x) {
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// The largest of the 4 lanes of x.
inline float MaxLane4(__m128 x) {
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
#endif

// e^r for r = x - n ln2 (|r| <= ln2/2): ln2 is split in two so n ln2 is subtracted exactly enough,
// then the degree-7 Taylor polynomial (truncation error < 1e-8 relative). Shared by both ISAs.
template <class S>
inline typename S::V ExpTaylor(typename S::V x, typename S::V n) {
  using V = typename S::V;
  V r = S::Fmadd(n, S::Set1(-0.693145751953125f), x);
  r = S::Fmadd(n, S::Set1(-1.4286068203094173e-06f), r);
  V poly = S::Set1(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) {
    poly = S::Fmadd(poly, r, S::Set1(c));
  }
  return poly;
}

#if defined(__AVX512F__)

struct Simd {
  using V = __m512;
  static constexpr int kLanes = 16;
  // Output accumulators per row in UpdateOutput: 4 rows x 4 chunks + 4 values fit in 32 zmm.
  static constexpr int kMaxChunks = 4;
  // Output chunks per pass of the narrow (lanes along head_dim) kernel: 3 rows x 4 accumulators.
  static constexpr int kNarrowChunks = 4;

  static V Zero() { return _mm512_setzero_ps(); }
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Load(const float* p) { return _mm512_load_ps(p); }
  static V LoadU(const float* p) { return _mm512_loadu_ps(p); }
  // kLanes float16 values (their bits), widened to fp32.
  static V LoadU(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // kLanes int8 codes, widened to fp32 (unscaled).
  static V LoadU(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void Store(float* p, V v) { _mm512_store_ps(p, v); }
  static void StoreU(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm512_div_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static V Fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static __m128 Sum4(V a0, V a1, V a2, V a3) { return HorizontalSums(Fold(a0), Fold(a1), Fold(a2), Fold(a3)); }
  static float MaxLane(V x) { return _mm512_reduce_max_ps(x); }
  static float SumLane(V x) { return _mm512_reduce_add_ps(x); }
  // The two 256-bit halves added (AVX512F only: no DQ extract).
  static __m256 Fold(V x) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(x), hi);
  }

  // Lanes whose query position is before key_pos (the key is in their future) become -inf.
  static V MaskFuture(V scores, int32_t key_pos, const int32_t* qpos) {
    const __mmask16 future = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(key_pos), _mm512_load_si512(qpos));
    return _mm512_mask_mov_ps(scores, future, Set1(-std::numeric_limits<float>::infinity()));
  }
  // -inf lanes become 0 (a running max with nothing visible yet), so max - max gives 0, not NaN.
  static V ZeroWhereNegInf(V x) {
    const __mmask16 neg_inf = _mm512_cmp_ps_mask(x, Set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(x, neg_inf, Zero());
  }

  // e^x for x <= 88.7: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
  // (truncation error < 1e-8 relative), then scaled by 2^n. Inputs are clamped at -150, where 2^n
  // underflows scalef to exactly 0, so masked (-inf) scores get exactly zero weight.
  static V Exp(V x) {
    x = _mm512_max_ps(x, Set1(-150.f));
    x = _mm512_min_ps(x, Set1(88.7f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, Set1(1.4426950408889634f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(ExpTaylor<Simd>(x, n), n);
  }

};

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

struct Simd {
  using V = __m256;
  static constexpr int kLanes = 8;
  // 16 ymm: 4 rows x 2 chunks of accumulators + 2 values + 1 broadcast weight, no spills.
  static constexpr int kMaxChunks = 2;
  // Narrow kernel: 3 rows x 4 chunks of accumulators + 3 broadcast weights + 1 value.
  static constexpr int kNarrowChunks = 4;

  static V Zero() { return _mm256_setzero_ps(); }
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Load(const float* p) { return _mm256_load_ps(p); }
  static V LoadU(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadU(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V LoadU(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void Store(float* p, V v) { _mm256_store_ps(p, v); }
  static void StoreU(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static __m128 Sum4(V a0, V a1, V a2, V a3) { return HorizontalSums(a0, a1, a2, a3); }
  static float MaxLane(V x) { return MaxLane4(_mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1))); }
  static float SumLane(V x) { return SumLane4(_mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1))); }

  static V MaskFuture(V scores, int32_t key_pos, const int32_t* qpos) {
    const __m256i qpos_v = _mm256_load_si256(reinterpret_cast<const __m256i*>(qpos));
    const __m256i future = _mm256_cmpgt_epi32(_mm256_set1_epi32(key_pos), qpos_v);
    return _mm256_blendv_ps(scores, Set1(-std::numeric_limits<float>::infinity()), _mm256_castsi256_ps(future));
  }
  static V ZeroWhereNegInf(V x) {
    const V neg_inf = _mm256_cmp_ps(x, Set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    return _mm256_blendv_ps(x, Zero(), neg_inf);
  }

  // e^x as in the AVX-512 version, with 2^n built in the exponent field (there is no scalef):
  // n is kept in [-125, 127] by clamping x to [-87, 88], and lanes below -87 (including masked
  // -inf scores) are flushed to exactly 0; e^-87 ~ 1.6e-38 is below anything softmax can use.
  static V Exp(V x) {
    const V keep = _mm256_cmp_ps(x, Set1(-87.f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, Set1(-87.f));
    x = _mm256_min_ps(x, Set1(88.f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, Set1(1.4426950408889634f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(ExpTaylor<Simd>(x, n), _mm256_castsi256_ps(bits)), keep);
  }

};

#endif

}  // namespace fd_attention_simd
