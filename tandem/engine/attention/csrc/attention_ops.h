// The paged-attention extension's kernels as its binding file (bind_attention.cpp) exposes them.
#pragma once

#include <cstdint>

#include "tensor_api.h"

// paged_attention_cpu.cpp: decodes, verify chunks and short chunks over block-major KV rows.
at::Tensor paged_attention(at::Tensor q, at::Tensor kv_rows, at::Tensor rows, at::Tensor mask, double scale,
                           bool has_cap, double cap, int64_t num_kv_heads);

// prefill_attention_cpu.cpp: many-query chunks in bf16.
bool bf16_prefill_available();
// Whether those chunks are attended on AMX tiles: on by default where the CPU has them; switched only by tests and
// benchmarks (the tile unit sums in its own order).
bool attention_amx();
void set_attention_amx(bool on);
at::Tensor prefill_attention_dense(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor starts, at::Tensor lens,
                                   double scale, int64_t window, bool has_cap, double cap);
void prefill_attention_dense_into(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor starts, at::Tensor lens,
                                  double scale, int64_t window, bool has_cap, double cap, at::Tensor out);
at::Tensor prefill_attention_paged(at::Tensor q, at::Tensor kv_rows, at::Tensor rows, int64_t kv_start,
                                   int64_t ctx_len, double scale, int64_t window, bool has_cap, double cap,
                                   int64_t num_kv_heads);

// kv_store_cpu.cpp
void store_kv(at::Tensor kv_rows, at::Tensor write_index, at::Tensor k, at::Tensor v);
