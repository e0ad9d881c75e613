// Storing a step's new keys and values into the block-major KV cache in one pass: each token's K and V head
// vectors are copied from the projection's output (strided views) to the rows `write_index` names, which
// replaces a stack, a transpose, a reshape and an index_copy_ (four torch ops and a temporary) per layer.
#include "attention_ops.h"

#include <cstdint>
#include <cstring>

// kv_rows [rows, block_size * D] (contiguous), write_index [2 * kvh * T] int64 in (K/V, head, token) order,
// k and v [T, kvh, D] with contiguous head vectors, of kv_rows' dtype.
void store_kv(at::Tensor kv_rows, at::Tensor write_index, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(kv_rows.is_contiguous(), "store_kv: kv_rows must be contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
              k.stride(1) == k.size(2) && v.stride(1) == v.size(2), "store_kv: k, v [T, kvh, D], heads contiguous");
  TORCH_CHECK(k.scalar_type() == kv_rows.scalar_type() && v.scalar_type() == kv_rows.scalar_type(),
              "store_kv: k, v must have the cache's dtype");
  const int64_t T = k.size(0), kvh = k.size(1), D = k.size(2);
  TORCH_CHECK(write_index.scalar_type() == at::kLong && write_index.is_contiguous() &&
              write_index.numel() == 2 * kvh * T, "store_kv: write_index must be int64 [2 * kvh * T]");
  const int64_t vectors = kv_rows.numel() / D, bytes = D * kv_rows.element_size();
  const int64_t* index = write_index.data_ptr<int64_t>();
  char* dst = static_cast<char*>(kv_rows.data_ptr());
  const char* src[2] = {static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr())};
  const int64_t token_stride[2] = {k.stride(0) * k.element_size(), v.stride(0) * v.element_size()};
  at::parallel_for(0, 2 * kvh * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t which = i / (kvh * T), head = (i / T) % kvh, t = i % T, row = index[i];
      TORCH_CHECK(row >= 0 && row < vectors, "store_kv: write_index out of the cache");
      std::memcpy(dst + row * bytes, src[which] + t * token_stride[which] + head * bytes, bytes);
    }
  });
}
