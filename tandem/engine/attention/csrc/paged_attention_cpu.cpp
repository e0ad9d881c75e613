// Paged attention on the CPU that reads KV blocks where they lie in the block-major cache.
//
// Design (after vLLM's csrc/cpu attention, written for Tandem's layout): one work item per (sequence, KV head,
// tile of queries) (bf16 decodes: per sequence and group of KV heads, see attend_decode_bf16); the query heads that
// share a KV head are attended together, so each block of K and V is read once per item, not once per query
// head. Softmax is online (running max and sum),
// so no score matrix the size of the context is ever materialised and nothing is gathered into a dense copy.
//
// Shapes: q [B, Q, H, D]; kv_rows [R, block_size * D] (the cache viewed by rows, see core/kv_layout.py);
// rows [2 * kvh * B * nb] int64 in (K/V, head, sequence, block) order; mask [B, Q, nb * block_size] bool
// (True where a query may attend a key; a query's True keys are one contiguous run: causal plus a window).
#include "attention_ops.h"

#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "decode_kernels.h"
#include "parallel.h"
#include "simd.h"

namespace {

constexpr int64_t kQueryTile = 16;  // queries of one sequence per work item (prefill chunks split into tiles)

struct Dims {
  int64_t B, Q, H, D, kvh, group, nb, bs, L;
};

// The keys a query may attend: its mask row's one run of True, as [first, end).
inline std::pair<int64_t, int64_t> key_run(const bool* m, int64_t L) {
  int64_t first = 0;
  while (first < L && !m[first]) ++first;
  int64_t last = first;
  while (last < L && m[last]) ++last;
  return {first, last};
}

template <typename scalar_t>
void attend_item(const scalar_t* q, const scalar_t* kv, const int64_t* rows, const bool* mask, scalar_t* out,
                 const Dims& d, int64_t b, int64_t h, int64_t q0, int64_t q1, float scale, bool has_cap,
                 float cap) {
  const int64_t D = d.D, bs = d.bs, n_q = q1 - q0, n_rows = d.group * n_q;
  // Per query row r = (query qi, head g in the group): the contiguous run of keys it may attend.
  std::vector<int64_t> lo(n_q), hi(n_q);
  int64_t key_lo = d.L, key_hi = 0;
  for (int64_t qi = 0; qi < n_q; ++qi) {
    std::tie(lo[qi], hi[qi]) = key_run(mask + (b * d.Q + q0 + qi) * d.L, d.L);
    key_lo = std::min(key_lo, lo[qi]);
    key_hi = std::max(key_hi, hi[qi]);
  }
  std::vector<float> qf(n_rows * D), acc(n_rows * D, 0.f), kf(bs * D), vf(bs * D), s(bs);
  std::vector<float> run_max(n_rows, -std::numeric_limits<float>::infinity()), run_sum(n_rows, 0.f);
  for (int64_t qi = 0; qi < n_q; ++qi) {
    for (int64_t g = 0; g < d.group; ++g) {
      const scalar_t* src = q + (((b * d.Q + q0 + qi) * d.H) + h * d.group + g) * D;
      float* dst = qf.data() + (qi * d.group + g) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(src[i]) * scale;
    }
  }
  const int64_t k_base = (h * d.B + b) * d.nb, v_base = ((d.kvh + h) * d.B + b) * d.nb;
  for (int64_t blk = key_lo / bs; blk * bs < key_hi; ++blk) {
    const scalar_t* kp = kv + rows[k_base + blk] * bs * D;
    const scalar_t* vp = kv + rows[v_base + blk] * bs * D;
    // K transposed to [D, bs]: the scores of a block's keys are then bs independent sums over d, which the
    // compiler vectorizes across keys (a dot product over d is a serial reduction it may not reorder).
    for (int64_t t = 0; t < bs; ++t)
      for (int64_t i = 0; i < D; ++i) kf[i * bs + t] = static_cast<float>(kp[t * D + i]);
    for (int64_t i = 0; i < bs * D; ++i) vf[i] = static_cast<float>(vp[i]);
    for (int64_t qi = 0; qi < n_q; ++qi) {
      const int64_t t_lo = std::max<int64_t>(lo[qi] - blk * bs, 0), t_hi = std::min<int64_t>(hi[qi] - blk * bs, bs);
      if (t_lo >= t_hi) continue;
      for (int64_t g = 0; g < d.group; ++g) {
        const int64_t r = qi * d.group + g;
        const float* qr = qf.data() + r * D;
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < bs; ++t) s[t] = 0.f;
        for (int64_t i = 0; i < D; ++i) {
          const float qi_d = qr[i];
          const float* kt = kf.data() + i * bs;
          for (int64_t t = 0; t < bs; ++t) s[t] += qi_d * kt[t];
        }
        for (int64_t t = t_lo; t < t_hi; ++t) {
          if (has_cap) s[t] = cap * std::tanh(s[t] / cap);
          block_max = std::max(block_max, s[t]);
        }
        const float new_max = std::max(run_max[r], block_max);
        const float rescale = std::exp(run_max[r] - new_max);  // exp(-inf) = 0 on the first block
        float* ar = acc.data() + r * D;
        float block_sum = 0.f;
        for (int64_t i = 0; i < D; ++i) ar[i] *= rescale;
        for (int64_t t = t_lo; t < t_hi; ++t) {
          const float p = std::exp(s[t] - new_max);
          block_sum += p;
          const float* vt = vf.data() + t * D;
          for (int64_t i = 0; i < D; ++i) ar[i] += p * vt[i];
        }
        run_sum[r] = run_sum[r] * rescale + block_sum;
        run_max[r] = new_max;
      }
    }
  }
  for (int64_t qi = 0; qi < n_q; ++qi) {
    for (int64_t g = 0; g < d.group; ++g) {
      const int64_t r = qi * d.group + g;
      // NOTE: a row with no key to attend (never built by the runner) is written as zeros, not NaN.
      const float inv = run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f;
      scalar_t* dst = out + (((b * d.Q + q0 + qi) * d.H) + h * d.group + g) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(acc[r * D + i] * inv);
    }
  }
}

