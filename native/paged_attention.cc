// Paged attention over a varlen batch: full prefill, chunked prefill and decode in one op.
//
// Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its q_len queries are the
// last q_len positions of its context, so query j sits at p = context_len - q_len + j and sees
// cache positions 0..p (causal). Query head h reads kv head h / (num_heads / num_kv_heads).
//
// The vector kernels (AVX-512 or AVX2 + FMA, tiles of a GQA group's rows) are in
// attention_tiled.cc; this file has the op, its metadata checks and the portable scalar kernel
// (neither ISA, or a head_dim the vector kernels do not take), which computes one (token, head) row
// at a time with a two-pass softmax. The caches are float32, float16 or int8 rows (kv_types.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention.h"
#include "attention_problem.h"
#include "kv_types.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace {

using fd_paged_attention::Problem;
using fd_paged_attention::ThreadFloats;

// ---------------------------------------------------------------------------------------------
// Scalar path: one (token, head) row at a time.

template <typename T>
void AttendRowScalar(const Problem& p, int64_t seq, int64_t token, int64_t head, int64_t qpos,
                     float* scores) {
  const int64_t d_len = p.head_dim;
  const int64_t kv_head = head / p.group();
  const float* __restrict q = p.query + (token * p.num_heads + head) * d_len;
  float* __restrict o = p.out + (token * p.num_heads + head) * d_len;

  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t pos = 0; pos <= qpos; ++pos) {
    const T* __restrict k = p.Keys<T>() + p.CacheOffset(seq, kv_head, pos);
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < d_len; ++d) dot += q[d] * fd_kv::ToFloat(k[d]);
    scores[pos] = dot * fd_kv::RowStep(k, d_len) * p.scale;
    max_score = std::max(max_score, scores[pos]);
  }
  float sum = 0.f;
  for (int64_t pos = 0; pos <= qpos; ++pos) {
    scores[pos] = std::exp(scores[pos] - max_score);
    sum += scores[pos];
  }
  for (int64_t d = 0; d < d_len; ++d) o[d] = 0.f;
  for (int64_t pos = 0; pos <= qpos; ++pos) {
    const T* __restrict v = p.Values<T>() + p.CacheOffset(seq, kv_head, pos);
    const float w = scores[pos] * fd_kv::RowStep(v, d_len);
#pragma omp simd
    for (int64_t d = 0; d < d_len; ++d) o[d] += w * fd_kv::ToFloat(v[d]);
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < d_len; ++d) o[d] *= inv;
}

