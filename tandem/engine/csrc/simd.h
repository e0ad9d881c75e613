// AVX-512 helpers the CPU kernels share: 16 fp32 lanes loaded from / stored to fp32 or bf16, rounding to bf16, exp.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

namespace tandem_simd {

// 16 bf16 values (their bits) as fp32 lanes, exactly: bf16 is the top half of fp32.
inline __m512 widen16(__m256i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)); }

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// fp32 bits rounded to nearest even at bf16's precision (as c10::BFloat16's conversion; NaNs are not expected).
inline __m512i round_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
}

// fp32 lanes rounded to bf16 (nearest even), as 16 bf16 bit patterns.
inline __m256i bf16_bits16(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bits(v), 16)); }

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits16(v));
}

// v rounded to the precision of the dtype `tag` points to, kept in fp32 lanes.
inline __m512 round_to(__m512 v, const float*) { return v; }
inline __m512 round_to(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_and_si512(round_bits(v), _mm512_set1_epi32(int32_t(0xffff0000u))));
}

// exp for fp32 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (relative error ~2e-7);
// inputs below -87.3 give ~0, not denormals.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lane k of the result is the sum (max16: the maximum) of the lanes of v[k]: one transpose-and-add tree for 16
// vectors, 15 adds and 30 shuffles where 16 horizontal reductions take ~130 instructions.
template <bool MAX>
inline __m512 reduce16(const __m512* v) {
  auto op = [](__m512 x, __m512 y) { return MAX ? _mm512_max_ps(x, y) : _mm512_add_ps(x, y); };
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = op(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
              _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return op(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
            _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
inline __m512 sum16(const __m512* v) { return reduce16<false>(v); }
inline __m512 max16(const __m512* v) { return reduce16<true>(v); }

// 2^x for fp32 lanes x <= 0, for softmax probabilities that are rounded to bf16 before they are used: 2^n * p(r),
// r = x - n in [-1/2, 1/2], degree-5 polynomial (relative error ~3e-6, a thousandth of bf16's rounding step);
// inputs below -126 give ~0, not denormals. 10 instructions to exp_ps's 13 (plus the caller's scale and subtract,
// which fold into one fmsub in base 2).
inline __m512 exp2_softmax_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3333558146428443e-3f);                 // ln2^5 / 5!
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2!
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(gate) * up for the dtype `tag` points to, as `F.silu(gate) * up` rounds: the activation rounded to the dtype
// before the product (the caller rounds the product when it stores it). silu(x) = x / (1 + exp(-x)). Shared by
// silu_mul (fused_cpu.cpp) and the gated product's store (linear_cpu.cpp), which must agree bit for bit.
template <typename T>
inline __m512 silu_mul16(__m512 gate, __m512 up, const T* tag) {
  const __m512 act = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(),
                                                                                                gate))));
  return _mm512_mul_ps(round_to(act, tag), up);
}

}  // namespace tandem_simd
