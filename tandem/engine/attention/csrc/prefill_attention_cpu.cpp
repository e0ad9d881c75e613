// Prefill attention on the CPU in bf16: many queries per sequence, attended tile by tile with AVX-512 bf16 dot
// products (vdpbf16ps), online softmax in fp32, never a score matrix the size of the context.
//
// Design: one work item per (sequence, KV head, tile of kQTile queries). The query heads that share the KV head are
// the item's rows, so each tile of kKeyTile keys is packed once and used by group * kQTile rows. A key tile is
// packed into the pair-interleaved ("VNNI") layouts vdpbf16ps multiplies: K as [D/2][keys] (a score vector holds
// 16 keys), V as [keys/2][D] (an output vector holds 16 dimensions). Four rows are scored together so that each
// packed K vector loaded feeds four independent accumulations. Items run largest-first under a dynamic schedule
// (causal rows near the end of a prompt see the most keys).
//
// Keys come either from the step's own k/v (a chunk without a cached prefix: `dense`) or from the paged cache
// (a chunk after a cached prefix: `paged`; its own keys were written to the cache before attention runs).
// Masking: a query at position p sees keys at positions in (p - window, p] (window <= 0: no window).
#include "attention_ops.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "amx.h"
#include "simd.h"

#if defined(__AVX512BF16__)
namespace {

using tandem_simd::exp_ps;

constexpr int64_t kKeyTile = 64;  // keys packed together
constexpr int64_t kKeyVecs = kKeyTile / 16;  // score vectors per row
constexpr int64_t kQTile = 64;    // queries per work item
constexpr int64_t kMaxD = 256;
constexpr int64_t kRowBlock = 4;  // query rows scored together
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// Keys of one KV head read from the step's own k or v ([T, kvh, D]): key j of the chunk at base + j * stride.
struct DenseKeys {
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_stride, v_stride;
  const uint16_t* key(int64_t j) const { return k + j * k_stride; }
  const uint16_t* value(int64_t j) const { return v + j * v_stride; }
};

// Keys of one KV head read from the paged cache: key j lies in block j / bs of the head's K (V) rows.
struct PagedKeys {
  const uint16_t* kv;
  const int64_t* krows;
  const int64_t* vrows;
  int64_t bs, D;
  const uint16_t* key(int64_t j) const { return kv + (krows[j / bs] * bs + j % bs) * D; }
  const uint16_t* value(int64_t j) const { return kv + (vrows[j / bs] * bs + j % bs) * D; }
};

struct Tile {
  const uint16_t* q;  // the tile's first query token, at its KV head's first query head
  uint16_t* out;      // the same place in out
  int64_t token_stride;  // elements between consecutive tokens of q
  int64_t out_stride;    // of out
  int64_t n_q, group, D;
  int64_t q_pos0, k_pos0, n_keys;  // position of the first query, of key 0; keys available
  int64_t window;
  float scale, cap;
  bool has_cap;
};

// 16 rows of 16 dwords (row i at rows[i]) transposed into out[j * out_stride + i].
inline void transpose16(const uint32_t* const* rows, uint32_t* out, int64_t out_stride) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows[i]);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4 b + k] now holds, in 128-bit lane l, element 4 l + k of rows 4 b .. 4 b + 3; gather the four groups' lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
  for (int e = 0; e < 16; ++e) _mm512_storeu_si512(out + e * out_stride, r[e]);
}


