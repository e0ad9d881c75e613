// Every decoder layer of a decode-only step in one native call: the Llama layer (RMSNorm, fused q/k/v projection,
// Qwen3's per-head q/k norms, RoPE, KV store, paged attention, output projection, residual add + RMSNorm, gated
// MLP, residual add), once per layer, without returning to Python between kernels.
//
// The kernels are the ones the Python layers call (this extension's norms, RoPE, activation and linear; the
// attention extension's store_kv and paged_attention through function pointers, see decode_kernels.h), in the same
// order on the same tensors, so the hidden states are bit-identical to the Python path's. What goes is the Python
// between them: at one decode a step spent ~2-3 ms there (module calls, views, checks), a sixth of it.
#include "decoder_cpu.h"

#include <ATen/TensorOperators.h>

#include "fused_ops.h"

namespace {

// The q/k norm as `RMSNorm.forward` (models/common.py) computes it on a head view, so the result is the Python
// layer's bit for bit: the fused kernel when the view is contiguous (one sequence), else the module's torch ops
// (fp32, rsqrt of the mean square plus eps, rounded to the dtype, times the weight) through the same ATen calls.
at::Tensor head_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.is_contiguous() && x.size(-1) % 16 == 0) return rms_norm(x, std::nullopt, weight, eps);
  auto x32 = x.to(at::kFloat);
  x32 = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps);
  return weight * x32.to(x.scalar_type());
}

}  // namespace

DecoderStack::DecoderStack(std::vector<std::vector<std::optional<at::Tensor>>> layers, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate, double eps,
                           double scale, const DecodeAttentionKernels& attention)
    : H_(num_heads), kvh_(num_kv_heads), D_(head_dim), hidden_(hidden), inter_(intermediate), eps_(eps),
      scale_(scale), attention_(attention) {
  for (auto& w : layers) {
    TORCH_CHECK(w.size() == 9, "DecoderStack: each layer is (input_norm, qkv, qkv_bias, o, post_norm, gate_up, down, "
                               "q_norm, k_norm)");
    for (size_t i = 0; i < 7; ++i) {
      TORCH_CHECK(i == 2 || w[i].has_value(), "DecoderStack: only the q/k/v bias and the q/k norms may be None");
    }
    TORCH_CHECK(w[7].has_value() == w[8].has_value(), "DecoderStack: q_norm and k_norm come together");
    layers_.push_back({*w[0], *w[1], *w[3], *w[4], *w[5], *w[6], w[2], w[7], w[8]});
  }
}

at::Tensor DecoderStack::forward(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor kv_rows,
                                 at::Tensor write_index, at::Tensor gather_rows, at::Tensor mask) {
  const int64_t B = h.size(0), layers = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(h.dim() == 2 && h.size(1) == hidden_ && h.is_contiguous(), "DecoderStack: h must be [B, hidden]");
  TORCH_CHECK(write_index.dim() == 2 && write_index.size(0) == layers && write_index.is_contiguous() &&
              gather_rows.dim() == 2 && gather_rows.size(0) == layers && gather_rows.is_contiguous(),
              "DecoderStack: write_index and gather_rows must be contiguous [layers, ...]");
  const int64_t q_size = H_ * D_, kv_size = kvh_ * D_;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerWeights& w = layers_[l];
    auto qkv = packed_linear(rms_norm(h, std::nullopt, w.input_norm, eps_), w.qkv, q_size + 2 * kv_size, w.qkv_bias);
    auto q = qkv.narrow(1, 0, q_size).view({B, H_, D_});
    auto k = qkv.narrow(1, q_size, kv_size).view({B, kvh_, D_});
    auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({B, kvh_, D_});
    if (w.q_norm) {
      q = head_rms_norm(q, *w.q_norm, eps_);
      k = head_rms_norm(k, *w.k_norm, eps_);
    }
    rope_(q, k, cos, sin);
    attention_.store_kv(kv_rows, write_index[l], k, v);
    auto o = attention_.paged_attention(q.contiguous().view({B, 1, H_, D_}), kv_rows, gather_rows[l], mask, scale_,
                                        false, 0.0, kvh_);
    auto x = rms_norm(packed_linear(o.view({B, q_size}), w.o, hidden_, std::nullopt), h, w.post_norm, eps_);
    h.add_(packed_linear(silu_mul(packed_linear(x, w.gate_up, 2 * inter_, std::nullopt)), w.down, hidden_,
                         std::nullopt));
  }
  return h;
}
