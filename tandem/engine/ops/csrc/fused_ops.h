// The fused-ops extension's kernels (fused_cpu.cpp, linear_cpu.cpp), as the binding file and the decoder stack
// call them.
#pragma once

#include <cstdint>
#include <optional>

#include "tensor_api.h"

// fused_cpu.cpp
at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> residual, at::Tensor weight, double eps);
void rope_(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor x);
at::Tensor argmax_rows(at::Tensor x);

// linear_cpu.cpp
// Memory a product prefetches into L2 while it computes: `spans` of `span_lines` 64-byte lines each, of which thread
// t of the next kernel will read lines bounds[t] to bounds[t + 1] (counting through the spans in order). The work
// items in thread t's range of the product prefetch the fraction [from, to) of the first lines[t] of thread t's
// lines, so that each line lands in the cache of the core that will read it. Used by the decoder stack
// (decoder_cpu.cpp) for the next layer's KV rows.
struct LinePrefetch {
  const char* const* spans = nullptr;
  int64_t span_lines = 0;
  const int64_t* bounds = nullptr;  // [threads + 1]
  const int64_t* lines = nullptr;   // [threads]: how many of thread t's lines, from its first, to prefetch
  int64_t threads = 0;
  double from = 0, to = 1;
};
at::Tensor pack_linear_weight(at::Tensor weight);
// Whether products of 4 or more rows run on the AMX tile unit (Intel Sapphire Rapids and later, when Linux grants
// the tile state); on by default where available. Switching it changes the products' last bits (the tile unit sums
// in its own order): only benchmarks and tests switch it, between steps.
bool linear_amx_available();
bool linear_amx();
void set_linear_amx(bool on);
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, int64_t n, std::optional<at::Tensor> bias,
                         const LinePrefetch* prefetch = nullptr);
at::Tensor pack_gated_weight(at::Tensor weight);
at::Tensor packed_linear_silu_mul(at::Tensor x, at::Tensor packed, int64_t inter,
                                  const LinePrefetch* prefetch = nullptr);