// ---- AVX-512 path (head_dim a multiple of 16, up to 256): K/V rows widened to fp32 in registers once per key and
// shared by every query row of the item; a score is 4 (D=64) fused multiply-adds and one horizontal sum.
constexpr int64_t kMaxVecs = 16;
constexpr int64_t kMinSplitBlocks = 4;  // a split of a long context covers at least this many blocks

using tandem_simd::load16;
inline __m512 load16(const double* p) {  // fp64 caches are only for tests; narrowed to fp32 like the others
  const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(p)), hi = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename scalar_t>
constexpr bool kVectorized = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                             std::is_same_v<scalar_t, c10::Half>;

// Where a split of a long context leaves its unnormalised result: running max, sum and accumulator per row.
struct Partial {
  float* max;  // [n_rows]
  float* sum;  // [n_rows]
  float* acc;  // [n_rows, D]
};

template <typename scalar_t>
void attend_item_vec(const scalar_t* q, const scalar_t* kv, const int64_t* rows, const bool* mask, scalar_t* out,
                     const Dims& d, int64_t b, int64_t h, int64_t q0, int64_t q1, float scale, bool has_cap,
                     float cap, int64_t blk_from, int64_t blk_to, const Partial* partial) {
  const int64_t D = d.D, bs = d.bs, n_q = q1 - q0, n_rows = d.group * n_q, nv = D / 16;
  std::vector<int64_t> lo(n_q), hi(n_q);
  int64_t key_lo = d.L, key_hi = 0;
  for (int64_t qi = 0; qi < n_q; ++qi) {
    std::tie(lo[qi], hi[qi]) = key_run(mask + (b * d.Q + q0 + qi) * d.L, d.L);
    key_lo = std::min(key_lo, lo[qi]);
    key_hi = std::max(key_hi, hi[qi]);
  }
  std::vector<float> qf(n_rows * D), acc(n_rows * D, 0.f), sc(n_rows * bs);
  std::vector<float> run_max(n_rows, -std::numeric_limits<float>::infinity()), run_sum(n_rows, 0.f);
  for (int64_t qi = 0; qi < n_q; ++qi) {
    for (int64_t g = 0; g < d.group; ++g) {
      const scalar_t* src = q + (((b * d.Q + q0 + qi) * d.H) + h * d.group + g) * D;
      float* dst = qf.data() + (qi * d.group + g) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(src[i]) * scale;
    }
  }
  const int64_t k_base = (h * d.B + b) * d.nb, v_base = ((d.kvh + h) * d.B + b) * d.nb;
  __m512 vecs[kMaxVecs];
  for (int64_t blk = std::max(key_lo / bs, blk_from); blk < blk_to && blk * bs < key_hi; ++blk) {
    const scalar_t* kp = kv + rows[k_base + blk] * bs * D;
    const scalar_t* vp = kv + rows[v_base + blk] * bs * D;
    const int64_t t_begin = std::max<int64_t>(key_lo - blk * bs, 0), t_end = std::min<int64_t>(key_hi - blk * bs, bs);
    for (int64_t t = t_begin; t < t_end; ++t) {  // scores: every row against key t, K widened once
      for (int64_t j = 0; j < nv; ++j) vecs[j] = load16(kp + t * D + 16 * j);
      for (int64_t r = 0; r < n_rows; ++r) {
        const float* qr = qf.data() + r * D;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), vecs[0]);
        for (int64_t j = 1; j < nv; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * j), vecs[j], a);
        sc[r * bs + t] = _mm512_reduce_add_ps(a);
      }
    }
    for (int64_t r = 0; r < n_rows; ++r) {  // online softmax; sc becomes the probabilities (0 outside a row's run)
      const int64_t qi = r / d.group;
      const int64_t t_lo = std::max<int64_t>(lo[qi] - blk * bs, t_begin), t_hi = std::min<int64_t>(hi[qi] - blk * bs, t_end);
      float* sr = sc.data() + r * bs;
      if (t_lo >= t_hi) {
        for (int64_t t = t_begin; t < t_end; ++t) sr[t] = 0.f;
        continue;
      }
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t t = t_lo; t < t_hi; ++t) {
        if (has_cap) sr[t] = cap * std::tanh(sr[t] / cap);
        block_max = std::max(block_max, sr[t]);
      }
      const float new_max = std::max(run_max[r], block_max);
      const float rescale = std::exp(run_max[r] - new_max);
      float block_sum = 0.f;
      for (int64_t t = t_begin; t < t_end; ++t) {
        sr[t] = (t >= t_lo && t < t_hi) ? std::exp(sr[t] - new_max) : 0.f;
        block_sum += sr[t];
      }
      if (rescale != 1.f) {
        float* ar = acc.data() + r * D;
        for (int64_t i = 0; i < D; ++i) ar[i] *= rescale;
      }
      run_sum[r] = run_sum[r] * rescale + block_sum;
      run_max[r] = new_max;
    }
    for (int64_t t = t_begin; t < t_end; ++t) {  // values: V widened once per key, added to every row
      for (int64_t j = 0; j < nv; ++j) vecs[j] = load16(vp + t * D + 16 * j);
      for (int64_t r = 0; r < n_rows; ++r) {
        const float p = sc[r * bs + t];
        if (p == 0.f) continue;
        const __m512 pv = _mm512_set1_ps(p);
        float* ar = acc.data() + r * D;
        for (int64_t j = 0; j < nv; ++j)
          _mm512_storeu_ps(ar + 16 * j, _mm512_fmadd_ps(pv, vecs[j], _mm512_loadu_ps(ar + 16 * j)));
      }
    }
  }
  if (partial != nullptr) {
    std::copy(run_max.begin(), run_max.end(), partial->max);
    std::copy(run_sum.begin(), run_sum.end(), partial->sum);
    std::copy(acc.begin(), acc.end(), partial->acc);
    return;
  }
  for (int64_t qi = 0; qi < n_q; ++qi) {
    for (int64_t g = 0; g < d.group; ++g) {
      const int64_t r = qi * d.group + g;
      const float inv = run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f;
      scalar_t* dst = out + (((b * d.Q + q0 + qi) * d.H) + h * d.group + g) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(acc[r * D + i] * inv);
    }
  }
}

