// bf16 linear y = x W^T (+ b) for the CPU decoder: the weight re-laid out once into blocks of 64 output columns,
// [N/64][K/2][64][2], so that one `vdpbf16ps` multiplies 16 columns by a pair of x's elements and a block streams
// through memory in order. Accumulation in fp32, rounded once to bf16 (nearest even) at the store.
//
// Why not oneDNN's pre-packed linear (what inductor's freezing uses): at decode's few rows it streamed the weights
// at 16-25 GB/s here, and a 135M model's 120 small products each paid its dispatch. This kernel reads them at the
// memory's rate at 1-4 rows and keeps level with oneDNN from 128 rows up (Zen 5 host: 794 vs 815 GFLOP/s at 1,000
// rows, one layer's shapes), so one packed copy serves decode and prefill. A gated MLP's gate/up projection takes
// the same kernel with its columns paired (pack_gated_weight) and silu(gate) * up applied as they are stored.
#include "fused_ops.h"

#include <immintrin.h>

#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <vector>

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
// The gated epilogue (GATED): tiles 0-1 hold 32 columns of the gate and tiles 2-3 the same columns of the up
// projection (pack_gated_weight's order); what is stored is silu(gate) * up for those 32 columns, rounded as
// packed_linear's output followed by silu_mul (fused_cpu.cpp) round it, so the two paths agree bit for bit.
template <int MR, int NT, bool PF, bool GATED = false>
void tiles_product(const bf16* w, const bf16* x, int64_t K, const float* bias, bf16* out, int64_t ldo, int valid,
                   PrefetchCursor* pf) {
  static_assert(!GATED || NT == 4, "the gated epilogue pairs tiles 0-1 with 2-3");
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
  if constexpr (GATED) {
    for (int m = 0; m < MR; ++m) {
      for (int j = 0; j < 2; ++j) {
        const int lanes = std::clamp(valid - 16 * j, 0, 16);
        // gate and up rounded as the plain product stores them, then silu_mul's arithmetic and rounding
        const __m512 gate = tandem_simd::widen16((__m256i)_mm512_cvtneps_pbh(acc[m][j]));
        const __m512 up = tandem_simd::widen16((__m256i)_mm512_cvtneps_pbh(acc[m][2 + j]));
        const __m256i v = tandem_simd::bf16_bits16(tandem_simd::silu_mul16(gate, up, out));
        _mm256_mask_storeu_epi16(out + m * ldo + 16 * j, __mmask16((1u << lanes) - 1), v);
      }
    }
    return;
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NT; ++j) {
      const int lanes = std::clamp(valid - 16 * j, 0, 16);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(acc[m][j]);
      _mm256_mask_storeu_epi16(out + m * ldo + 16 * j, __mmask16((1u << lanes) - 1), v);
    }
  }
}

