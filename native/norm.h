// RMSNorm and the SiLU gate of norm.cc as C++ entry points for other ops of the extension
// (decoder_forward.cc chains a whole model in one op).
#pragma once

#include <vector>

#include "paddle/extension.h"

namespace fd_norm {

// (out, residual_out): see fd_rms_norm in norm.cc. residual may be empty ([0]) for "none".
std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight,
                                    const paddle::Tensor& residual, float eps, int num_threads);

// silu(x[:, :I]) * x[:, I:] for x [M, 2I].
paddle::Tensor SiluMul(const paddle::Tensor& x, int num_threads);

}  // namespace fd_norm