#if defined(__AVX512BF16__)
// ---- bf16 decodes (one query, block size a multiple of 16): scores of 16 keys at a time with vdpbf16ps on the
// stored bf16 rows (no widening), the 16 partial vectors summed by one transpose-add tree instead of 16 horizontal
// sums, softmax vectorised over the 16 scores, and the values too by vdpbf16ps, two keys per instruction, on the
// probabilities rounded to bf16 (as FlashAttention does for its P x V product) into row accumulators held in
// registers. With the KV in cache a step's 30 layers at 32 decodes took 4.1 ms this way vs 4.7 ms widening the values
// to fp32; from memory 12.6 vs 13.2 ms: at batch 32 decode attention waits on the KV reads (software prefetching of
// the next blocks, tried at two distances and two cache levels, gained nothing measurable).

// The K and V rows of one block of a decode item (its KV heads [h0, h0 + nh)), prefetched into L2 a few lines at a
// time: the item walks them in order (every head's K row, then every head's V row), a share before each query head's
// scores, so that the lines arrive spread over the attention of the block kPrefetchBlocks before, not in one burst;
// past an item's last block, the next sequence's first blocks (the next item of the thread's range). Measured on the
// Xeon host (30 layers at 32 decodes of 130-260 keys, SmolLM2's heads, the KV cold): 11.5 -> 10.0 ms (8.6 with it
// warm, from 10.8); 1 block ahead 10.6, 4 ahead 10.4, into L1 (T0) 11.0; a whole block in one burst at the start of
// the one before gained nothing. Decode steps at 32 x (128 + 128): 31.5 -> 29.2 ms.
constexpr int64_t kPrefetchBlocks = 2;

struct BlockPrefetch {
  const char* kv;
  const int64_t* rows;
  const Dims& d;
  int64_t h0, nh, row_bytes;
  int64_t total = 0, b = 0, blk = 0, part = 0, line = 0;  // part: K rows of heads 0..nh-1, then V rows
  const char* at = nullptr;

  void start(int64_t seq, int64_t block) {
    b = seq;
    blk = block;
    part = 0;
    line = 0;
    total = 2 * nh * row_bytes / 64;
    at = row_at();
  }
  const char* row_at() const {
    const int64_t kv_sel = part / nh, hh = part % nh;
    return kv + rows[((kv_sel * d.kvh + h0 + hh) * d.B + b) * d.nb + blk] * row_bytes;
  }
  void issue(int64_t n) {
    for (; n > 0 && part < 2 * nh; --n) {
      _mm_prefetch(at + 64 * line, _MM_HINT_T1);
      if (++line * 64 == row_bytes) {
        line = 0;
        if (++part < 2 * nh) at = row_at();
      }
    }
  }
};

