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

#include "amx.h"
#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <atomic>
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

// The epilogue both paths store their fp32 sums through, 16 columns at a time, the first `lanes` of them: the sums
// rounded once to bf16 (any bias already in them: the AVX-512 path starts from it, AMX adds it after); or, for a
// gated product, silu(gate) * up with gate and up rounded as the plain product stores them, then silu_mul's
// arithmetic and rounding (fused_cpu.cpp), so the two agree bit for bit.
inline void store_columns(bf16* out, __m512 sums, int lanes) {
  _mm256_mask_storeu_epi16(out, __mmask16((1u << lanes) - 1), (__m256i)_mm512_cvtneps_pbh(sums));
}
inline void store_gated_columns(bf16* out, __m512 gate_sums, __m512 up_sums, int lanes) {
  const __m512 gate = tandem_simd::widen16((__m256i)_mm512_cvtneps_pbh(gate_sums));
  const __m512 up = tandem_simd::widen16((__m256i)_mm512_cvtneps_pbh(up_sums));
  _mm256_mask_storeu_epi16(out, __mmask16((1u << lanes) - 1),
                           tandem_simd::bf16_bits16(tandem_simd::silu_mul16(gate, up, out)));
}

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
  for (int m = 0; m < MR; ++m) {
    if constexpr (GATED) {
      for (int j = 0; j < 2; ++j)
        store_gated_columns(out + m * ldo + 16 * j, acc[m][j], acc[m][2 + j], std::clamp(valid - 16 * j, 0, 16));
    } else {
      for (int j = 0; j < NT; ++j) store_columns(out + m * ldo + 16 * j, acc[m][j], std::clamp(valid - 16 * j, 0, 16));
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

// ---- AMX (Intel Sapphire Rapids and later) ------------------------------------------------------------------------
// The same packed blocks feed the tile unit: a B tile is 16 of a block's K pairs for 16 of its columns, 64 bytes a
// row at a stride of one pair's 256 bytes ([K/2][64][2]), so one packed copy serves both paths. A work item of up to
// 16 rows takes its 32 or 64 columns in one pass (amx_wide); one of up to 32 rows as 2 x 2 fp32 tiles per 32 columns
// (tmm0-3), x's rows as two A tiles (tmm4-5) and two B tiles (tmm6-7) (amx_half); the sums go to a stack buffer and
// leave through the AVX-512 path's epilogue (store_columns, store_gated_columns), so the gated product still equals
// the plain one followed by silu_mul bit for bit. The tile unit sums in its own order: AMX products are not bit-identical
// to the AVX-512 ones, so a process uses one path for all its products (`linear_amx`).
//
// Measured here (2 vCPUs of a Xeon with AMX under KVM, SmolLM2's shapes, weights warm): this path 1,650-2,350 GFLOP/s
// at 32 rows and 2,100-2,400 at 2,048; oneDNN's AMX product 700-1,250 and 2,500-2,900; the AVX-512 path ~210.
constexpr int64_t kAmxRows = 32;    // rows of x per work item: two A tiles
constexpr int64_t kAmxMinRows = 4;  // fewer rows stream the weights faster on the AVX-512 path
constexpr int64_t kPanelRows = 512;  // rows of x per panel of a many-row product (see run_product)
// Products of up to this many rows go in 16-row items (amx_wide), whose weights stream from memory: decode steps at
// 64 streams 47.8 -> 46.7 ms with 64 here rather than 32 (with weights warm in cache, 32-row tiles are faster).
constexpr int64_t kWideRows = 64;
// 32 x 32 tiles take K in blocks of this many (a multiple of 32): the item's rows of x and the block's columns for
// one K block (12 + 24 KB at K block 192) stay in L1 for both halves of the block, the sums parked in the item's
// fp32 buffer between K blocks (an exact round trip: the same bits as one pass). A 2,048-row layer's four products
// 6.1-6.7 -> 5.8-5.9 ms (blocks of 128: no better; 256: 6.5).
constexpr int64_t kAmxKBlock = 192;
// A gated product of more than kWideRows rows takes items of this many rows: two 32-row halves per K block of
// kTallKBlock, so the block's columns for one K block (16 KB) serve both from L1. Its silu epilogue makes items
// long; measured here (gate/up of 576 -> 2 x 1,536, alternated in one process): 3.86-3.89 -> 3.59-3.63 ms at 2,048
// rows, 1.95 -> 1.81 at 1,024, level at 128 and 512. Plain products gained nothing this way (level at 2,048 rows,
// 10-25% slower at 128-512), so they keep 32-row items.
constexpr int64_t kTallRows = 64;
constexpr int64_t kTallKBlock = 128;

// The tile shapes for an item of r0 (+ r1) rows: C tmm0-1 (rows 0-15) and tmm2-3 (16-31), A tmm4-5, B tmm6-7.
inline void configure_tiles(int64_t call, int r0, int r1) {
  tandem_amx::TileConfig cfg;
  for (int t : {0, 1, 4}) cfg.set(t, r0, 64);
  if (r1 > 0)
    for (int t : {2, 3, 5}) cfg.set(t, r1, 64);
  for (int t : {6, 7}) cfg.set(t, 16, 64);
  tandem_amx::load_tiles(call, r0 * 64 + r1, cfg);
}

// x rows [0, 16) (and [16, 32) with TWO) times 32 columns of a block (`w` at the first) over x's columns [k0, k1)
// (multiples of 32), into acc [32][64] fp32 at column `col`: from zero at k0 = 0, else on from what acc holds.
template <bool TWO, bool PF>
__attribute__((target("amx-tile,amx-bf16"))) void amx_half(const bf16* w, const bf16* x, int64_t K, int64_t k0,
                                                           int64_t k1, float* acc, int col, PrefetchCursor* pf) {
  constexpr int64_t ldc = kBlock * int64_t(sizeof(float));
  if (k0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (TWO) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, acc + col, ldc);
    _tile_loadd(1, acc + col + 16, ldc);
    if constexpr (TWO) {
      _tile_loadd(2, acc + 16 * kBlock + col, ldc);
      _tile_loadd(3, acc + 16 * kBlock + col + 16, ldc);
    }
  }
  const int64_t ldx = K * int64_t(sizeof(bf16)), ldw = 2 * kBlock * int64_t(sizeof(bf16));
  for (int64_t k = k0; k < k1; k += 32) {
    const bf16* wk = w + k * kBlock;  // pair k / 2
    _tile_loadd(6, wk, ldw);
    _tile_loadd(7, wk + 32, ldw);
    _tile_loadd(4, x + k, ldx);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO) {
      _tile_loadd(5, x + 16 * K + k, ldx);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if constexpr (PF) pf->step();
  }
  _tile_stored(0, acc + col, ldc);
  _tile_stored(1, acc + col + 16, ldc);
  if constexpr (TWO) {
    _tile_stored(2, acc + 16 * kBlock + col, ldc);
    _tile_stored(3, acc + 16 * kBlock + col + 16, ldc);
  }
}

// Up to 16 rows of x times NT 16-column tiles of a block (`w` at the first) in one pass over K: C tmm0-3, A tmm4, B
// tmm5-7 in turn. For products of few rows, whose weights stream from memory: the pass reads each 256-byte pair row
// of the block whole, in order, where two 32-column passes read half of every row twice over. Decode steps at
// 32 x (128 + 128) here: 29.2 -> 27.0 ms; the LM head at 32 rows 3.3 -> 3.0 ms.
template <int NT>
__attribute__((target("amx-tile,amx-bf16"))) void amx_wide(const bf16* w, const bf16* x, int64_t K, float* acc) {
  static_assert(NT == 2 || NT == 4, "a block's 32 or 64 columns");
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NT == 4) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t ldx = K * int64_t(sizeof(bf16)), ldw = 2 * kBlock * int64_t(sizeof(bf16));
  for (int64_t k = 0; k < K; k += 32) {
    const bf16* wk = w + k * kBlock;
    _tile_loadd(4, x + k, ldx);
    _tile_loadd(5, wk, ldw);
    _tile_loadd(6, wk + 32, ldw);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    if constexpr (NT == 4) {
      _tile_loadd(7, wk + 64, ldw);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, wk + 96, ldw);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  constexpr int64_t ldc = kBlock * int64_t(sizeof(float));
  _tile_stored(0, acc, ldc);
  _tile_stored(1, acc + 16, ldc);
  if constexpr (NT == 4) {
    _tile_stored(2, acc + 32, ldc);
    _tile_stored(3, acc + 48, ldc);
  }
}

// The tile shapes of amx_wide for `rows` rows (a key apart from configure_tiles's).
inline void configure_wide_tiles(int64_t call, int rows) {
  tandem_amx::TileConfig cfg;
  for (int t : {0, 1, 2, 3, 4}) cfg.set(t, rows, 64);
  for (int t : {5, 6, 7}) cfg.set(t, 16, 64);
  tandem_amx::load_tiles(call, 1 << 20 | rows, cfg);
}

// `rows` (<= 32; up to kTallRows in a gated product's tall items) rows of x times columns [c, c + width) of a packed
// block (`w` at the block's first column), stored as tiles_product stores them.
template <bool PF, bool GATED>
void amx_item(int64_t product, const bf16* w, const bf16* x, int64_t rows, int64_t K, int c, int width,
              const float* bias, bf16* out, int64_t ldo, int valid, PrefetchCursor* pf) {
  alignas(64) float acc[kTallRows * kBlock];
  if (rows <= 16) {
    configure_wide_tiles(product, int(rows));
    if (width == kBlock) {
      amx_wide<4>(w + 2 * c, x, K, acc);
    } else {
      amx_wide<2>(w + 2 * c, x, K, acc);
    }
  } else {
    // Per K block, the item's rows in 32-row halves (two in a gated product's tall items: rows [32, rows) in acc's
    // second half), each half times the block's 32-column halves; the tile shapes set again only when they change.
    const int64_t k_block = rows > kAmxRows ? kTallKBlock : kAmxKBlock;
    int shapes = -1;
    for (int64_t k0 = 0; k0 < K; k0 += k_block) {
      const int64_t k1 = std::min<int64_t>(K, k0 + k_block);
      for (int64_t sub = 0; sub < rows; sub += kAmxRows) {
        const int sub_rows = int(std::min<int64_t>(kAmxRows, rows - sub));
        const int r0 = std::min(sub_rows, 16), r1 = sub_rows - r0;
        if (r0 * 64 + r1 != shapes) {
          configure_tiles(product, r0, r1);
          shapes = r0 * 64 + r1;
        }
        for (int half = c; half < c + width; half += 32) {
          if (r1 > 0) {
            amx_half<true, PF>(w + 2 * half, x + sub * K, K, k0, k1, acc + sub * kBlock, half - c, pf);
          } else {
            amx_half<false, PF>(w + 2 * half, x + sub * K, K, k0, k1, acc + sub * kBlock, half - c, pf);
          }
        }
      }
    }
  }
  if constexpr (PF)
    while (pf->left > 0) pf->step();
  for (int64_t m = 0; m < rows; ++m) {
    const float* a = acc + m * kBlock;
    if constexpr (GATED) {
      for (int j = 0; j < 2; ++j)
        store_gated_columns(out + m * ldo + 16 * j, _mm512_load_ps(a + 16 * j), _mm512_load_ps(a + 32 + 16 * j),
                            std::clamp(valid - 16 * j, 0, 16));
    } else {
      for (int j = 0; j < width / 16; ++j) {
        __m512 v = _mm512_load_ps(a + 16 * j);
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * j));
        store_columns(out + m * ldo + 16 * j, v, std::clamp(valid - 16 * j, 0, 16));
      }
    }
  }
}

}  // namespace

