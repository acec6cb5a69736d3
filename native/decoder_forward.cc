// fd_decoder_forward: every decoder layer of a Llama-family model in one Paddle custom op.
//
// A Paddle custom-op call costs tens of microseconds of dispatch whatever the work, and a layer
// run op by op is ~10 custom ops plus reshapes: at decode batch 1 that overhead is most of the
// step (30 layers x ~20 dispatches). Here the layers are chained in C++ with the same kernels the
// per-op path uses (linear.cc, norm.cc, rotary_kv.cc, paged_attention.cc), so the arithmetic is
// identical and only the dispatch goes away.
//
//   inputs  hidden [T, H] (embeddings), positions [T] int64, cos/sin [max_pos, D/2],
//           slot_mapping [T] int64, block_tables [S, B] / context_lens [S] / query_start_loc [S+1] int32,
//           per layer (lists of L tensors): input_norm [H], post_norm [H], qkv packed + bias ([0] = none),
//           o / gate_up / down packed, key_cache / value_cache (written in place)
//   attrs   num_heads, num_kv_heads, interleaved rotary, eps, scale, and per linear kind
//           [n, format, group, bf16_dot_min_rows, vnni] (linear.h), num_threads
//   outputs (h, residual): the last MLP output and the residual stream before it (their sum is the
//           final hidden state; the model's final norm adds them).

#include <cstdint>
#include <vector>

#include "attention.h"
#include "linear.h"
#include "norm.h"
#include "paddle/extension.h"