constexpr int64_t kMaxDecodeRows = 32;  // query heads one work item holds: whole KV heads' groups, up to this many

// 32 bf16 from unaligned memory. NOTE: a cast of `_mm512_loadu_si512` to __m512bh made GCC bounce every vector
// through the stack; a memcpy into the bf16 vector is one unaligned load.
inline __m512bh loadu_bh(const void* p) {
  __m512bh v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The accumulators of the interleaved value pairs hold dimensions out of order: unpacklo/unpackhi_epi16 work within
// 128-bit lanes, so vector 2j (lo) of a 32-dimension slice j holds, in lane 4c + k, dimension 32j + 8c + k, and vector
// 2j + 1 (hi) dimension 32j + 8c + 4 + k. Put a row back in dimension order (once per work item).
template <int64_t D>
inline void value_pairs_to_dims(float* row) {
  alignas(64) float tmp[D];
  for (int64_t v = 0; v < D / 16; ++v)
    for (int64_t lane = 0; lane < 16; ++lane)
      tmp[32 * (v / 2) + 8 * (lane / 4) + 4 * (v % 2) + lane % 4] = row[16 * v + lane];
  std::copy(tmp, tmp + D, row);
}

// Query heads whose value accumulators one pass over a chunk's value rows holds in registers: NV accumulators a
// head, plus NV interleaved value vectors.
template <int64_t NV>
constexpr int64_t kValueGroup = NV <= 4 ? 3 : NV <= 8 ? 2 : 1;

// The value products of GN query heads over keys [t_lo, t_hi) of a 16-key chunk: rows t and t + 1 interleaved into
// (v_t[d], v_t+1[d]) pairs once, multiplied by each head's probability pair (p_t, p_t+1) with vdpbf16ps into its
// accumulators (`acc` rows, in value_pairs_to_dims's lane order). Keys outside the run read zeros. Interleaving
// once per group instead of once per head: 30 layers at 32 decodes of 130-260 keys (SmolLM2's 9 query heads on 3 KV
// heads) 5.5 -> 4.9 ms with the KV in cache, 16.8 -> 15.1 from memory; the same bits.
template <int64_t GN, int64_t NV>
inline void value_pairs(float (*acc)[16 * NV], const uint16_t (*pb)[16], const uint16_t* vrows,
                        const uint16_t* zero_row, int64_t t_lo, int64_t t_hi) {
  constexpr int64_t D = 16 * NV, NP = NV / 2;
  __m512 a[GN][NV];
  for (int64_t g = 0; g < GN; ++g)
    for (int64_t i = 0; i < NV; ++i) a[g][i] = _mm512_load_ps(acc[g] + 16 * i);
  for (int64_t t = t_lo & ~int64_t(1); t < t_hi; t += 2) {
    const uint16_t* r0 = t >= t_lo ? vrows + t * D : zero_row;
    const uint16_t* r1 = t + 1 < t_hi ? vrows + (t + 1) * D : zero_row;
    __m512bh lo[NP], hi[NP];
    for (int64_t j = 0; j < NP; ++j) {
      const __m512i x = _mm512_loadu_si512(r0 + 32 * j), y = _mm512_loadu_si512(r1 + 32 * j);
      lo[j] = (__m512bh)_mm512_unpacklo_epi16(x, y);
      hi[j] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
    for (int64_t g = 0; g < GN; ++g) {
      uint32_t pair;
      std::memcpy(&pair, pb[g] + t, sizeof(pair));
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(int32_t(pair));
      for (int64_t j = 0; j < NP; ++j) {
        a[g][2 * j] = _mm512_dpbf16_ps(a[g][2 * j], lo[j], pp);
        a[g][2 * j + 1] = _mm512_dpbf16_ps(a[g][2 * j + 1], hi[j], pp);
      }
    }
  }
  for (int64_t g = 0; g < GN; ++g)
    for (int64_t i = 0; i < NV; ++i) _mm512_store_ps(acc[g] + 16 * i, a[g][i]);
}

// One work item is a sequence's KV heads [h0, h0 + nh) (nh * group query rows): per 16-key chunk of a block it reads
// every head's K rows, then every head's V rows, so the item walks the block's K span and then its V span (a layer's
// heads lie side by side) instead of returning to the block once per head. Measured here: gathering the same bytes
// as 6 KiB spans (SmolLM2's three heads) ran 1.7x faster than as 2 KiB rows in per-head order, and the kernel took
// 12.7-13.0 vs 14.0-14.9 ms for 30 layers at 32 decodes (K then V beat K, V per head by ~4%).
template <int64_t NV>  // head_dim = 16 * NV
void attend_decode_bf16(const c10::BFloat16* q, const c10::BFloat16* kv, const int64_t* rows, const bool* mask,
                        c10::BFloat16* out, const Dims& d, int64_t b, int64_t h0, int64_t nh, float scale,
                        bool has_cap, float cap, int64_t blk_from, int64_t blk_to, const Partial* partial) {
  constexpr int64_t D = 16 * NV, NP = NV / 2;  // NP vectors of 32 bf16 per row
  const int64_t bs = d.bs, G = d.group, R = nh * G;
  const auto [lo, hi] = key_run(mask + b * d.Q * d.L, d.L);
  // acc holds each row's output in the lane order of the interleaved value pairs (see value_pairs_to_dims), put
  // back in dimension order at the end. Row r is query head h0 * G + r.
  alignas(64) float acc[kMaxDecodeRows][D];
  alignas(64) uint16_t pb[kMaxDecodeRows][16];  // a chunk's probabilities, rounded to bf16
  alignas(64) float sc[16];
  alignas(64) static const uint16_t zero_row[D] = {};  // stands in for the value rows of keys outside the run
  alignas(64) float run_max[kMaxDecodeRows], run_sum[kMaxDecodeRows];
  __m512 scores[kMaxDecodeRows];  // a chunk's scores, row r = query head h0 * G + r
  for (int64_t r = 0; r < R; ++r) std::fill(acc[r], acc[r] + D, 0.f);
  std::fill(run_max, run_max + kMaxDecodeRows, -std::numeric_limits<float>::infinity());  // (whole: read 16 at a time)
  std::fill(run_sum, run_sum + kMaxDecodeRows, 0.f);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t blk_first = std::max(lo / bs, blk_from);
  const int64_t blk_last = std::min<int64_t>(blk_to, (hi + bs - 1) / bs);  // one past
  BlockPrefetch ahead{reinterpret_cast<const char*>(kv), rows, d, h0, nh, bs * D * 2};
  // The next sequence's blocks (same heads), when this item covers its sequence whole.
  int64_t next_first = -1, next_last = -1;
  if (blk_from == 0 && blk_to == d.nb && b + 1 < d.B) {
    const auto [nlo, nhi] = key_run(mask + (b + 1) * d.Q * d.L, d.L);
    if (nlo < nhi) {
      next_first = nlo / bs;
      next_last = (nhi + bs - 1) / bs;
    }
  }
  for (int64_t blk = blk_first; blk < blk_last; ++blk) {
    // Block blk + kPrefetchBlocks's K and V rows come in while this block is attended, a few lines per head and
    // query head (see BlockPrefetch).
    const int64_t pf_blk = blk + kPrefetchBlocks;
    bool prefetching = false;
    if (pf_blk < blk_last) {
      ahead.start(b, pf_blk);
      prefetching = true;
    } else if (next_first >= 0 && next_first + (pf_blk - blk_last) < next_last) {
      // past this item's last block: the next sequence's first blocks (the next item of this thread's range)
      ahead.start(b + 1, next_first + (pf_blk - blk_last));
      prefetching = true;
    }
    // The K rows come in while this block's scores are computed (a share before each query head's), the V rows
    // while its values are summed (one row before each KV head's): paced as the block's own rows are read. Measured
    // here (30 layers, SmolLM2's heads, the KV cold): 64 decodes of 130-255 keys 20.1-20.6 -> 18.2-18.6 ms, 32
    // decodes 8.4-8.9 -> 8.2-8.6 (all of a block's lines during the scores before; with the KV in L2 ~0.5 ms slower).
    const int64_t row_lines = bs * D * 2 / 64;
    const int64_t quota = prefetching ? (row_lines + G - 1) / G : 0, pv_quota = prefetching ? row_lines : 0;
    for (int64_t o = 0; o < bs; o += 16) {
      const int64_t j0 = blk * bs + o, t_lo = std::max<int64_t>(lo - j0, 0), t_hi = std::min<int64_t>(hi - j0, 16);
      if (t_lo >= t_hi) continue;
      const __mmask16 valid = _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32(int32_t(t_lo))) &
                              _mm512_cmplt_epi32_mask(iota, _mm512_set1_epi32(int32_t(t_hi)));
      for (int64_t hh = 0; hh < nh; ++hh) {
        const int64_t h = h0 + hh;
        const auto* qrow = reinterpret_cast<const uint16_t*>(q) + (b * d.Q * d.H + h * G) * D;
        const auto* kp = reinterpret_cast<const uint16_t*>(kv) + (rows[(h * d.B + b) * d.nb + blk] * bs + o) * D;
        for (int64_t g = 0; g < G; ++g) {
          if (o == 0) ahead.issue(quota);
          __m512bh qv[NP];
          for (int64_t j = 0; j < NP; ++j) qv[j] = loadu_bh(qrow + g * D + 32 * j);
          __m512 part[16];
          for (int64_t t = 0; t < 16; ++t) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t j = 0; j < NP; ++j) a = _mm512_dpbf16_ps(a, qv[j], loadu_bh(kp + t * D + 32 * j));
            part[t] = a;
          }
          __m512 s = _mm512_mul_ps(tandem_simd::sum16(part), _mm512_set1_ps(scale));
          if (has_cap) {
            _mm512_store_ps(sc, s);
            for (int64_t t = 0; t < 16; ++t) sc[t] = cap * std::tanh(sc[t] / cap);
            s = _mm512_load_ps(sc);
          }
          scores[hh * G + g] = s;
        }
      }
      // Online softmax of 16 rows at a time: their block maxima and probability sums reduced by two transpose
      // trees (lane r: row r) instead of two horizontal reductions a row, the rescale one vector exp. Measured here
      // (30 layers at 64 decodes of 130-255 keys, SmolLM2's heads): 9.0 -> 7.4 ms with the KV in L2, 20.1-20.8 ->
      // 18.7-19.3 ms from memory, builds alternated.
      for (int64_t r0 = 0; r0 < R; r0 += 16) {
        const int64_t n = std::min<int64_t>(16, R - r0);
        const __mmask16 live = __mmask16((1u << n) - 1);
        const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512 v[16];
        for (int64_t i = 0; i < 16; ++i) v[i] = i < n ? _mm512_mask_mov_ps(neg_inf, valid, scores[r0 + i]) : neg_inf;
        const __m512 old_max = _mm512_load_ps(run_max + r0);
        const __m512 new_max = _mm512_max_ps(old_max, tandem_simd::max16(v));
        // Once a row's maximum settles it rarely moves (and then its rescale is exactly 1): most chunks skip the exp.
        const __mmask16 moved = _mm512_mask_cmp_ps_mask(live, old_max, new_max, _CMP_NEQ_OQ);
        const __m512 rescale = moved == 0 ? _mm512_set1_ps(1.f)
                                          : _mm512_mask_mov_ps(_mm512_set1_ps(1.f), moved,
                                                               tandem_simd::exp_ps(_mm512_sub_ps(old_max, new_max)));
        for (int64_t i = 0; i < n; ++i) {
          const __m512 row_max = _mm512_permutexvar_ps(_mm512_set1_epi32(int32_t(i)), new_max);
          const __m512 p = _mm512_maskz_mov_ps(valid, tandem_simd::exp_ps(_mm512_sub_ps(scores[r0 + i], row_max)));
          // The value products take p in bf16 (vdpbf16ps); the sum is of the same rounded values.
          const __m256i pr = _mm512_cvtepi32_epi16(_mm512_srli_epi32(tandem_simd::round_bits(p), 16));
          _mm256_store_si256(reinterpret_cast<__m256i*>(pb[r0 + i]), pr);
          v[i] = tandem_simd::widen16(pr);
        }
        for (int64_t i = n; i < 16; ++i) v[i] = _mm512_setzero_ps();
        _mm512_store_ps(run_sum + r0, _mm512_fmadd_ps(_mm512_load_ps(run_sum + r0), rescale, tandem_simd::sum16(v)));
        _mm512_store_ps(run_max + r0, new_max);
        if (moved != 0) {
          alignas(64) float factor[16];
          _mm512_store_ps(factor, rescale);
          for (int64_t i = 0; i < n; ++i) {
            if (!(moved >> i & 1)) continue;
            for (int64_t k = 0; k < D; k += 16)
              _mm512_store_ps(acc[r0 + i] + k, _mm512_mul_ps(_mm512_load_ps(acc[r0 + i] + k), _mm512_set1_ps(factor[i])));
          }
        }
      }
      // Values two keys at a time: rows t and t + 1 interleaved into (v_t[d], v_t+1[d]) pairs, multiplied by the
      // pair (p_t, p_t+1) with vdpbf16ps. Keys outside the run read zeros (their slots may never have been written).
      // (All heads' K rows of the chunk first, then all their V rows: two runs through the block's K and V spans.)
      for (int64_t hh = 0; hh < nh; ++hh) {
        const int64_t h = h0 + hh;
        const int64_t v_row = rows[((d.kvh + h) * d.B + b) * d.nb + blk];
        const auto* vrows = reinterpret_cast<const uint16_t*>(kv) + (v_row * bs + o) * D;
        float (*hacc)[D] = acc + hh * G;
        uint16_t (*hpb)[16] = pb + hh * G;
        // Query heads in groups of up to kValueGroup<NV>: each pair of value rows is loaded and interleaved once
        // for the group, not once per head (the accumulators of a head see the same products in the same order).
        if (o == 0 && pv_quota > 0) ahead.issue(pv_quota);
        constexpr int64_t GB = kValueGroup<NV>;
        int64_t g = 0;
        for (; g + GB <= G; g += GB) value_pairs<GB, NV>(hacc + g, hpb + g, vrows, zero_row, t_lo, t_hi);
        switch (G - g) {
          case 0: break;
          case 1: value_pairs<1, NV>(hacc + g, hpb + g, vrows, zero_row, t_lo, t_hi); break;
          case 2: value_pairs<2, NV>(hacc + g, hpb + g, vrows, zero_row, t_lo, t_hi); break;
          default: break;  // GB <= 3
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) value_pairs_to_dims<D>(acc[r]);
  if (partial != nullptr) {
    for (int64_t r = 0; r < R; ++r) {
      partial->max[r] = run_max[r];
      partial->sum[r] = run_sum[r];
      std::copy(acc[r], acc[r] + D, partial->acc + r * D);
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f);
    c10::BFloat16* dst = out + (b * d.Q * d.H + h0 * G + r) * D;
    for (int64_t i = 0; i < NV; ++i)
      tandem_simd::store16(dst + 16 * i, _mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * i), inv));
  }
}

