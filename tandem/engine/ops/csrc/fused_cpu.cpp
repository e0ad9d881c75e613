// Fused elementwise operators for the CPU decoder layer: each replaces a chain of small torch ops (8 for an
// RMSNorm, 9 per RoPE application, 3 for the gated activation) with one pass over the data, in fp32 registers.
// A 135M model's decode step otherwise spends as long dispatching these as computing them, and a prefill step
// streams its activations through memory once per op.
//
// Rounding follows the torch modules they replace where it is observable: RMSNorm normalises in fp32, rounds to
// the activation dtype, then multiplies by the weight (Llama's `weight * x.to(dtype)`), rounding again.
#include "fused_ops.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "simd.h"

namespace {

using bf16 = c10::BFloat16;
using namespace tandem_simd;

// out[r] = w * round(x[r] * rsqrt(mean(x[r]^2) + eps)); with `residual`: residual[r] += x[r] first (rounded to the
// dtype, as `h + x` is) and the sum is normalised.
template <typename T>
void rms_rows(T* x, T* residual, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * n;
      T* src = xr;
      if (residual != nullptr) {
        T* hr = residual + r * n;
        for (int64_t i = 0; i < n; i += 16)
          store16(hr + i, _mm512_add_ps(load16(hr + i), load16(xr + i)));
        src = hr;
      }
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = load16(src + i);
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(n) + eps));
      T* o = out + r * n;
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 normed = round_to(_mm512_mul_ps(load16(src + i), inv), src);
        store16(o + i, _mm512_mul_ps(load16(w + i), normed));
      }
    }
  });
}

}  // namespace

// RMSNorm over the last dimension (a multiple of 16) of a contiguous x; `residual` (may be undefined): add x into it
// first and normalise the sum, in place. Returns the normalised rows.
at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> residual, at::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: expected contiguous x and weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: weight dtype differs from x's");
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(n % 16 == 0 && weight.numel() == n, "rms_norm: last dimension a multiple of 16, weight of its size");
  if (residual) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                residual->scalar_type() == x.scalar_type(), "rms_norm: residual must match x");
  }
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) {
    rms_rows<bf16>(x.data_ptr<bf16>(), residual ? residual->data_ptr<bf16>() : nullptr, weight.data_ptr<bf16>(),
                   out.data_ptr<bf16>(), rows, n, float(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rms_norm: bf16 or fp32 only");
    rms_rows<float>(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr, weight.data_ptr<float>(),
                    out.data_ptr<float>(), rows, n, float(eps));
  }
  return out;
}

// Rotate-half RoPE in place on q [T, Hq, D] and k [T, Hk, D] (rows may be strided, each head contiguous) with cos,
// sin [T, D/2] (fp32): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
template <typename T>
void rope_heads(T* x, int64_t T_, int64_t heads, int64_t D, int64_t token_stride, int64_t head_stride,
                const float* cos, const float* sin) {
  const int64_t half = D / 2;
  at::parallel_for(0, T_, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* p = x + t * token_stride + h * head_stride;
        for (int64_t i = 0; i < half; i += 16) {
          const __m512 x1 = load16(p + i), x2 = load16(p + half + i), cv = load16(c + i), sv = load16(s + i);
          store16(p + i, _mm512_fmsub_ps(x1, cv, _mm512_mul_ps(x2, sv)));
          store16(p + half + i, _mm512_fmadd_ps(x2, cv, _mm512_mul_ps(x1, sv)));
        }
      }
    }
  });
}