template <int NT, bool PF, bool GATED = false>
void rows_times_tiles(const bf16* w, const bf16* x, int64_t rows, int64_t K, const float* bias, bf16* out,
                      int64_t ldo, int valid, PrefetchCursor* pf) {
  int64_t m = 0;
  for (; m + 6 <= rows; m += 6)
    tiles_product<6, NT, PF, GATED>(w, x + m * K, K, bias, out + m * ldo, ldo, valid, pf);
  const bf16* xr = x + m * K;
  bf16* o = out + m * ldo;
  switch (rows - m) {
    case 1: tiles_product<1, NT, PF, GATED>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 2: tiles_product<2, NT, PF, GATED>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 3: tiles_product<3, NT, PF, GATED>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 4: tiles_product<4, NT, PF, GATED>(w, xr, K, bias, o, ldo, valid, pf); break;
    case 5: tiles_product<5, NT, PF, GATED>(w, xr, K, bias, o, ldo, valid, pf); break;
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

namespace {

// The work loop of packed_linear and (GATED) packed_linear_silu_mul, into `od` [M, n].
//
// Work items: (block, chunk of rows), block-major, so that a thread's consecutive items reuse a block from cache;
// split among the threads in ranges with stealing (csrc/parallel.h). When they do not divide evenly among the
// threads (a 576-wide product at decode: 9 blocks), each block of a plain product is split into two halves of 32
// columns, which stream the same bytes in two interleaved parts. A gated block gives 32 output columns.
template <bool GATED>
void run_product(const bf16* xd, const bf16* wd, const float* bd, bf16* od, int64_t M, int64_t K, int64_t blocks,
                 int64_t n, const LinePrefetch* prefetch) {
  const int64_t chunk = M <= kRowChunk ? M : kRowChunk, chunks = (M + chunk - 1) / chunk;
  const int64_t parts = GATED || (blocks * chunks) % at::get_num_threads() == 0 ? 1 : 2, width = kBlock / parts;
  const int64_t items = blocks * parts * chunks;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const bool prefetching = prefetch != nullptr && prefetch->threads == threads;
  tandem_parallel::for_each_item(items, [&](int64_t item) {
    const int64_t part = item / chunks, b = part / parts, c0 = b * kBlock + (part % parts) * width;
    const int64_t r0 = (item % chunks) * chunk, rows = std::min(chunk, M - r0);
    const int64_t out_col = GATED ? b * (kBlock / 2) : c0;
    const int valid = int(std::clamp<int64_t>(n - out_col, 0, GATED ? kBlock / 2 : width));
    const bf16* w = wd + b * K * kBlock + (c0 - b * kBlock) * 2;
    const float* bias_at = bd == nullptr ? nullptr : bd + c0;
    const bf16* xr = xd + r0 * K;
    bf16* o = od + r0 * n + out_col;
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
      } else if (GATED || parts == 1) {
        rows_times_tiles<4, true, GATED>(w, xr, rows, K, bias_at, o, n, valid, &pf);
      } else {
        rows_times_tiles<2, true>(w, xr, rows, K, bias_at, o, n, valid, &pf);
      }
      return;
    }
    if (valid == 0) return;
    if (GATED || parts == 1) {
      rows_times_tiles<4, false, GATED>(w, xr, rows, K, bias_at, o, n, valid, nullptr);
    } else {
      rows_times_tiles<2, false>(w, xr, rows, K, bias_at, o, n, valid, nullptr);
    }
  });
}

void check_product(const at::Tensor& x, const at::Tensor& packed, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, what,
              ": x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == x.size(1) && packed.size(2) == kBlock &&
              packed.size(3) == 2 && packed.scalar_type() == at::kBFloat16, what,
              ": the packed weight does not match x");
}

}  // namespace

// x [M, K] bf16 contiguous, `packed` from pack_linear_weight, `n` the real output width, bias (optional) fp32 padded
// like the weight to a multiple of 64: returns [M, n].
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, int64_t n, std::optional<at::Tensor> bias,
                         const LinePrefetch* prefetch) {
  check_product(x, packed, "packed_linear");
  TORCH_CHECK(packed.size(0) * kBlock >= n, "packed_linear: the packed weight has fewer than n columns");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                        bias->numel() == blocks * kBlock), "packed_linear: bias must be fp32, padded to the blocks");
  auto out = at::empty({M, n}, x.options());
  if (M == 0) return out;
  run_product<false>(x.data_ptr<bf16>(), packed.data_ptr<bf16>(), bias ? bias->data_ptr<float>() : nullptr,
                     out.data_ptr<bf16>(), M, K, blocks, n, prefetch);
  return out;
}

// W [2I, K] bf16 (gate rows, then up rows; I a multiple of 32) -> pack_linear_weight's layout with each 64-column
// block holding 32 gate columns and the same 32 up columns.
at::Tensor pack_gated_weight(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 64 == 0, "pack_gated_weight: [2I, K] with I a multiple of 32");
  const int64_t inter = weight.size(0) / 2;
  std::vector<at::Tensor> halves;
  for (int64_t c = 0; c < inter; c += kBlock / 2) {
    halves.push_back(weight.narrow(0, c, kBlock / 2));
    halves.push_back(weight.narrow(0, inter + c, kBlock / 2));
  }
  return pack_linear_weight(at::cat(halves, 0));
}

// silu(x G^T) * (x U^T) for x [M, K] and `packed` from pack_gated_weight: [M, inter], bit for bit what
// silu_mul(packed_linear(x, W)) gives on the plainly packed [G; U].
at::Tensor packed_linear_silu_mul(at::Tensor x, at::Tensor packed, int64_t inter, const LinePrefetch* prefetch) {
  check_product(x, packed, "packed_linear_silu_mul");
  TORCH_CHECK(inter % (kBlock / 2) == 0 && packed.size(0) * (kBlock / 2) == inter,
              "packed_linear_silu_mul: the packed weight is not a gated [2 * inter, K] one");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  auto out = at::empty({M, inter}, x.options());
  if (M == 0) return out;
  run_product<true>(x.data_ptr<bf16>(), packed.data_ptr<bf16>(), nullptr, out.data_ptr<bf16>(), M, K, blocks, inter,
                    prefetch);
  return out;
}