// The bf16 decode kernel for this shape, or nullptr (the generic path).
using DecodeFn = void (*)(const c10::BFloat16*, const c10::BFloat16*, const int64_t*, const bool*, c10::BFloat16*,
                          const Dims&, int64_t, int64_t, int64_t, float, bool, float, int64_t, int64_t,
                          const Partial*);
inline DecodeFn bf16_decode_kernel(const Dims& d) {
  if (d.Q != 1 || d.bs % 16 != 0 || d.group > kMaxDecodeRows) return nullptr;
  switch (d.D) {
    case 64: return attend_decode_bf16<4>;
    case 128: return attend_decode_bf16<8>;
    case 256: return attend_decode_bf16<16>;
    default: return nullptr;
  }
}
#endif

// Combine the splits of one decode item (Q == 1): rescale each split's sum and accumulator to the common max.
template <typename scalar_t>
void combine_splits(const float* pmax, const float* psum, const float* pacc, int64_t splits, int64_t n_rows,
                    int64_t D, scalar_t* out, const Dims& d, int64_t b, int64_t h) {
  for (int64_t r = 0; r < n_rows; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, pmax[sp * n_rows + r]);
    float total = 0.f;
    std::vector<float> acc(D, 0.f);
    for (int64_t sp = 0; sp < splits; ++sp) {
      const float mx = pmax[sp * n_rows + r];
      if (mx == -std::numeric_limits<float>::infinity()) continue;  // this split saw no key of the row
      const float w = std::exp(mx - m);
      total += w * psum[sp * n_rows + r];
      const float* a = pacc + (sp * n_rows + r) * D;
      for (int64_t i = 0; i < D; ++i) acc[i] += w * a[i];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    scalar_t* dst = out + ((b * d.Q) * d.H + h * d.group + r) * D;  // Q == 1: row r is head g = r
    for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(acc[i] * inv);
  }
}

}  // namespace

