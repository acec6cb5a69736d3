// Fused element-wise ops around the linear layers, as Paddle custom operators:
//
//   fd_rms_norm(x [M, H], weight [H], residual [M, H] or [0]) -> (out [M, H], residual_out [M, H] or [0])
//     v = x + residual (just x when residual is empty); out = v / sqrt(mean(v^2) + eps) * weight;
//     residual_out = v (left empty when there is no residual: the caller already holds x).
//   fd_silu_mul(x [M, 2I]) -> [M, I]:   silu(x[:, :I]) * x[:, I:]   (the fused gate|up output)
//   fd_rms_norm_linear(x, weight, residual, packed_w, bias) -> (y, residual_out): fd_rms_norm, then
//     fd_linear (linear.cc) on its output, in one op.
//
// Each replaces four to six Paddle ops (and as many passes over the activations and Python-level
// dispatches) with one: at decode a layer is two norms and one SiLU gate, and Paddle's per-op
// overhead (~5 us each) costs more than the arithmetic.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "linear.h"
#include "norm.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace {

// Below this many elements a second thread costs more than it saves.
constexpr int64_t kMinParallelElements = 1 << 16;

paddle::Tensor Contiguous(const paddle::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

int ThreadsFor(int64_t elements, int num_threads) {
  return elements >= kMinParallelElements ? std::max(num_threads, 1) : 1;
}

#ifdef __AVX512F__
inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// e^x for 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n * ln2 is exact),
// e^r by its degree-6 Taylor polynomial (truncation error < 1.5e-7 relative), times 2^n by
// vscalefps. Inputs are clamped to where e^x is a finite float; SiLU needs no more.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

void RmsNormRow(const float* x, const float* res, const float* w, int64_t h, float eps, float* out,
                float* res_out) {
  // With a residual, v = x + residual is written to res_out first and read back from L1 for
  // the scaling pass; without one, v is x itself.
  const float* v = x;
  __m512 sum = _mm512_setzero_ps();
  if (res != nullptr) {
    for (int64_t i = 0; i < h; i += 16) {
      const __mmask16 m = TailMask(h - i);
      const __m512 s = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, res + i));
      _mm512_mask_storeu_ps(res_out + i, m, s);
      sum = _mm512_fmadd_ps(s, s, sum);
    }
    v = res_out;
  } else {
    for (int64_t i = 0; i < h; i += 16) {
      const __m512 s = _mm512_maskz_loadu_ps(TailMask(h - i), x + i);
      sum = _mm512_fmadd_ps(s, s, sum);
    }
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(sum) / static_cast<float>(h) + eps);
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = TailMask(h - i);
    const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, v + i), scale), _mm512_maskz_loadu_ps(m, w + i));
    _mm512_mask_storeu_ps(out + i, m, y);
  }
}

void SiluMulRow(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), Exp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
  }
}
#else
// Portable versions (the build has no AVX-512): same arithmetic, one element at a time.
void RmsNormRow(const float* x, const float* res, const float* w, int64_t h, float eps, float* out,
                float* res_out) {
  float sum = 0.f;
  for (int64_t i = 0; i < h; ++i) {
    const float v = res != nullptr ? x[i] + res[i] : x[i];
    if (res != nullptr) res_out[i] = v;
    sum += v * v;
  }
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
  const float* v = res != nullptr ? res_out : x;
  for (int64_t i = 0; i < h; ++i) out[i] = v[i] * inv * w[i];
}

void SiluMulRow(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}
#endif

std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight,
                                    const paddle::Tensor& residual, float eps, int num_threads) {
  PD_CHECK(x.is_cpu() && weight.is_cpu() && residual.is_cpu(), "fd_rms_norm inputs must be CPU tensors");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && weight.dtype() == paddle::DataType::FLOAT32 &&
               residual.dtype() == paddle::DataType::FLOAT32,
           "fd_rms_norm inputs must be float32");
  PD_CHECK(x.shape().size() == 2, "x must be [M, H]");
  const int64_t m = x.shape()[0];
  const int64_t h = x.shape()[1];
  PD_CHECK(weight.numel() == h, "weight must have H = ", h, " elements");
  const bool has_residual = residual.numel() > 0;
  PD_CHECK(!has_residual || residual.shape() == x.shape(), "residual must be empty or shaped like x");
  paddle::Tensor out = paddle::empty({m, h}, paddle::DataType::FLOAT32, x.place());
  paddle::Tensor res_out =
      paddle::empty({has_residual ? m : 0, h}, paddle::DataType::FLOAT32, x.place());
  if (m == 0 || h == 0) return {out, res_out};
  const paddle::Tensor x_c = Contiguous(x);
  const paddle::Tensor w_c = Contiguous(weight);
  const paddle::Tensor r_c = Contiguous(residual);
  const float* xp = x_c.data<float>();
  const float* wp = w_c.data<float>();
  const float* rp = has_residual ? r_c.data<float>() : nullptr;
  float* op = out.data<float>();
  float* rop = has_residual ? res_out.data<float>() : nullptr;
  const int threads = ThreadsFor(m * h, num_threads);
  fd_threads::ParallelChunks(m, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RmsNormRow(xp + row * h, rp != nullptr ? rp + row * h : nullptr, wp, h, eps, op + row * h,
                 rop != nullptr ? rop + row * h : nullptr);
    }
  });
  return {out, res_out};
}

