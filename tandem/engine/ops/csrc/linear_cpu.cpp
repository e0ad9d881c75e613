// bf16 linear y = x W^T (+ b) for the CPU decoder: the weight re-laid out once into blocks of 64 output columns,
// [N/64][K/2][64][2], so that one `vdpbf16ps` multiplies 16 columns by a pair of x's elements and a block streams
// through memory in order. Accumulation in fp32, rounded once to bf16 (nearest even) at the store.
//
// Why not oneDNN's pre-packed linear (what inductor's freezing uses): at decode's few rows it streamed the weights
// at 16-25 GB/s here, and a 135M model's 120 small products each paid its dispatch. This kernel reads them at the
// memory's rate at 1-4 rows and keeps level with oneDNN from 128 rows up (794 vs 815 GFLOP/s at 1,000 rows, one
// layer's shapes), so one packed copy serves decode and prefill.
#include "fused_ops.h"

#include <immintrin.h>

#include "parallel.h"

#include <algorithm>
#include <cstdint>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kBlock = 64;    // output columns per packed block: four 16-lane accumulators
constexpr int64_t kRowChunk = 24;  // rows of x per work item when a product has many (a multiple of 6)

// A work item's share of a LinePrefetch, one line per step of the product's inner loop (one per 24 `vdpbf16ps` in
// the 6 x 4 tile), the rest at the item's end. NOTE: paced, because a burst does not land: 30 layers' decode
// attention at 32 x 192 keys took 9.5 ms from memory, 8.2 after a burst of T1 prefetches of its rows from the threads
// that then read them, 4.8 after plain loads of the same lines.
struct PrefetchCursor {
  const char* const* spans;
  int64_t span_lines, span, line, left;
  inline void step() {
    if (left <= 0) return;
    _mm_prefetch(spans[span] + 64 * line, _MM_HINT_T1);
    --left;
    if (++line == span_lines) {
      line = 0;
      ++span;
    }
  }
};

// Rows [0, MR) of x times NT 16-column tiles of a packed block (`w` at the first of them): MR x NT accumulators,
// x's pairs broadcast from memory. `valid`: how many of the NT * 16 columns exist.
template <int MR, int NT, bool PF>
void tiles_product(const bf16* w, const bf16* x, int64_t K, const float* bias, bf16* out, int64_t ldo, int valid,
                   PrefetchCursor* pf) {
  // NOTE: the accumulators start from registers: a select between zero and the bias made GCC build them in a
  // stack array (a memset, then 24 loads), ~1% of a decode step's samples.
  __m512 acc[MR][NT];
  if (bias == nullptr) {
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
  } else {
    for (int j = 0; j < NT; ++j) {
      const __m512 b = _mm512_loadu_ps(bias + 16 * j);
      for (int m = 0; m < MR; ++m) acc[m][j] = b;
    }
  }
  const int32_t* rows[MR];
  for (int m = 0; m < MR; ++m) rows[m] = reinterpret_cast<const int32_t*>(x + m * K);
  for (int64_t p = 0; p < K / 2; ++p) {
    const bf16* wp = w + p * 2 * kBlock;
    if constexpr (PF) pf->step();
    __m512bh wt[NT];
    for (int j = 0; j < NT; ++j) wt[j] = (__m512bh)_mm512_loadu_si512(wp + 32 * j);
    for (int m = 0; m < MR; ++m) {
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(rows[m][p]);
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wt[j], pair);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NT; ++j) {
      const int lanes = std::clamp(valid - 16 * j, 0, 16);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(acc[m][j]);
      _mm256_mask_storeu_epi16(out + m * ldo + 16 * j, __mmask16((1u << lanes) - 1), v);
    }
  }
}

template <int NT, bool PF>
void rows_times_tiles(const bf16* w, const bf16* x, int64_t rows, int64_t K, const float* bias, bf16* out,
                      int64_t ldo, int valid, PrefetchCursor* pf) {
  int64_t m = 0;
  for (; m + 6 <= rows; m += 6) tiles_product<6, NT, PF>(w, x + m * K, K, bias, out + m * ldo, ldo, valid, pf);
  const bf16* xr = x + m * K;
  bf16* o = out + m * ldo;
  switch (rows - m) {
    case 1: tiles_product<1, NT, PF>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 2: tiles_product<2, NT, PF>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 3: tiles_product<3, NT, PF>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 4: tiles_product<4, NT, PF>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 5: tiles_product<5, NT, PF>(w, xr, K, bias, o, ldo, valid, pf); break;
    default: break;
  }
  if constexpr (PF)
    while (pf->left > 0) pf->step();
}

}  // namespace