at::Tensor paged_attention(at::Tensor q, at::Tensor kv_rows, at::Tensor rows, at::Tensor mask,
                           double scale, bool has_cap, double cap, int64_t num_kv_heads) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q: expected a contiguous [B, Q, H, D] tensor");
  TORCH_CHECK(kv_rows.dim() == 2 && kv_rows.is_contiguous(), "kv_rows: expected a contiguous [R, bs * D] tensor");
  TORCH_CHECK(kv_rows.scalar_type() == q.scalar_type(), "kv_rows: dtype differs from q's");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows: expected contiguous int64");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.is_contiguous(),
              "mask: expected a contiguous [B, Q, L] bool tensor");
  Dims d{};
  d.B = q.size(0);
  d.Q = q.size(1);
  d.H = q.size(2);
  d.D = q.size(3);
  d.kvh = num_kv_heads;
  TORCH_CHECK(d.kvh > 0 && d.H % d.kvh == 0, "num_kv_heads must divide the query heads");
  d.group = d.H / d.kvh;
  TORCH_CHECK(kv_rows.size(1) % d.D == 0, "kv_rows: row length is not a multiple of head_dim");
  d.bs = kv_rows.size(1) / d.D;
  TORCH_CHECK(d.B > 0 && rows.numel() % (2 * d.kvh * d.B) == 0, "rows: length is not 2 * kv_heads * B * blocks");
  d.nb = rows.numel() / (2 * d.kvh * d.B);
  d.L = d.nb * d.bs;
  TORCH_CHECK(mask.size(0) == d.B && mask.size(1) == d.Q && mask.size(2) == d.L, "mask: expected [B, Q, blocks * bs]");
  auto out = at::empty_like(q);
  const bool vectorize = d.D % 16 == 0 && d.D / 16 <= kMaxVecs;
  const int64_t tiles = (d.Q + kQueryTile - 1) / kQueryTile;
  const int64_t items = d.B * d.kvh * tiles;
  // Long contexts with few items (one decode, few KV heads) split their blocks across threads, then combine.
  int64_t splits = 1;
  if (vectorize && d.Q == 1) {
    const int64_t want = (4 * at::get_num_threads() + items - 1) / items;
    splits = std::max<int64_t>(1, std::min<int64_t>(want, d.nb / kMinSplitBlocks));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tandem_paged_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kvp = kv_rows.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* rp = rows.data_ptr<int64_t>();
    const bool* mp = mask.data_ptr<bool>();
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (const DecodeFn kernel = bf16_decode_kernel(d)) {
        // A work item: one sequence's KV heads [h0, h0 + nh), nh the largest divisor of kv_heads whose groups fit
        // in kMaxDecodeRows query rows.
        int64_t nh = 1;
        for (int64_t k = 1; k <= d.kvh; ++k)
          if (d.kvh % k == 0 && k * d.group <= kMaxDecodeRows) nh = k;
        const int64_t chunks = (d.kvh + nh - 1) / nh, seq_items = d.B * chunks, n_rows = nh * d.group;
        int64_t seq_splits = 1;  // long contexts with few items: split blocks across threads, then combine
        {
          const int64_t want = (4 * at::get_num_threads() + seq_items - 1) / seq_items;
          seq_splits = std::max<int64_t>(1, std::min<int64_t>(want, d.nb / kMinSplitBlocks));
        }
        std::vector<float> pmax(seq_items * seq_splits * n_rows), psum(seq_items * seq_splits * n_rows);
        std::vector<float> pacc(seq_splits > 1 ? seq_items * seq_splits * n_rows * d.D : 0);
        // (ranges with stealing: a decode step's items are many and alike, and a thread that loses its core for a
        // while must not hold up the rest; see csrc/parallel.h)
        tandem_parallel::for_each_item(seq_items * seq_splits, [&](int64_t w) {
          const int64_t item = w / seq_splits, sp = w % seq_splits, b = item / chunks, h0 = (item % chunks) * nh;
          const int64_t off = (item * seq_splits + sp) * n_rows;
          const Partial part{pmax.data() + off, psum.data() + off, pacc.data() + off * d.D};
          // (the dispatch lambda is not a template: this branch compiles for every dtype, runs for bf16 only)
          kernel(reinterpret_cast<const c10::BFloat16*>(qp), reinterpret_cast<const c10::BFloat16*>(kvp), rp, mp,
                 reinterpret_cast<c10::BFloat16*>(op), d, b, h0, nh, static_cast<float>(scale),
                 has_cap, static_cast<float>(cap), sp * d.nb / seq_splits, (sp + 1) * d.nb / seq_splits,
                 seq_splits > 1 ? &part : nullptr);
        });
        if (seq_splits > 1) {
          at::parallel_for(0, seq_items, 1, [&](int64_t begin, int64_t end) {
            for (int64_t item = begin; item < end; ++item) {
              const int64_t off = item * seq_splits * n_rows, h0 = (item % chunks) * nh;
              combine_splits<scalar_t>(pmax.data() + off, psum.data() + off, pacc.data() + off * d.D, seq_splits,
                                       n_rows, d.D, op, d, item / chunks, h0);
            }
          });
        }
        return;
      }
    }
