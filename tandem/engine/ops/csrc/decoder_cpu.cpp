// Every decoder layer of a decode-only step in one native call: the Llama layer (RMSNorm, fused q/k/v projection,
// Qwen3's per-head q/k norms, RoPE, KV store, paged attention, output projection, residual add + RMSNorm, gated
// MLP, residual add), once per layer, without returning to Python between kernels.
//
// The kernels are the ones the Python layers call (this extension's norms, RoPE, activation and linear; the
// attention extension's store_kv and paged_attention through function pointers, see decode_kernels.h), in the same
// order on the same tensors, so the hidden states are bit-identical to the Python path's. What goes is the Python
// between them: at one decode a step spent ~2-3 ms there (module calls, views, checks), a sixth of it.
//
// What the stack adds: each layer's MLP prefetches the next layer's KV rows into the cores that will attend them
// (LinePrefetch, linear_cpu.cpp). At 32 decodes a layer's attention reads ~4.7 MB of KV spread over 12 KiB spans;
// from memory it waits on them (30 layers: ~10 ms, ~4.8 with the rows in cache), while the MLP's products are
// mostly compute. With timers around the two (since removed), alternating in one process: attention 10.5 -> 7.3 ms
// a step, the MLP 14.4 -> 16.0 (its weights now share the memory's bandwidth with the KV). Whole decode steps
// (benchmarks/kv_prefetch_ab.py): 39.2 -> 38.2 ms at 32 x (128 + 128) tokens, level at 32 x (512 + 64).
#include "decoder_cpu.h"

#include <ATen/TensorOperators.h>

#include <algorithm>
#include <vector>

#include "fused_ops.h"

namespace {

// How much of the next layer's KV each thread prefetches (its first rows, which its attention reads first). Without a
// bound, at 32 x 576-token contexts (6.7 MB a thread per layer) decode steps were 4% slower with the prefetch than
// without: the lines were evicted before use and the MLP's weights lost bandwidth to them.
constexpr int64_t kPrefetchBytesPerThread = int64_t(3) << 20;

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
    TORCH_CHECK(w[5]->dim() == 4 && w[5]->size(0) * w[5]->size(2) == 2 * intermediate,
                "DecoderStack: gate_up must be packed by pack_gated_weight for the intermediate size");
    layers_.push_back({*w[0], *w[1], *w[3], *w[4], *w[5], *w[6], w[2], w[7], w[8]});
  }
  // NOTE: on AMX the MLP's products take a fraction of the AVX-512 path's time, too little to hide the KV's lines
  // behind: with the prefetch, decode steps at 32 x (128 + 128) took 38.4 ms, 33.1 without (kv_prefetch_ab.py).
  kv_prefetch_ = !linear_amx();
}

at::Tensor DecoderStack::forward(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor kv_rows,
                                 at::Tensor write_index, at::Tensor gather_rows, at::Tensor mask) {
  const int64_t B = h.size(0), layers = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(h.dim() == 2 && h.size(1) == hidden_ && h.is_contiguous(), "DecoderStack: h must be [B, hidden]");
  TORCH_CHECK(write_index.dim() == 2 && write_index.size(0) == layers && write_index.is_contiguous() &&
              gather_rows.dim() == 2 && gather_rows.size(0) == layers && gather_rows.is_contiguous(),
              "DecoderStack: write_index and gather_rows must be contiguous [layers, ...]");
  const int64_t q_size = H_ * D_, kv_size = kvh_ * D_;
  // The next layer's KV rows in the order its attention reads them: by sequence (a sequence's KV heads are one work
  // item of paged_attention, whose items thread t takes in the range [B t / T, B (t + 1) / T)), then block, then
  // K/V and head (one contiguous span per block and layer, see core/kv_layout.py). Only blocks holding keys the
  // mask lets the sequence attend.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), B);
  const bool prefetch = kv_prefetch_ && threads > 1 && layers > 1;
  const int64_t row_elems = kv_rows.size(1), bs = row_elems / D_, kv_rows_per_block = 2 * kvh_;
  const int64_t nb = gather_rows.size(1) / (kv_rows_per_block * B), L = nb * bs;
  const int64_t row_bytes = row_elems * kv_rows.element_size(), row_lines = row_bytes / 64;
  std::vector<int64_t> used_blocks(B, 0), bounds(threads + 1, 0), budget_lines;
  std::vector<const char*> rows;
  if (prefetch) {
    TORCH_CHECK(mask.numel() == B * L, "DecoderStack: mask must be [B, 1, blocks * block_size]");
    const bool* m = mask.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t end = L;
      while (end > 0 && !m[b * L + end - 1]) --end;
      used_blocks[b] = (end + bs - 1) / bs;
    }
    const int64_t budget = kPrefetchBytesPerThread / 64;
    for (int64_t t = 1; t <= threads; ++t) {
      bounds[t] = bounds[t - 1];
      for (int64_t b = B * (t - 1) / threads; b < B * t / threads; ++b)
        bounds[t] += used_blocks[b] * kv_rows_per_block * row_lines;
    }
    budget_lines.assign(threads, 0);
    for (int64_t t = 0; t < threads; ++t) budget_lines[t] = std::min(budget, bounds[t + 1] - bounds[t]);
    rows.reserve(bounds[threads] / std::max<int64_t>(row_lines, 1));
  }
  const char* kv_base = static_cast<const char*>(kv_rows.data_ptr());
  auto plan = [&](int64_t layer) {
    rows.clear();
    const int64_t* r = gather_rows[layer].data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < used_blocks[b]; ++blk)
        for (int64_t kh = 0; kh < kv_rows_per_block; ++kh)
          rows.push_back(kv_base + r[(kh * B + b) * nb + blk] * row_bytes);
  };
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
    const bool ahead = prefetch && l + 1 < layers && row_lines > 0;
    if (ahead) plan(l + 1);
    // gate_up (packed by pack_gated_weight) has twice the down product's inner-loop steps: two thirds of the lines.
    const LinePrefetch up{rows.data(), row_lines, bounds.data(), budget_lines.data(), threads, 0.0, 2.0 / 3};
    const LinePrefetch down{rows.data(), row_lines, bounds.data(), budget_lines.data(), threads, 2.0 / 3, 1.0};
    h.add_(packed_linear(packed_linear_silu_mul(x, w.gate_up, inter_, ahead ? &up : nullptr), w.down, hidden_,
                         std::nullopt, ahead ? &down : nullptr));
  }
  return h;
}