// Keys [j0, j0 + count) of a tile packed as vdpbf16ps and the tile unit multiply them: K as [D/2][kKeyTile] pairs of
// dimensions (keys past the count zero), V as [keys/2][D] pairs of keys (a missing second key zero).
template <class Keys>
void pack_key_tile(const Keys& keys, int64_t j0, int64_t count, int64_t D, uint32_t* kp, uint32_t* vp) {
  alignas(64) static const uint32_t zero_pairs[kMaxD / 2] = {};
  const int64_t P = D / 2;
  for (int64_t x0 = 0; x0 < kKeyTile; x0 += 16) {
    const uint32_t* kr[16];
    for (int64_t i = 0; i < 16; ++i)
      kr[i] = x0 + i < count ? reinterpret_cast<const uint32_t*>(keys.key(j0 + x0 + i)) : zero_pairs;
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const uint32_t* src[16];
      for (int64_t i = 0; i < 16; ++i) src[i] = kr[i] + p0;
      transpose16(src, kp + p0 * kKeyTile + x0, kKeyTile);
    }
  }
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int64_t jj = 0; jj < (count + 1) / 2; ++jj) {
    const uint16_t* va = keys.value(j0 + 2 * jj);
    const uint16_t* vb = 2 * jj + 1 < count ? keys.value(j0 + 2 * jj + 1) : reinterpret_cast<const uint16_t*>(zero_pairs);
    uint32_t* dst = vp + jj * D;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i a = _mm512_loadu_si512(va + d), b = _mm512_loadu_si512(vb + d);
      _mm512_store_si512(dst + d, _mm512_permutex2var_epi16(a, lo_idx, b));
      _mm512_store_si512(dst + d + 16, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

// The masks of a query row at `qpos` over a key tile (causal, the window, keys past `limit`: the tile's `count` keys
// from position `first_pos`), and whether it sees any key. A row past the tile's last key, with no window and whole
// vectors of keys, sees them all (most rows of a long prompt): no masks to build.
__attribute__((always_inline)) inline bool row_masks(const __m512i* kpos, __m512i limit, int64_t first_pos,
                                                     int64_t count, int64_t qpos, int64_t key_vecs, const Tile& t,
                                                     __mmask16* m) {
  for (int64_t v = 0; v < kKeyVecs; ++v) m[v] = 0;
  if (t.window <= 0 && qpos >= first_pos + count - 1 && count == 16 * key_vecs) {
    for (int64_t v = 0; v < key_vecs; ++v) m[v] = 0xffff;
    return true;
  }
  const __m512i qp = _mm512_set1_epi32(int32_t(qpos));
  __mmask16 any = 0;
  for (int64_t v = 0; v < key_vecs; ++v) {
    m[v] = _mm512_cmple_epi32_mask(kpos[v], qp) & _mm512_cmplt_epi32_mask(kpos[v], limit);
    if (t.window > 0) m[v] &= _mm512_cmpgt_epi32_mask(kpos[v], _mm512_set1_epi32(int32_t(qpos - t.window)));
    any |= m[v];
  }
  return any != 0;
}

// Whether a tile's rows take p in base 2 from their unscaled scores (row_probabilities): no cap, a positive scale.
inline bool base2_rows(const Tile& t) { return !t.has_cap && t.scale > 0.f; }

// The lanes of a row's unscaled scores its masks keep, maximum-reduced to one vector.
__attribute__((always_inline)) inline __m512 row_raw_max(const float* scores, const __mmask16* m, int64_t key_vecs) {
  __m512 vmax = _mm512_set1_ps(kNegInf);
  for (int64_t v = 0; v < key_vecs; ++v) vmax = _mm512_mask_max_ps(vmax, m[v], vmax, _mm512_loadu_ps(scores + 16 * v));
  return vmax;
}

// A row's probabilities p = 2^(s * scale * log2 e - max * log2 e) (one fmsub and exp2_softmax_ps), stored as bf16 in
// `pb_row` (kKeyTile values, zeros past the keys); returns their lane sums.
__attribute__((always_inline)) inline __m512 row_probabilities(const float* scores, const __mmask16* m,
                                                               int64_t key_vecs, float scale, float max,
                                                               uint16_t* pb_row) {
  const __m512 c = _mm512_set1_ps(scale * float(M_LOG2E)), mc = _mm512_set1_ps(max * float(M_LOG2E));
  __m512 pv[kKeyVecs];
  __m512 psum = _mm512_setzero_ps();
  for (int64_t v = 0; v < kKeyVecs; ++v) {
    pv[v] = v < key_vecs ? _mm512_maskz_mov_ps(m[v], tandem_simd::exp2_softmax_ps(
                                                          _mm512_fmsub_ps(_mm512_loadu_ps(scores + 16 * v), c, mc)))
                         : _mm512_setzero_ps();
    psum = _mm512_add_ps(psum, pv[v]);
  }
  for (int64_t v = 0; v < kKeyVecs; v += 2)
    _mm512_storeu_si512(pb_row + 16 * v, (__m512i)_mm512_cvtne2ps_pbh(pv[v + 1], pv[v]));
  return psum;
}

// A row's running max and sum moved on to `new_max` and the tile's probability sum, its accumulator (D values)
// rescaled if the max moved (once a row's maximum settles it rarely moves: most tiles skip the exp).
__attribute__((always_inline)) inline void settle_row(float new_max, float tile_sum, float& run_max, float& run_sum,
                                                      float* acc_row, int64_t D) {
  const float rescale = new_max == run_max ? 1.f : std::exp(run_max - new_max);
  run_sum = run_sum * rescale + tile_sum;
  run_max = new_max;
  if (rescale != 1.f) {
    const __m512 rs = _mm512_set1_ps(rescale);
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(acc_row + d, _mm512_mul_ps(_mm512_loadu_ps(acc_row + d), rs));
  }
}

// One query row's online-softmax step over a packed key tile: its scores (`scores`, key_vecs vectors of 16) scaled,
// capped and masked (row_masks), the row's running max and sum updated, its accumulator `acc_row` (D values) rescaled
// if the max moved, and its probabilities stored as bf16 in `pb_row` (kKeyTile values, zeros past the keys). The
// AVX-512 tile's rows, and the AMX tile's where softmax_rows16 does not apply (a cap).
// NOTE: always_inline: inlined, the row's vectors stay in registers; as a call (GCC stopped inlining it once it grew
// the capped branch) the AMX tile took twice as long.
__attribute__((always_inline)) inline void softmax_row(const float* scores, const __m512i* kpos, __m512i limit,
                                                       int64_t first_pos, int64_t count, int64_t qpos,
                                                       int64_t key_vecs, const Tile& t, float& run_max,
                                                       float& run_sum, float* acc_row, uint16_t* pb_row) {
  __mmask16 m[kKeyVecs];
  if (!row_masks(kpos, limit, first_pos, count, qpos, key_vecs, t, m)) {
    std::fill(pb_row, pb_row + kKeyTile, uint16_t(0));
    return;
  }
  if (base2_rows(t)) {
    const float new_max = std::max(run_max, _mm512_reduce_max_ps(row_raw_max(scores, m, key_vecs)) * t.scale);
    const __m512 psum = row_probabilities(scores, m, key_vecs, t.scale, new_max, pb_row);
    settle_row(new_max, _mm512_reduce_add_ps(psum), run_max, run_sum, acc_row, t.D);
    return;
  }
  alignas(64) float sc[16];
  __m512 sv[kKeyVecs];
  __m512 vmax = _mm512_set1_ps(kNegInf);
  for (int64_t v = 0; v < key_vecs; ++v) {
    sv[v] = _mm512_mul_ps(_mm512_loadu_ps(scores + 16 * v), _mm512_set1_ps(t.scale));
    if (t.has_cap) {
      _mm512_store_ps(sc, sv[v]);
      for (int64_t x = 0; x < 16; ++x) sc[x] = t.cap * std::tanh(sc[x] / t.cap);
      sv[v] = _mm512_load_ps(sc);
    }
    vmax = _mm512_mask_max_ps(vmax, m[v], vmax, sv[v]);
  }
  const float new_max = std::max(run_max, _mm512_reduce_max_ps(vmax));
  const __m512 nm = _mm512_set1_ps(new_max);
  __m512 psum = _mm512_setzero_ps();
  __m512 pv[kKeyVecs];
  for (int64_t v = 0; v < kKeyVecs; ++v) {
    pv[v] = v < key_vecs ? _mm512_maskz_mov_ps(m[v], exp_ps(_mm512_sub_ps(sv[v], nm))) : _mm512_setzero_ps();
    psum = _mm512_add_ps(psum, pv[v]);
  }
  settle_row(new_max, _mm512_reduce_add_ps(psum), run_max, run_sum, acc_row, t.D);
  for (int64_t v = 0; v < kKeyVecs; v += 2)
    _mm512_storeu_si512(pb_row + 16 * v, (__m512i)_mm512_cvtne2ps_pbh(pv[v + 1], pv[v]));
}

// The AMX tile's online-softmax step for its 16-query slab of one head (base2_rows): as softmax_row on each of the
// `nq` rows (query qpos0 + i, state index r0 + i * r_stride, scores and probabilities row i), with the rows' 32
// horizontal reductions (max, then sum) done as two transpose trees (max16, sum16): one 1,000-token chunk on AMX
// 1.7 -> 1.5-1.6 ms a layer (4 chunks: within the noise, 6.7-7.0 vs 7.0).
__attribute__((always_inline)) inline void softmax_rows16(const float (*scores)[kKeyTile], int64_t nq,
                                                          const __m512i* kpos, __m512i limit, int64_t first_pos,
                                                          int64_t count, int64_t qpos0, int64_t key_vecs,
                                                          const Tile& t, float* run_max, float* run_sum, float* acc,
                                                          int64_t r0, int64_t r_stride, uint16_t (*pb)[kKeyTile]) {
  __mmask16 m[16][kKeyVecs];
  bool any[16];
  __m512 lanes[16];
  for (int64_t i = 0; i < 16; ++i) {
    any[i] = i < nq && row_masks(kpos, limit, first_pos, count, qpos0 + i, key_vecs, t, m[i]);
    lanes[i] = any[i] ? row_raw_max(scores[i], m[i], key_vecs) : _mm512_set1_ps(kNegInf);
  }
  alignas(64) float row_max[16], row_sum[16];
  _mm512_store_ps(row_max, tandem_simd::max16(lanes));
  float new_max[16];
  for (int64_t i = 0; i < 16; ++i) {
    lanes[i] = _mm512_setzero_ps();
    if (i >= nq) continue;
    if (!any[i]) {
      std::fill(pb[i], pb[i] + kKeyTile, uint16_t(0));
      continue;
    }
    new_max[i] = std::max(run_max[r0 + i * r_stride], row_max[i] * t.scale);
    lanes[i] = row_probabilities(scores[i], m[i], key_vecs, t.scale, new_max[i], pb[i]);
  }
  _mm512_store_ps(row_sum, tandem_simd::sum16(lanes));
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t r = r0 + i * r_stride;
    if (any[i]) settle_row(new_max[i], row_sum[i], run_max[r], run_sum[r], acc + r * t.D, t.D);
  }
}

template <class Keys>
void attend_tile(const Keys& keys, const Tile& t) {
  const int64_t D = t.D, P = D / 2, n_rows = t.n_q * t.group;
  alignas(64) uint32_t kp[kMaxD / 2 * kKeyTile];  // [P][kKeyTile]: key pairs of dimensions
  alignas(64) uint32_t vp[kKeyTile / 2 * kMaxD];  // [kKeyTile / 2][D]: dimension pairs of keys
  // Probabilities rounded to bf16 pairs for the value products, as FlashAttention rounds them. Measured against the
  // fp32 model (teacher-forced top-1 over 5,087 positions): 0.998 agreement, SDPA's bf16 path 0.993, keeping ~16 bits
  // (a hi + lo split, one more product) 0.995: within noise, for 1.5x the value products.
  alignas(64) uint32_t pb[kRowBlock][kKeyTile / 2];
  std::vector<float> acc(n_rows * D, 0.f), run_max(n_rows, kNegInf), run_sum(n_rows, 0.f);
  auto row_q = [&](int64_t r) {
    return reinterpret_cast<const uint32_t*>(t.q + (r / t.group) * t.token_stride + (r % t.group) * D);
  };
  const int64_t last_pos = t.q_pos0 + t.n_q - 1;
  const int64_t j_end = std::min(t.n_keys, last_pos - t.k_pos0 + 1);
  const int64_t j_begin = t.window > 0 ? std::max<int64_t>(0, t.q_pos0 - t.window + 1 - t.k_pos0) : 0;
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kKeyTile) {
    const int64_t count = std::min(kKeyTile, j_end - j0);
    pack_key_tile(keys, j0, count, D, kp, vp);
    const int64_t pairs = (count + 1) / 2;
    __m512i kpos[kKeyVecs];
    for (int64_t v = 0; v < kKeyVecs; ++v) kpos[v] = _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(t.k_pos0 + j0 + 16 * v)));
    const __m512i limit = _mm512_set1_epi32(int32_t(t.k_pos0 + j0 + count));  // keys past the tile's count
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, n_rows - r0);
      const uint32_t* qr[kRowBlock];
      for (int64_t i = 0; i < kRowBlock; ++i) qr[i] = row_q(r0 + std::min(i, nr - 1));
      __m512 s[kRowBlock][kKeyVecs];
      for (int64_t i = 0; i < kRowBlock; ++i)
        for (int64_t v = 0; v < kKeyVecs; ++v) s[i][v] = _mm512_setzero_ps();
      for (int64_t p = 0; p < P; ++p) {
        __m512bh kv[kKeyVecs];
        for (int64_t v = 0; v < kKeyVecs; ++v) kv[v] = as_bh(_mm512_load_si512(kp + p * kKeyTile + 16 * v));
        for (int64_t i = 0; i < kRowBlock; ++i) {
          const __m512bh qb = as_bh(_mm512_set1_epi32(int32_t(qr[i][p])));
          for (int64_t v = 0; v < kKeyVecs; ++v) s[i][v] = _mm512_dpbf16_ps(s[i][v], qb, kv[v]);
        }
      }
      // NOTE: out of the accumulators at constant indices: indexing `s` by the runtime row below made GCC keep it in
      // memory, storing all 16 accumulators on every step of the loop above (2.2x slower scores).
      alignas(64) float scores[kRowBlock][kKeyTile];
      for (int64_t i = 0; i < kRowBlock; ++i)
        for (int64_t v = 0; v < kKeyVecs; ++v) _mm512_store_ps(scores[i] + 16 * v, s[i][v]);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        softmax_row(scores[i], kpos, limit, t.k_pos0 + j0, count, t.q_pos0 + r / t.group, kKeyVecs, t, run_max[r],
                    run_sum[r], acc.data() + r * D, reinterpret_cast<uint16_t*>(pb[i]));
      }
      // Values: output dimensions in chunks of 64 (four vectors), each row's probabilities broadcast by key pair.
      for (int64_t c = 0; c < D; c += 64) {
        __m512 a[kRowBlock][4];
        for (int64_t i = 0; i < kRowBlock; ++i)
          for (int64_t x = 0; x < 4; ++x)
            a[i][x] = i < nr ? _mm512_loadu_ps(acc.data() + (r0 + i) * D + c + 16 * x) : _mm512_setzero_ps();
        for (int64_t jj = 0; jj < pairs; ++jj) {
          const uint32_t* vrow = vp + jj * D + c;
          const __m512bh v0 = as_bh(_mm512_loadu_si512(vrow)), v1 = as_bh(_mm512_loadu_si512(vrow + 16));
          const __m512bh v2 = as_bh(_mm512_loadu_si512(vrow + 32)), v3 = as_bh(_mm512_loadu_si512(vrow + 48));
          for (int64_t i = 0; i < kRowBlock; ++i) {
            const __m512bh pv = as_bh(_mm512_set1_epi32(int32_t(pb[i][jj])));
            a[i][0] = _mm512_dpbf16_ps(a[i][0], pv, v0);
            a[i][1] = _mm512_dpbf16_ps(a[i][1], pv, v1);
            a[i][2] = _mm512_dpbf16_ps(a[i][2], pv, v2);
            a[i][3] = _mm512_dpbf16_ps(a[i][3], pv, v3);
          }
        }
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t x = 0; x < 4; ++x) _mm512_storeu_ps(acc.data() + (r0 + i) * D + c + 16 * x, a[i][x]);
      }
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    // NOTE: a row that saw no key (never built by the runner) is written as zeros, not NaN.
    const __m512 inv = _mm512_set1_ps(run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f);
    uint16_t* dst = t.out + (r / t.group) * t.out_stride + (r % t.group) * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + d), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)o);
    }
  }
}



