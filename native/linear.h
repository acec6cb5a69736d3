// The fd_linear GEMM as a C++ entry point for the other ops of the same extension (norm.cc puts an
// RMSNorm in front of it, saving one op dispatch per norm). Layout and kernels: linear.cc.
#pragma once

#include <cstdint>

#include "paddle/extension.h"

namespace fd_linear {

struct LinearArgs {
  int64_t n = 0;               // output features
  int format = 0;              // 0 fp32, 1 bf16, 2 u8 (affine 8-bit)
  int group = 0;               // u8: K rows per (scale, zero)
  int bf16_dot_min_rows = 0;   // vdpbf16ps with bf16 activations from this many rows on (0 = never)
  int vnni = 0;                // u8: 1 = 16-bit activations, integer sums (where built: linear.cc);
                               // 2 = codes all <= 15 too: 8-bit activations at many rows (AVX2)
  int num_threads = 1;
};

// y [M, n] = x [M, K] @ W (+ bias [n], or none when bias has no elements), W packed as linear.cc
// describes. x float32 on the CPU; raises (PD_CHECK) on anything else.
paddle::Tensor Forward(const paddle::Tensor& x, const paddle::Tensor& packed_w, const paddle::Tensor& bias,
                       const LinearArgs& args);

}  // namespace fd_linear