#endif
    if constexpr (kVectorized<scalar_t>) {
      if (splits > 1) {
        const int64_t n_rows = d.group;
        std::vector<float> pmax(items * splits * n_rows), psum(items * splits * n_rows);
        std::vector<float> pacc(items * splits * n_rows * d.D);
        at::parallel_for(0, items * splits, 1, [&](int64_t begin, int64_t end) {
          for (int64_t w = begin; w < end; ++w) {
            const int64_t item = w / splits, sp = w % splits, h = item % d.kvh, b = item / d.kvh;
            const int64_t off = (item * splits + sp) * n_rows;
            const Partial part{pmax.data() + off, psum.data() + off, pacc.data() + off * d.D};
            attend_item_vec<scalar_t>(qp, kvp, rp, mp, op, d, b, h, 0, 1, static_cast<float>(scale), has_cap,
                                      static_cast<float>(cap), sp * d.nb / splits, (sp + 1) * d.nb / splits, &part);
          }
        });
        at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item) {
            const int64_t off = item * splits * n_rows;
            combine_splits<scalar_t>(pmax.data() + off, psum.data() + off, pacc.data() + off * d.D, splits, n_rows,
                                     d.D, op, d, item / d.kvh, item % d.kvh);
          }
        });
        return;
      }
    }
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t tile = item % tiles, h = (item / tiles) % d.kvh, b = item / (tiles * d.kvh);
        const int64_t q0 = tile * kQueryTile, q1 = std::min(d.Q, q0 + kQueryTile);
        if constexpr (kVectorized<scalar_t>) {
          if (vectorize) {
            attend_item_vec<scalar_t>(qp, kvp, rp, mp, op, d, b, h, q0, q1, static_cast<float>(scale), has_cap,
                                      static_cast<float>(cap), 0, d.nb, nullptr);
            continue;
          }
        }
        attend_item<scalar_t>(qp, kvp, rp, mp, op, d, b, h, q0, q1, static_cast<float>(scale), has_cap,
                              static_cast<float>(cap));
      }
    });
  });
  return out;
}