// ---- the same tile on AMX (Intel Sapphire Rapids and later) ------------------------------------------------------
// attend_tile's packed key tile is already what the tile unit multiplies: kp ([P][64 keys] pairs) holds, from pair
// 16 c and key 16 v, a B tile of 16 pairs x 16 keys at a 256-byte stride, and vp ([32 key pairs][D]) from key pair
// 16 h and dimension 16 x a B tile of 16 key pairs x 16 dimensions at a D * 4-byte stride. Per query head g of the
// group and 16 queries (one A tile per 32 dimensions, read where the queries lie): the scores S = Q K^T as four
// 16 x 16 C tiles, the same masking and online softmax as attend_tile on their rows, the probabilities rounded to bf16
// as two A tiles of 32 keys, and O += P V on the accumulators (C tiles loaded from and stored back to acc).
// Tiles: tmm0-3 C (scores, then accumulators), tmm4-5 A (queries, then probabilities), tmm6-7 B; rows = queries.
// Measured here (Xeon with AMX, 2 vCPUs; 30 layers x 4 chunks of 1,000 tokens, 9 query heads on 3 KV heads): 8.3-8.9 ms a
// layer vs 28.9-30.1 on the AVX-512 tile (~520 vs ~155 GFLOP/s).
inline void configure_prefill_tiles(int64_t call, int64_t nq) {
  tandem_amx::TileConfig cfg;
  for (int t = 0; t < 6; ++t) cfg.set(t, int(nq), 64);
  for (int t : {6, 7}) cfg.set(t, 16, 64);
  tandem_amx::load_tiles(call, nq, cfg);
}