void rope_(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rope: expected q [T, Hq, D] and k [T, Hk, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.stride(1) == q.size(2) && k.stride(1) == k.size(2),
              "rope: each token's heads must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rope: q and k dtypes differ");
  const int64_t T_ = q.size(0), D = q.size(2);
  TORCH_CHECK(D % 32 == 0, "rope: head_dim must be a multiple of 32");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == T_ * D / 2 && sin.numel() == T_ * D / 2,
              "rope: cos, sin: contiguous fp32 [T, D/2]");
  if (q.scalar_type() == at::kBFloat16) {
    rope_heads<bf16>(q.data_ptr<bf16>(), T_, q.size(1), D, q.stride(0), D, cos.data_ptr<float>(), sin.data_ptr<float>());
    rope_heads<bf16>(k.data_ptr<bf16>(), T_, k.size(1), D, k.stride(0), D, cos.data_ptr<float>(), sin.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "rope: bf16 or fp32 only");
    rope_heads<float>(q.data_ptr<float>(), T_, q.size(1), D, q.stride(0), D, cos.data_ptr<float>(), sin.data_ptr<float>());
    rope_heads<float>(k.data_ptr<float>(), T_, k.size(1), D, k.stride(0), D, cos.data_ptr<float>(), sin.data_ptr<float>());
  }
}

// silu(gate) * up for gate_up [T, 2I] (gate first): the activation rounded to the dtype before the product, as
// `F.silu(gate) * up` rounds.
template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; i += 16) store16(o + i, silu_mul16(load16(g + i), load16(u + i), g));
    }
  });
}

at::Tensor silu_mul(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 32 == 0, "silu_mul: expected contiguous [T, 2I], I % 16 == 0");
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  auto out = at::empty({rows, inter}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    silu_mul_rows<bf16>(x.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, inter);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "silu_mul: bf16 or fp32 only");
    silu_mul_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  }
  return out;
}

// Greedy sampling: the index of each row's largest value, as torch.argmax picks it (the first of equal maxima; the
// first NaN where a row has one). torch's fp32 argmax took 1.3 ms for 32 rows of a 49,152-token vocabulary here
// (two threads), as long as the LM head's own arithmetic for one row; this is one vectorised pass over the rows.
// bf16 rows (the LM head's own output) are widened in registers: their fp32 copy (6 MB at 32 rows) is not made.
namespace {

inline __m512 load_row16(const float* p, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, p); }
inline __m512 load_row16(const bf16* p, __mmask16 valid) {
  return widen16(_mm256_maskz_loadu_epi16(valid, p));
}

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i best_at = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());  // no lane has a value yet
  __mmask16 unordered = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = load_row16(x + i, valid);
    const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(i)));
    unordered |= _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
    // A lane takes a value strictly greater than its best, or its first value at all (so -inf rows still answer).
    const __mmask16 take = _mm512_mask_cmp_ps_mask(valid, v, best, _CMP_GT_OQ) |
                           (_mm512_cmpeq_epi32_mask(best_at, _mm512_set1_epi32(std::numeric_limits<int32_t>::max())) &
                            valid & ~_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    best = _mm512_mask_mov_ps(best, take, v);
    best_at = _mm512_mask_mov_epi32(best_at, take, at);
  }
  if (unordered) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(static_cast<float>(x[i]))) return i;
  }
  const float m = _mm512_reduce_max_ps(best);
  const __mmask16 at_max = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(at_max, best_at);
}

template <typename T>
void argmax_rows_of(const T* x, int64_t row_stride, int64_t rows, int64_t n, int64_t* out) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = argmax_row(x + r * row_stride, n);
  });
}

}  // namespace

// x [B, N] fp32 or bf16 with unit column stride (rows may be a slice of wider ones: the vocabulary of a padded LM
// head). Returns [B] int64.
at::Tensor argmax_rows(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1) && (x.size(0) <= 1 || x.stride(0) >= x.size(1)) &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.size(1) > 0 &&
              x.size(1) < std::numeric_limits<int32_t>::max(),
              "argmax_rows: expected fp32 or bf16 [B, N] rows (unit column stride), N >= 1");
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat) {
    argmax_rows_of(x.data_ptr<float>(), x.stride(0), rows, n, out.data_ptr<int64_t>());
  } else {
    argmax_rows_of(x.data_ptr<bf16>(), x.stride(0), rows, n, out.data_ptr<int64_t>());
  }
  return out;
}