// W [N, K] bf16 (K even) -> [ceil(N/64), K/2, 64, 2], the columns past N zero.
at::Tensor pack_linear_weight(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_linear_weight: bf16 [N, K]");
  TORCH_CHECK(weight.size(1) % 2 == 0, "pack_linear_weight: K must be even");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kBlock - 1) / kBlock;
  auto packed = at::zeros({blocks, K / 2, kBlock, 2}, w.options());
  const int32_t* src = reinterpret_cast<const int32_t*>(w.data_ptr<bf16>());  // a pair of a row's elements
  int32_t* dst = reinterpret_cast<int32_t*>(packed.data_ptr<bf16>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t n = b * kBlock; n < std::min(N, (b + 1) * kBlock); ++n) {
        for (int64_t p = 0; p < K / 2; ++p) dst[(b * (K / 2) + p) * kBlock + (n - b * kBlock)] = src[n * (K / 2) + p];
      }
    }
  });
  return packed;
}

// x [M, K] bf16 contiguous, `packed` from pack_linear_weight, `n` the real output width, bias (optional) fp32 padded
// like the weight to a multiple of 64: returns [M, n].
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, int64_t n, std::optional<at::Tensor> bias,
                         const LinePrefetch* prefetch) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "packed_linear: x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == x.size(1) && packed.size(2) == kBlock &&
              packed.size(0) * kBlock >= n, "packed_linear: the packed weight does not match x");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                        bias->numel() == blocks * kBlock), "packed_linear: bias must be fp32, padded to the blocks");
  auto out = at::empty({M, n}, x.options());
  if (M == 0) return out;
  const bf16* xd = x.data_ptr<bf16>();
  const bf16* wd = packed.data_ptr<bf16>();
  const float* bd = bias ? bias->data_ptr<float>() : nullptr;
  bf16* od = out.data_ptr<bf16>();
  // Work items: (block, chunk of rows), block-major, so that a thread's consecutive items reuse a block from cache;
  // split among the threads in ranges with stealing (csrc/parallel.h). When they do not divide evenly among the
  // threads (a 576-wide product at decode: 9 blocks), each block is split into two halves of 32 columns, which
  // stream the same bytes in two interleaved parts.
  const int64_t chunk = M <= kRowChunk ? M : kRowChunk, chunks = (M + chunk - 1) / chunk;
  const int64_t parts = (blocks * chunks) % at::get_num_threads() == 0 ? 1 : 2, width = kBlock / parts;
  const int64_t items = blocks * parts * chunks;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const bool prefetching = prefetch != nullptr && prefetch->threads == threads;
  tandem_parallel::for_each_item(items, [&](int64_t item) {
    const int64_t part = item / chunks, b = part / parts, c0 = b * kBlock + (part % parts) * width;
    const int64_t r0 = (item % chunks) * chunk, rows = std::min(chunk, M - r0);
    const int valid = int(std::clamp<int64_t>(n - c0, 0, width));
    const bf16* w = wd + b * K * kBlock + (c0 - b * kBlock) * 2;
    const float* bias_at = bd == nullptr ? nullptr : bd + c0;
    if (prefetching) {
      // The thread whose range (tandem_parallel::for_each_item) holds this item, and the item's place in it: its
      // share of that thread's lines.
      int64_t t = 0;
      while (items * (t + 1) / threads <= item) ++t;
      const int64_t lo = items * t / threads, len = items * (t + 1) / threads - lo;
      const int64_t b0 = prefetch->bounds[t], span = prefetch->lines[t];
      const double f = prefetch->to - prefetch->from;
      const int64_t first = b0 + int64_t(span * (prefetch->from + f * (item - lo) / len));
      const int64_t last = b0 + int64_t(span * (prefetch->from + f * (item - lo + 1) / len));
      PrefetchCursor pf{prefetch->spans, prefetch->span_lines, first / prefetch->span_lines,
                        first % prefetch->span_lines, last - first};
      if (valid == 0) {
        while (pf.left > 0) pf.step();
      } else if (parts == 1) {
        rows_times_tiles<4, true>(w, xd + r0 * K, rows, K, bias_at, od + r0 * n + c0, n, valid, &pf);
      } else {
        rows_times_tiles<2, true>(w, xd + r0 * K, rows, K, bias_at, od + r0 * n + c0, n, valid, &pf);
      }
      return;
    }
    if (valid == 0) return;
    if (parts == 1) {
      rows_times_tiles<4, false>(w, xd + r0 * K, rows, K, bias_at, od + r0 * n + c0, n, valid, nullptr);
    } else {
      rows_times_tiles<2, false>(w, xd + r0 * K, rows, K, bias_at, od + r0 * n + c0, n, valid, nullptr);
    }
  });
  return out;
}