// Accumulator tiles tmm0-3 (64 dimensions) += the probabilities in A tile tmm<A> (32 keys) times those keys' value
// pairs at `vb` (16 key pairs x 64 dimensions, a row every D dwords), through B tiles tmm6-7. (A macro: GCC's tile
// intrinsics name their registers by stringifying the argument, so it must be a literal.)
#define TANDEM_VALUES_TIMES(A, vb, D)   \
  do {                                  \
    _tile_loadd(6, (vb), (D) * 4);      \
    _tile_dpbf16ps(0, A, 6);            \
    _tile_loadd(7, (vb) + 16, (D) * 4); \
    _tile_dpbf16ps(1, A, 7);            \
    _tile_loadd(6, (vb) + 32, (D) * 4); \
    _tile_dpbf16ps(2, A, 6);            \
    _tile_loadd(7, (vb) + 48, (D) * 4); \
    _tile_dpbf16ps(3, A, 7);            \
  } while (0)

template <class Keys>
__attribute__((target("amx-tile,amx-bf16"))) void attend_tile_amx(const Keys& keys, const Tile& t, int64_t call) {
  const int64_t D = t.D, P = D / 2, G = t.group, n_rows = t.n_q * G;
  alignas(64) uint32_t kp[kMaxD / 2 * kKeyTile];  // [P][kKeyTile]
  alignas(64) uint32_t vp[kKeyTile / 2 * kMaxD];  // [kKeyTile / 2][D]
  alignas(64) float scores[16][kKeyTile];
  alignas(64) uint16_t pb[16][kKeyTile];          // probabilities, bf16: two A tiles of 32 keys
  std::vector<float> acc(n_rows * D, 0.f), run_max(n_rows, kNegInf), run_sum(n_rows, 0.f);
  const int64_t last_pos = t.q_pos0 + t.n_q - 1;
  const int64_t j_end = std::min(t.n_keys, last_pos - t.k_pos0 + 1);
  const int64_t j_begin = t.window > 0 ? std::max<int64_t>(0, t.q_pos0 - t.window + 1 - t.k_pos0) : 0;
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t q_bytes = t.token_stride * 2, acc_bytes = G * D * 4;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kKeyTile) {
    const int64_t count = std::min(kKeyTile, j_end - j0);
    pack_key_tile(keys, j0, count, D, kp, vp);
    const int64_t pairs = (count + 1) / 2;
    // The B tiles of the value products cover 16 key pairs: pairs past the keys read zeros, never stale values
    // (a NaN there would survive its zero probability).
    const int64_t key_halves = (pairs + 15) / 16;
    std::fill(vp + pairs * D, vp + key_halves * 16 * D, 0u);
    __m512i kpos[kKeyVecs];
    for (int64_t v = 0; v < kKeyVecs; ++v)
      kpos[v] = _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(t.k_pos0 + j0 + 16 * v)));
    const __m512i limit = _mm512_set1_epi32(int32_t(t.k_pos0 + j0 + count));
    const int64_t key_vecs = (count + 15) / 16;
    for (int64_t qs = 0; qs < t.n_q; qs += 16) {
      const int64_t nq = std::min<int64_t>(16, t.n_q - qs);
      configure_prefill_tiles(call, nq);
      for (int64_t g = 0; g < G; ++g) {
        // S = Q K^T for 16 queries of head g and the tile's keys.
        const uint16_t* qa = t.q + qs * t.token_stride + g * D;
        for (int64_t v = 0; v < key_vecs; ++v) {
          switch (v) {
            case 0: _tile_zero(0); break;
            case 1: _tile_zero(1); break;
            case 2: _tile_zero(2); break;
            default: _tile_zero(3); break;
          }
        }
        for (int64_t c = 0; c < P / 16; ++c) {
          _tile_loadd(4, qa + 32 * c, q_bytes);
          const uint32_t* kb = kp + 16 * c * kKeyTile;
          _tile_loadd(6, kb, kKeyTile * 4);
          _tile_dpbf16ps(0, 4, 6);
          if (key_vecs > 1) {
            _tile_loadd(7, kb + 16, kKeyTile * 4);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (key_vecs > 2) {
            _tile_loadd(6, kb + 32, kKeyTile * 4);
            _tile_dpbf16ps(2, 4, 6);
          }
          if (key_vecs > 3) {
            _tile_loadd(7, kb + 48, kKeyTile * 4);
            _tile_dpbf16ps(3, 4, 7);
          }
        }
        _tile_stored(0, scores[0], kKeyTile * 4);
        if (key_vecs > 1) _tile_stored(1, scores[0] + 16, kKeyTile * 4);
        if (key_vecs > 2) _tile_stored(2, scores[0] + 32, kKeyTile * 4);
        if (key_vecs > 3) _tile_stored(3, scores[0] + 48, kKeyTile * 4);
        if (base2_rows(t)) {
          softmax_rows16(scores, nq, kpos, limit, t.k_pos0 + j0, count, t.q_pos0 + qs, key_vecs, t, run_max.data(),
                         run_sum.data(), acc.data(), qs * G + g, G, pb);
        } else {
          for (int64_t i = 0; i < nq; ++i) {
            const int64_t r = (qs + i) * G + g;
            softmax_row(scores[i], kpos, limit, t.k_pos0 + j0, count, t.q_pos0 + qs + i, key_vecs, t, run_max[r],
                        run_sum[r], acc.data() + r * D, pb[i]);
          }
        }
        // O += P V, 64 dimensions (four accumulator tiles) at a time.
        _tile_loadd(4, pb[0], kKeyTile * 2);
        if (key_halves > 1) _tile_loadd(5, pb[0] + 32, kKeyTile * 2);
        float* ag = acc.data() + (qs * G + g) * D;
        for (int64_t c = 0; c < D; c += 64) {
          _tile_loadd(0, ag + c, acc_bytes);
          _tile_loadd(1, ag + c + 16, acc_bytes);
          _tile_loadd(2, ag + c + 32, acc_bytes);
          _tile_loadd(3, ag + c + 48, acc_bytes);
          TANDEM_VALUES_TIMES(4, vp + c, D);  // keys 0-31 of the tile
          if (key_halves > 1) TANDEM_VALUES_TIMES(5, vp + 16 * D + c, D);  // keys 32-63
          _tile_stored(0, ag + c, acc_bytes);
          _tile_stored(1, ag + c + 16, acc_bytes);
          _tile_stored(2, ag + c + 32, acc_bytes);
          _tile_stored(3, ag + c + 48, acc_bytes);
        }
      }
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const __m512 inv = _mm512_set1_ps(run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f);
    uint16_t* dst = t.out + (r / G) * t.out_stride + (r % G) * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + d), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)o);
    }
  }
}

