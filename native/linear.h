// The fd_linear GEMM as a C++ entry point for the other ops of the same extension (norm.cc puts an
// RMSNorm in front of it, saving one op dispatch per norm). Layout and kernels: linear.cc.
#pragma once

#include <cstdint>

#include "paddle/extension.h"

namespace fd_linear {

struct LinearArgs {
  int64_t n = 0;               // output features
  int format = 0;              // 0 fp32, 1 bf16, 2 affine grid (u8 panels, or u4 ones in AVX2 builds,
                               // told apart by the packed size: linear.cc)
  int group = 0;               // format 2: K rows per (scale, zero)
  int bf16_dot_min_rows = 0;   // vdpbf16ps with bf16 activations from this many rows on (0 = never)
  int vnni = 0;                // u8 panels: 1 = 16-bit activations, integer sums (where built:
                               // linear.cc). u4 panels have integer kernels only: 16-bit
                               // activations, or 8-bit ones from kS8MinRows rows on with vnni = 2
  int num_threads = 1;
};

// y [M, n] = x [M, K] @ W (+ bias [n], or none when bias has no elements), W packed as linear.cc
// describes. x float32 on the CPU; raises (PD_CHECK) on anything else.
paddle::Tensor Forward(const paddle::Tensor& x, const paddle::Tensor& packed_w, const paddle::Tensor& bias,
                       const LinearArgs& args);

}  // namespace fd_linear
