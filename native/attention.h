// The attention-side kernels (rotary_kv.cc, paged_attention.cc) as C++ entry points for other ops of
// the extension (decoder_forward.cc chains a whole model in one op).
#pragma once

#include "paddle/extension.h"

namespace fd_attention {

// Rotates q and k of qkv [T, (H + 2 * Hkv) * D] at `positions`, writes k and v into the caches at
// `slot_mapping` and returns the rotated q [T, H, D]; see fd_rotary_kv in rotary_kv.cc.
paddle::Tensor RotaryKV(const paddle::Tensor& qkv, const paddle::Tensor& positions, const paddle::Tensor& cos,
                        const paddle::Tensor& sin, paddle::Tensor& key_cache, paddle::Tensor& value_cache,
                        const paddle::Tensor& slot_mapping, int num_heads, int num_kv_heads, bool interleaved,
                        int num_threads);

// out [T, H, D]: see fd_paged_attention in paged_attention.cc (impl 0 = best available).
paddle::Tensor PagedAttention(const paddle::Tensor& query, const paddle::Tensor& key_cache,
                              const paddle::Tensor& value_cache, const paddle::Tensor& block_tables,
                              const paddle::Tensor& context_lens, const paddle::Tensor& query_start_loc,
                              float scale, int impl, int num_threads);

}  // namespace fd_attention