std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{tandem_amx::amx_granted()};
  return on;
}

// attend_tile on AMX where the tiles are on.
template <class Keys>
void attend(const Keys& keys, const Tile& t, int64_t call) {
  if (call >= 0) {
    attend_tile_amx(keys, t, call);
  } else {
    attend_tile(keys, t);
  }
}

struct Work {
  int64_t seq, head, q0, cost;
};

// Run `fn(work)` over every (sequence, KV head, query tile), most keys first, dynamically scheduled.
template <class Fn>
void run_items(const std::vector<int64_t>& q_lens, const std::vector<int64_t>& key_ends, int64_t kvh, Fn fn) {
  std::vector<Work> items;
  for (int64_t s = 0; s < int64_t(q_lens.size()); ++s)
    for (int64_t q0 = 0; q0 < q_lens[s]; q0 += kQTile)
      for (int64_t h = 0; h < kvh; ++h)
        items.push_back({s, h, q0, std::min(key_ends[s], key_ends[s] - q_lens[s] + q0 + kQTile)});
  std::sort(items.begin(), items.end(), [](const Work& a, const Work& b) { return a.cost > b.cost; });
  const int64_t n = items.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < n; ++i) fn(items[i]);
}

// What both entry points ask of q [T, H, D] (its layout apart) and of the KV heads.
void check_common(const at::Tensor& q, int64_t kvh) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "prefill attention: bf16 only");
  TORCH_CHECK(q.dim() == 3, "q: expected [T, H, D]");
  TORCH_CHECK(q.size(2) % 64 == 0 && q.size(2) <= kMaxD, "head_dim: a multiple of 64, at most 256");
  TORCH_CHECK(kvh > 0 && q.size(1) % kvh == 0, "num_kv_heads must divide the query heads");
}

}  // namespace

