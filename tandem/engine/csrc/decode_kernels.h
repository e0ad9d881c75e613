// The attention extension's decode kernels as plain function pointers, handed to the ops extension's decoder stack
// (ops/csrc/decoder_cpu.cpp) in a capsule: the two extensions are separate shared objects, and the stack calls
// attention once per layer without going back through Python or the dispatcher.
#pragma once

#include "tensor_api.h"

#include <cstdint>

struct DecodeAttentionKernels {
  // store_kv(kv_rows, write_index, k, v): see attention/csrc/kv_store_cpu.cpp.
  void (*store_kv)(at::Tensor, at::Tensor, at::Tensor, at::Tensor);
  // paged_attention(q, kv_rows, rows, mask, scale, has_cap, cap, num_kv_heads): see paged_attention_cpu.cpp.
  at::Tensor (*paged_attention)(at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, bool, double,
                                int64_t);
};

// The capsule's name: PyCapsule_GetPointer checks it, so a capsule of anything else is refused.
inline constexpr const char* kDecodeAttentionKernelsCapsule = "tandem.decode_attention_kernels";
