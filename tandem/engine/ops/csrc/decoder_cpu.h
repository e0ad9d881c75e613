// The decoder stack (decoder_cpu.cpp): every Llama layer of a decode-only step in one native call. Bound to Python in
// bind_fused.cpp, which hands it the attention extension's kernels from their capsule.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "decode_kernels.h"
#include "tensor_api.h"

class DecoderStack {
 public:
  // layers: per layer (input_norm, qkv, qkv_bias, o, post_norm, gate_up, down, q_norm, k_norm), linears packed by
  // pack_linear_weight, gate_up by pack_gated_weight; only the q/k/v bias and the q/k norms may be None.
  DecoderStack(std::vector<std::vector<std::optional<at::Tensor>>> layers, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, int64_t hidden, int64_t intermediate, double eps, double scale,
               const DecodeAttentionKernels& attention);

  // h [B, hidden] (one token per sequence; updated in place and returned), cos/sin [B, D/2] fp32, kv_rows the
  // cache, write_index [layers, 2 * kvh * B], gather_rows [layers, 2 * kvh * B * blocks], mask [B, 1, L] bool.
  at::Tensor forward(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor kv_rows, at::Tensor write_index,
                     at::Tensor gather_rows, at::Tensor mask);

  // Whether each layer's MLP prefetches the next layer's KV rows (on by default where the products do not run on AMX
  // tiles; switched only to measure it).
  void set_kv_prefetch(bool on) { kv_prefetch_ = on; }
  bool kv_prefetch() const { return kv_prefetch_; }

 private:
  struct LayerWeights {
    at::Tensor input_norm, qkv, o, post_norm, gate_up, down;  // linears packed by pack_linear_weight
    std::optional<at::Tensor> qkv_bias;                       // fp32, padded like the packed qkv (Qwen2)
    std::optional<at::Tensor> q_norm, k_norm;                 // per-head RMSNorm weights (Qwen3)
  };

  std::vector<LayerWeights> layers_;
  int64_t H_, kvh_, D_, hidden_, inter_;
  double eps_, scale_;
  DecodeAttentionKernels attention_{};
  bool kv_prefetch_ = true;
};