bool bf16_prefill_available() { return true; }

bool attention_amx() { return amx_switch().load(); }

void set_attention_amx(bool on) {
  TORCH_CHECK(!on || tandem_amx::amx_granted(), "set_attention_amx: this CPU (or kernel) gives no AMX tiles");
  amx_switch().store(on);
}

// [T, heads, D] with each token's heads side by side (strides D and 1), tokens at any stride: a view of the
// projection's output (q, k and v split from one qkv row) needs no copy.
void check_token_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.stride(0) >= x.size(1) * x.size(2),
              what, ": expected [T, heads, D] with each token's heads contiguous");
}

// Every chunk attends causally to itself: chunk s is tokens starts[s] .. starts[s] + lens[s] of q/k/v, its output
// written to the same rows of `out` (other rows untouched). q, k, v and out may be strided views (check_token_rows).
void prefill_attention_dense_into(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor starts, at::Tensor lens,
                                  double scale, int64_t window, bool has_cap, double cap, at::Tensor out) {
  check_token_rows(q, "q");
  check_token_rows(k, "k");
  check_token_rows(v, "v");
  check_token_rows(out, "out");
  const int64_t kvh = k.size(1), H = q.size(1), D = q.size(2);
  check_common(q, kvh);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == D,
              "k, v: expected [T, kv_heads, D] like q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes(), "k, v, out: expected q's dtype");
  TORCH_CHECK(starts.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
              starts.numel() == lens.numel(), "starts, lens: expected int64 tensors of one length");
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  std::vector<int64_t> q_lens(lp, lp + lens.numel());
  for (int64_t s = 0; s < int64_t(q_lens.size()); ++s)
    TORCH_CHECK(sp[s] >= 0 && q_lens[s] >= 0 && sp[s] + q_lens[s] <= q.size(0), "a chunk lies outside q");
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t qs = q.stride(0), ks = k.stride(0), vs = v.stride(0), os = out.stride(0);
  const int64_t group = H / kvh;
  const int64_t call = amx_switch().load() ? tandem_amx::amx_call() : -1;
  run_items(q_lens, q_lens, kvh, [&](const Work& w) {
    const int64_t base = sp[w.seq], head = w.head * group * D;
    const DenseKeys keys{kp + base * ks + w.head * D, vp + base * vs + w.head * D, ks, vs};
    const int64_t tok = base + w.q0;
    const Tile tile{qp + tok * qs + head, op + tok * os + head, qs, os, std::min(kQTile, q_lens[w.seq] - w.q0),
                    group, D, w.q0, 0, q_lens[w.seq], window, float(scale), float(cap), has_cap};
    attend(keys, tile, call);
  });
}