std::vector<paddle::Tensor> RmsNormKernel(const paddle::Tensor& x, const paddle::Tensor& weight,
                                          const paddle::Tensor& residual, float eps, int num_threads) {
  return RmsNorm(x, weight, residual, eps, num_threads);
}

// The normalized rows go straight into the linear layer; only (y, residual_out) leave the op.
std::vector<paddle::Tensor> RmsNormLinearKernel(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                const paddle::Tensor& residual, const paddle::Tensor& packed_w,
                                                const paddle::Tensor& bias, float eps, int64_t n, int format,
                                                int group, int bf16_dot_min_rows, int vnni, int num_threads) {
  std::vector<paddle::Tensor> normed = RmsNorm(x, weight, residual, eps, num_threads);
  paddle::Tensor y =
      fd_linear::Forward(normed[0], packed_w, bias, {n, format, group, bf16_dot_min_rows, vnni, num_threads});
  return {y, normed[1]};
}

std::vector<std::vector<int64_t>> RmsNormLinearInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>&, const std::vector<int64_t>& residual_shape,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const float&, const int64_t& n, const int&,
    const int&, const int&, const int&, const int&) {
  return {{x_shape.empty() ? 0 : x_shape[0], n}, residual_shape};
}

std::vector<paddle::DataType> RmsNormLinearInferDtype(const paddle::DataType&, const paddle::DataType&,
                                                      const paddle::DataType&, const paddle::DataType&,
                                                      const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> RmsNormInferShape(const std::vector<int64_t>& x_shape,
                                                    const std::vector<int64_t>&,
                                                    const std::vector<int64_t>& residual_shape, const float&,
                                                    const int&) {
  return {x_shape, residual_shape};
}

std::vector<paddle::DataType> RmsNormInferDtype(const paddle::DataType&, const paddle::DataType&,
                                                const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

std::vector<paddle::Tensor> SiluMulKernel(const paddle::Tensor& x, int num_threads) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "fd_silu_mul input must be a float32 CPU tensor");
  PD_CHECK(x.shape().size() == 2 && x.shape()[1] % 2 == 0, "x must be [M, 2I]");
  const int64_t m = x.shape()[0];
  const int64_t n = x.shape()[1] / 2;
  paddle::Tensor out = paddle::empty({m, n}, paddle::DataType::FLOAT32, x.place());
  if (m == 0 || n == 0) return {out};
  const paddle::Tensor x_c = Contiguous(x);
  const float* xp = x_c.data<float>();
  float* op = out.data<float>();
  const int threads = ThreadsFor(m * n, num_threads);
  fd_threads::ParallelChunks(m, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) SiluMulRow(xp + row * 2 * n, xp + row * 2 * n + n, n, op + row * n);
  });
  return {out};
}

std::vector<std::vector<int64_t>> SiluMulInferShape(const std::vector<int64_t>& x_shape, const int&) {
  return {{x_shape[0], x_shape[1] / 2}};
}

std::vector<paddle::DataType> SiluMulInferDtype(const paddle::DataType&) { return {paddle::DataType::FLOAT32}; }

}  // namespace

std::vector<paddle::Tensor> fd_norm::RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight,
                                             const paddle::Tensor& residual, float eps, int num_threads) {
  return ::RmsNorm(x, weight, residual, eps, num_threads);
}

paddle::Tensor fd_norm::SiluMul(const paddle::Tensor& x, int num_threads) { return SiluMulKernel(x, num_threads)[0]; }

PD_BUILD_OP(fd_rms_norm)
    .Inputs({"X", "Weight", "Residual"})
    .Outputs({"Out", "ResidualOut"})
    .Attrs({"eps: float", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(RmsNormKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormInferDtype));

PD_BUILD_OP(fd_silu_mul)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"num_threads: int"})
    .SetKernelFn(PD_KERNEL(SiluMulKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(SiluMulInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SiluMulInferDtype));

PD_BUILD_OP(fd_rms_norm_linear)
    .Inputs({"X", "Weight", "Residual", "PackedW", "Bias"})
    .Outputs({"Out", "ResidualOut"})
    .Attrs({"eps: float", "n: int64_t", "format: int", "group: int", "bf16_dot_min_rows: int", "vnni: int",
            "num_threads: int"})
    .SetKernelFn(PD_KERNEL(RmsNormLinearKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormLinearInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormLinearInferDtype));