bool linear_amx_available() { return tandem_amx::amx_granted(); }

namespace {

std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{linear_amx_available()};
  return on;
}

}  // namespace

bool linear_amx() { return amx_switch().load(std::memory_order_relaxed); }

void set_linear_amx(bool on) {
  TORCH_CHECK(!on || linear_amx_available(), "set_linear_amx: this CPU (or kernel) gives no AMX tiles");
  amx_switch().store(on);
}

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
  const bool amx = M >= kAmxMinRows && K % 32 == 0 && linear_amx();
  // (products of up to kWideRows rows in items of 16 rows, each one pass over its block: see amx_wide)
  const int64_t most = amx ? (M <= kWideRows ? 16 : GATED ? kTallRows : kAmxRows) : kRowChunk;
  const int64_t product = amx ? tandem_amx::amx_call() : 0;
  const int64_t chunk = M <= most ? M : most, chunks = (M + chunk - 1) / chunk;
  const int64_t parts = GATED || (blocks * chunks) % at::get_num_threads() == 0 ? 1 : 2, width = kBlock / parts;
  const int64_t items = blocks * parts * chunks;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const bool prefetching = prefetch != nullptr && prefetch->threads == threads;
  // On AMX, products of many rows go panel by panel: kPanelRows rows (in L2) against every block, so x
  // is not re-read from L3 once per block. Block-major, a 2,048-row product re-read its 2.4 MB of x per block: one
  // layer's four products at 2,048 rows took 8.4 ms that way, 6.4 ms in panels of 512 rows (7.1 ms in panels of 256;
  // oneDNN's AMX products 5.3 ms), alternating in one process.
  const int64_t panel_chunks = kPanelRows / chunk;
  const int64_t panel = amx && chunks > panel_chunks ? panel_chunks : chunks;
  const int64_t panel_items = blocks * parts * panel;
  tandem_parallel::for_each_item(items, [&](int64_t item) {
    const int64_t first_chunk = item / panel_items * panel, in_panel = std::min(panel, chunks - first_chunk);
    const int64_t within = item % panel_items;
    const int64_t part = within / in_panel, b = part / parts, c0 = b * kBlock + (part % parts) * width;
    const int64_t r0 = (first_chunk + within % in_panel) * chunk, rows = std::min(chunk, M - r0);
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
      } else if (amx) {
        amx_item<true, GATED>(product, wd + b * K * kBlock, xr, rows, K, int(c0 - b * kBlock), int(width), bias_at, o, n,
                              valid, &pf);
      } else if (GATED || parts == 1) {
        rows_times_tiles<4, true, GATED>(w, xr, rows, K, bias_at, o, n, valid, &pf);
      } else {
        rows_times_tiles<2, true>(w, xr, rows, K, bias_at, o, n, valid, &pf);
      }
      return;
    }
    if (valid == 0) return;
    if (amx) {
      amx_item<false, GATED>(product, wd + b * K * kBlock, xr, rows, K, int(c0 - b * kBlock), int(width), bias_at, o, n, valid,
                             nullptr);
    } else if (GATED || parts == 1) {
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