void RunScalar(const Problem& p, int64_t max_context, int num_threads) {
  std::vector<int32_t> token_seq(static_cast<size_t>(p.num_tokens));
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    for (int64_t t = p.query_start_loc[s]; t < p.query_start_loc[s + 1]; ++t) token_seq[t] = s;
  }
  const int64_t rows = p.num_tokens * p.num_heads;
  fd_threads::ParallelFor(rows, num_threads, [&](int64_t row) {
    static thread_local ThreadFloats scores;
    const int64_t token = row / p.num_heads;
    const int64_t head = row % p.num_heads;
    const int64_t seq = token_seq[token];
    const int64_t q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
    const int64_t qpos = p.context_lens[seq] - q_len + (token - p.query_start_loc[seq]);
    float* row_scores = scores.Get(static_cast<size_t>(std::max<int64_t>(max_context, 1)));
    fd_kv::Visit(p.cache_type, [&](auto element) {
      AttendRowScalar<decltype(element)>(p, seq, token, head, qpos, row_scores);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry.

paddle::Tensor Contiguous(const paddle::Tensor& x) { return x.is_contiguous() ? x : x.contiguous(); }

// Checks every index the kernels will follow so the parallel section cannot read out of bounds.
int64_t ValidateMetadata(const Problem& p) {
  PD_CHECK(p.query_start_loc[0] == 0, "query_start_loc[0] must be 0");
  PD_CHECK(p.query_start_loc[p.num_seqs] == p.num_tokens,
           "query_start_loc[-1] (", p.query_start_loc[p.num_seqs], ") must equal num_tokens (", p.num_tokens, ")");
  int64_t max_context = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    const int64_t ctx = p.context_lens[s];
    PD_CHECK(q_len >= 0, "query_start_loc must be non-decreasing");
    PD_CHECK(q_len <= ctx, "sequence ", s, " has ", q_len, " queries but context_len ", ctx);
    PD_CHECK(ctx <= p.max_blocks_per_seq * p.block_size, "sequence ", s, " context_len ", ctx,
             " exceeds its block table");
    if (q_len == 0) continue;
    const int64_t used_blocks = (ctx + p.block_size - 1) / p.block_size;
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int64_t block = p.block_tables[s * p.max_blocks_per_seq + b];
      PD_CHECK(block >= 0 && block < p.num_blocks, "sequence ", s, " block table entry ", b, " = ", block,
               " is outside [0, ", p.num_blocks, ")");
    }
    max_context = std::max(max_context, ctx);
  }
  return max_context;
}

std::vector<paddle::Tensor> PagedAttentionKernel(const paddle::Tensor& query, const paddle::Tensor& key_cache,
                                                 const paddle::Tensor& value_cache,
                                                 const paddle::Tensor& block_tables,
                                                 const paddle::Tensor& context_lens,
                                                 const paddle::Tensor& query_start_loc, float scale,
                                                 int impl, int num_threads) {
  for (const paddle::Tensor* t : {&query, &key_cache, &value_cache, &block_tables, &context_lens, &query_start_loc}) {
    PD_CHECK(t->is_cpu(), "paged_attention (native) takes CPU tensors only");
  }
  PD_CHECK(query.dtype() == paddle::DataType::FLOAT32, "query must be float32");
  fd_kv::CacheType cache_type;
  PD_CHECK(key_cache.dtype() == value_cache.dtype() && fd_kv::CacheTypeOf(key_cache.dtype(), &cache_type),
           "the caches must both be float32, both float16 or both int8");
  PD_CHECK(block_tables.dtype() == paddle::DataType::INT32 && context_lens.dtype() == paddle::DataType::INT32 &&
               query_start_loc.dtype() == paddle::DataType::INT32,
           "block_tables, context_lens and query_start_loc must be int32");
  PD_CHECK(query.shape().size() == 3, "query must be [num_tokens, num_heads, head_dim]");
  PD_CHECK(key_cache.shape().size() == 4 && key_cache.shape() == value_cache.shape(),
           "caches must both be [num_blocks, num_kv_heads, block_size, head_dim (+ 4 for int8 rows)]");
  PD_CHECK(block_tables.shape().size() == 2, "block_tables must be [num_seqs, max_blocks_per_seq]");

  const paddle::Tensor q_c = Contiguous(query);
  const paddle::Tensor kc_c = Contiguous(key_cache);
  const paddle::Tensor vc_c = Contiguous(value_cache);
  const paddle::Tensor bt_c = Contiguous(block_tables);
  const paddle::Tensor cl_c = Contiguous(context_lens);
  const paddle::Tensor qsl_c = Contiguous(query_start_loc);

  Problem p;
  p.num_tokens = query.shape()[0];
  p.num_heads = query.shape()[1];
  p.head_dim = query.shape()[2];
  p.num_blocks = key_cache.shape()[0];
  p.num_kv_heads = key_cache.shape()[1];
  p.block_size = key_cache.shape()[2];
  p.num_seqs = block_tables.shape()[0];
  p.max_blocks_per_seq = block_tables.shape()[1];
  p.scale = scale;
  p.cache_type = cache_type;
  p.row_elems = fd_kv::RowElems(cache_type, p.head_dim);
  PD_CHECK(key_cache.shape()[3] == p.row_elems, "cache rows hold ", key_cache.shape()[3], " elements, not the ",
           p.row_elems, " of head_dim ", p.head_dim, " in this cache type");
  PD_CHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0, "num_heads (", p.num_heads,
           ") must be a multiple of num_kv_heads (", p.num_kv_heads, ")");
  PD_CHECK(context_lens.numel() == p.num_seqs, "context_lens must have num_seqs entries");
  PD_CHECK(query_start_loc.numel() == p.num_seqs + 1, "query_start_loc must have num_seqs + 1 entries");

  paddle::Tensor out = paddle::empty({p.num_tokens, p.num_heads, p.head_dim}, paddle::DataType::FLOAT32,
                                     query.place());
  if (p.num_tokens == 0) return {out};

  p.query = q_c.data<float>();
  p.key_cache = kc_c.data();
  p.value_cache = vc_c.data();
  p.block_tables = bt_c.data<int32_t>();
  p.context_lens = cl_c.data<int32_t>();
  p.query_start_loc = qsl_c.data<int32_t>();
  p.out = out.data<float>();
  const int64_t max_context = ValidateMetadata(p);

  // impl: 0 = best available, 1 = scalar (kept reachable so tests cover it on AVX-512 hosts).
  num_threads = std::max(num_threads, 1);
  if (impl != 1 && fd_paged_attention::TiledSupports(p)) {
    fd_paged_attention::RunTiled(p, num_threads);
    return {out};
  }
  RunScalar(p, max_context, num_threads);
  return {out};
}

std::vector<std::vector<int64_t>> PagedAttentionInferShape(const std::vector<int64_t>& query_shape,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&,
                                                           const std::vector<int64_t>&) {
  return {query_shape};
}

std::vector<paddle::DataType> PagedAttentionInferDtype(const paddle::DataType& query_dtype,
                                                       const paddle::DataType&, const paddle::DataType&,
                                                       const paddle::DataType&, const paddle::DataType&,
                                                       const paddle::DataType&) {
  return {query_dtype};
}

}  // namespace

paddle::Tensor fd_attention::PagedAttention(const paddle::Tensor& query, const paddle::Tensor& key_cache,
                                            const paddle::Tensor& value_cache, const paddle::Tensor& block_tables,
                                            const paddle::Tensor& context_lens,
                                            const paddle::Tensor& query_start_loc, float scale, int impl,
                                            int num_threads) {
  return PagedAttentionKernel(query, key_cache, value_cache, block_tables, context_lens, query_start_loc, scale,
                              impl, num_threads)[0];
}

PD_BUILD_OP(fd_paged_attention)
    .Inputs({"Query", "KeyCache", "ValueCache", "BlockTables", "ContextLens", "QueryStartLoc"})
    .Outputs({"Out"})
    .Attrs({"scale: float", "impl: int", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(PagedAttentionKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(PagedAttentionInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PagedAttentionInferDtype));