// prefill_attention_dense_into a new tensor (rows outside every chunk zero).
at::Tensor prefill_attention_dense(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor starts,
                                   at::Tensor lens, double scale, int64_t window, bool has_cap, double cap) {
  auto out = at::zeros(q.sizes(), q.options());
  prefill_attention_dense_into(q, k, v, starts, lens, scale, window, has_cap, cap, out);
  return out;
}

// One chunk of q_len tokens (q [q_len, H, D]) ending at ctx_len, over the cache blocks listed by `rows`
// ([2 * kvh * nb] in (K/V, head, block) order) covering keys kv_start .. ctx_len, the chunk's own included.
at::Tensor prefill_attention_paged(at::Tensor q, at::Tensor kv_rows, at::Tensor rows, int64_t kv_start,
                                   int64_t ctx_len, double scale, int64_t window, bool has_cap, double cap,
                                   int64_t num_kv_heads) {
  const int64_t kvh = num_kv_heads, H = q.size(1), D = q.size(2), q_len = q.size(0);
  check_common(q, kvh);
  TORCH_CHECK(q.is_contiguous(), "q: expected a contiguous [T, H, D] tensor");
  TORCH_CHECK(kv_rows.dim() == 2 && kv_rows.is_contiguous() && kv_rows.size(1) % D == 0 &&
              kv_rows.scalar_type() == q.scalar_type(), "kv_rows: expected a contiguous [R, bs * D] tensor of q's dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() % (2 * kvh) == 0,
              "rows: expected contiguous int64, 2 * kv_heads * blocks");
  const int64_t bs = kv_rows.size(1) / D, nb = rows.numel() / (2 * kvh);
  TORCH_CHECK(kv_start >= 0 && ctx_len >= kv_start + q_len && ctx_len - kv_start <= nb * bs,
              "the blocks do not cover keys kv_start .. ctx_len");
  auto out = at::zeros_like(q);
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kvp = reinterpret_cast<const uint16_t*>(kv_rows.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t group = H / kvh, n_keys = ctx_len - kv_start;
  const int64_t call = amx_switch().load() ? tandem_amx::amx_call() : -1;
  run_items({q_len}, {n_keys}, kvh, [&](const Work& w) {
    const PagedKeys keys{kvp, rp + w.head * nb, rp + (kvh + w.head) * nb, bs, D};
    const int64_t off = w.q0 * H * D + w.head * group * D;
    const Tile tile{qp + off, op + off, H * D, H * D, std::min(kQTile, q_len - w.q0), group, D,
                    ctx_len - q_len + w.q0, kv_start, n_keys, window, float(scale), float(cap), has_cap};
    attend(keys, tile, call);
  });
  return out;
}

#else  // built without AVX-512 bf16: the Python side keeps these chunks on the torch reference

bool bf16_prefill_available() { return false; }

bool attention_amx() { return false; }

void set_attention_amx(bool on) { TORCH_CHECK(!on, "set_attention_amx: this build has no AVX-512 bf16"); }

at::Tensor prefill_attention_dense(at::Tensor q, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   double, int64_t, bool, double) {
  TORCH_CHECK(false, "prefill attention: this build has no AVX-512 bf16");
  return q;
}

void prefill_attention_dense_into(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t, bool,
                                  double, at::Tensor) {
  TORCH_CHECK(false, "prefill attention: this build has no AVX-512 bf16");
}

at::Tensor prefill_attention_paged(at::Tensor q, at::Tensor, at::Tensor, int64_t, int64_t, double,
                                   int64_t, bool, double, int64_t) {
  TORCH_CHECK(false, "prefill attention: this build has no AVX-512 bf16");
  return q;
}

#endif