namespace {

fd_linear::LinearArgs ArgsFrom(const std::vector<int64_t>& v, int num_threads, const char* name) {
  PD_CHECK(v.size() == 5, name, " must be [n, format, group, bf16_dot_min_rows, vnni]");
  return {v[0], static_cast<int>(v[1]), static_cast<int>(v[2]), static_cast<int>(v[3]), static_cast<int>(v[4]),
          num_threads};
}

struct LayerArgs {
  fd_linear::LinearArgs qkv, o, gate_up, down;
  int num_heads, num_kv_heads, num_threads;
  bool interleaved;
  float eps, scale;
};

struct Batch {
  const paddle::Tensor& positions;
  const paddle::Tensor& cos;
  const paddle::Tensor& sin;
  const paddle::Tensor& slot_mapping;
  const paddle::Tensor& block_tables;
  const paddle::Tensor& context_lens;
  const paddle::Tensor& query_start_loc;
};

// attention sublayer: qkv projection, rotary + cache write, paged attention, output projection
paddle::Tensor Attention(const paddle::Tensor& x, const paddle::Tensor& qkv_w, const paddle::Tensor& qkv_b,
                         const paddle::Tensor& o_w, paddle::Tensor& key_cache, paddle::Tensor& value_cache,
                         const Batch& b, const LayerArgs& a, const paddle::Tensor& no_bias) {
  const paddle::Tensor qkv = fd_linear::Forward(x, qkv_w, qkv_b, a.qkv);
  const paddle::Tensor q = fd_attention::RotaryKV(qkv, b.positions, b.cos, b.sin, key_cache, value_cache,
                                                  b.slot_mapping, a.num_heads, a.num_kv_heads, a.interleaved,
                                                  a.num_threads);
  paddle::Tensor out = fd_attention::PagedAttention(q, key_cache, value_cache, b.block_tables, b.context_lens,
                                                    b.query_start_loc, a.scale, 0, a.num_threads);
  // [T, H, D] -> [T, H * D]: the attention output is ours and contiguous, so only its dims change.
  out.reshape({out.shape()[0], out.shape()[1] * out.shape()[2]});
  return fd_linear::Forward(out, o_w, no_bias, a.o);
}

std::vector<paddle::Tensor> DecoderForwardKernel(
    const paddle::Tensor& hidden, const paddle::Tensor& positions, const paddle::Tensor& cos,
    const paddle::Tensor& sin, const paddle::Tensor& slot_mapping, const paddle::Tensor& block_tables,
    const paddle::Tensor& context_lens, const paddle::Tensor& query_start_loc,
    const std::vector<paddle::Tensor>& input_norms, const std::vector<paddle::Tensor>& post_norms,
    const std::vector<paddle::Tensor>& qkv_w, const std::vector<paddle::Tensor>& qkv_b,
    const std::vector<paddle::Tensor>& o_w, const std::vector<paddle::Tensor>& gate_up_w,
    const std::vector<paddle::Tensor>& down_w, const std::vector<paddle::Tensor>& key_caches,
    const std::vector<paddle::Tensor>& value_caches, int num_heads, int num_kv_heads, bool interleaved, float eps,
    float scale, const std::vector<int64_t>& qkv_args, const std::vector<int64_t>& o_args,
    const std::vector<int64_t>& gate_up_args, const std::vector<int64_t>& down_args, int num_threads) {
  const size_t layers = input_norms.size();
  for (const auto* list : {&post_norms, &qkv_w, &qkv_b, &o_w, &gate_up_w, &down_w, &key_caches, &value_caches}) {
    PD_CHECK(list->size() == layers, "fd_decoder_forward: every per-layer list needs ", layers, " tensors");
  }
  PD_CHECK(hidden.is_cpu() && hidden.dtype() == paddle::DataType::FLOAT32 && hidden.shape().size() == 2,
           "hidden must be a float32 CPU tensor [T, H]");
  const LayerArgs a{ArgsFrom(qkv_args, num_threads, "qkv_args"), ArgsFrom(o_args, num_threads, "o_args"),
                    ArgsFrom(gate_up_args, num_threads, "gate_up_args"),
                    ArgsFrom(down_args, num_threads, "down_args"), num_heads, num_kv_heads, num_threads,
                    interleaved, eps, scale};
  const Batch b{positions, cos, sin, slot_mapping, block_tables, context_lens, query_start_loc};
  const paddle::Tensor none = paddle::empty({0}, paddle::DataType::FLOAT32, hidden.place());
  paddle::Tensor h = hidden;
  paddle::Tensor residual = none;
  for (size_t l = 0; l < layers; ++l) {
    // The caches are written in place: the op holds the caller's tensors, not copies.
    paddle::Tensor key_cache = key_caches[l];
    paddle::Tensor value_cache = value_caches[l];
    std::vector<paddle::Tensor> normed = fd_norm::RmsNorm(h, input_norms[l], residual, eps, num_threads);
    residual = residual.numel() > 0 ? normed[1] : h;  // first layer: the residual stream starts as h
    h = Attention(normed[0], qkv_w[l], qkv_b[l], o_w[l], key_cache, value_cache, b, a, none);
    normed = fd_norm::RmsNorm(h, post_norms[l], residual, eps, num_threads);
    residual = normed[1];
    const paddle::Tensor gate_up = fd_linear::Forward(normed[0], gate_up_w[l], none, a.gate_up);
    h = fd_linear::Forward(fd_norm::SiluMul(gate_up, num_threads), down_w[l], none, a.down);
  }
  return {h, residual};
}

std::vector<std::vector<int64_t>> DecoderForwardInferShape(
    const std::vector<int64_t>& hidden_shape, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<std::vector<int64_t>>&,
    const std::vector<std::vector<int64_t>>&, const std::vector<std::vector<int64_t>>&,
    const std::vector<std::vector<int64_t>>&, const std::vector<std::vector<int64_t>>&,
    const std::vector<std::vector<int64_t>>&, const std::vector<std::vector<int64_t>>&,
    const std::vector<std::vector<int64_t>>&, const std::vector<std::vector<int64_t>>&, const int&, const int&,
    const bool&, const float&, const float&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const int&) {
  return {hidden_shape, hidden_shape};
}

std::vector<paddle::DataType> DecoderForwardInferDtype(
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const std::vector<paddle::DataType>&, const std::vector<paddle::DataType>&, const std::vector<paddle::DataType>&,
    const std::vector<paddle::DataType>&, const std::vector<paddle::DataType>&, const std::vector<paddle::DataType>&,
    const std::vector<paddle::DataType>&, const std::vector<paddle::DataType>&,
    const std::vector<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

}  // namespace

PD_BUILD_OP(fd_decoder_forward)
    .Inputs({"Hidden", "Positions", "Cos", "Sin", "SlotMapping", "BlockTables", "ContextLens", "QueryStartLoc",
             paddle::Vec("InputNorms"), paddle::Vec("PostNorms"), paddle::Vec("QKVW"), paddle::Vec("QKVB"),
             paddle::Vec("OW"), paddle::Vec("GateUpW"), paddle::Vec("DownW"), paddle::Vec("KeyCaches"),
             paddle::Vec("ValueCaches")})
    .Outputs({"Out", "Residual"})
    .Attrs({"num_heads: int", "num_kv_heads: int", "interleaved: bool", "eps: float", "scale: float",
            "qkv_args: std::vector<int64_t>", "o_args: std::vector<int64_t>", "gate_up_args: std::vector<int64_t>",
            "down_args: std::vector<int64_t>", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(DecoderForwardKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(DecoderForwardInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DecoderForwardInferDtype));
