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

#include "attention_simd.h"
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

#ifdef FD_ATTENTION_TILED
// Vector rows on the attention kernels' traits (AVX-512 or AVX2 + FMA, attention_simd.h), with
// the last h % kLanes elements done one at a time: model widths are multiples of 16, so the tail
// only runs in tests.
using fd_attention_simd::Simd;
constexpr int64_t kLanes = Simd::kLanes;

void RmsNormRow(const float* x, const float* res, const float* w, int64_t h, float eps, float* out,
                float* res_out) {
  // With a residual, v = x + residual is written to res_out first and read back from L1 for
  // the scaling pass; without one, v is x itself.
  const int64_t body = h - h % kLanes;
  const float* v = x;
  Simd::V sum = Simd::Zero();
  float tail_sum = 0.f;
  if (res != nullptr) {
    for (int64_t i = 0; i < body; i += kLanes) {
      const Simd::V s = Simd::Add(Simd::LoadU(x + i), Simd::LoadU(res + i));
      Simd::StoreU(res_out + i, s);
      sum = Simd::Fmadd(s, s, sum);
    }
    for (int64_t i = body; i < h; ++i) {
      res_out[i] = x[i] + res[i];
      tail_sum += res_out[i] * res_out[i];
    }
    v = res_out;
  } else {
    for (int64_t i = 0; i < body; i += kLanes) {
      const Simd::V s = Simd::LoadU(x + i);
      sum = Simd::Fmadd(s, s, sum);
    }
    for (int64_t i = body; i < h; ++i) tail_sum += x[i] * x[i];
  }
  const float inv = 1.0f / std::sqrt((Simd::SumLane(sum) + tail_sum) / static_cast<float>(h) + eps);
  const Simd::V scale = Simd::Set1(inv);
  for (int64_t i = 0; i < body; i += kLanes) {
    Simd::StoreU(out + i, Simd::Mul(Simd::Mul(Simd::LoadU(v + i), scale), Simd::LoadU(w + i)));
  }
  for (int64_t i = body; i < h; ++i) out[i] = v[i] * inv * w[i];
}

// silu(g) = g / (1 + e^-g). Simd::Exp flushes e^-g to 0 for g > 87 (silu = g there) and clamps
// at e^88 below g = -88, where g / (1 + e^88) is -0 to within a float's reach either way.
void SiluMulRow(const float* gate, const float* up, int64_t n, float* out) {
  const int64_t body = n - n % kLanes;
  const Simd::V one = Simd::Set1(1.0f);
  for (int64_t i = 0; i < body; i += kLanes) {
    const Simd::V g = Simd::LoadU(gate + i);
    const Simd::V e = Simd::Exp(Simd::Sub(Simd::Zero(), g));
    Simd::StoreU(out + i, Simd::Mul(Simd::Div(g, Simd::Add(one, e)), Simd::LoadU(up + i)));
  }
  for (int64_t i = body; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}
#else
// Portable versions (the build has neither AVX-512 nor AVX2 + FMA): same arithmetic, one element
// at a time.
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
