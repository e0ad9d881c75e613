// Work items split among the OpenMP threads in contiguous ranges, with stealing: a thread that finishes its own
// range takes the next unclaimed items of the others'.
//
// Why not a static split (`at::parallel_for`): on a host where the threads share their cores with the HTTP server,
// the client and the kernel, a thread that is descheduled for a few milliseconds holds up the whole product while
// the other waits at the barrier; and items of unequal size (a last partial chunk of rows) leave one thread idle.
// Why not one shared counter (OpenMP's dynamic schedule): a thread's items then interleave with the other's, and a
// weight stream that the hardware prefetcher followed through one contiguous range restarts at every item; a
// single-row product measured ~5% slower that way on a quiet machine and ~20% slower beside a busy process. Here a
// thread walks its own range in order and meets the others' only at the end.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace tandem_parallel {

struct alignas(64) Range {  // one cache line per range: the owners' cursors do not share a line
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

constexpr int64_t kMaxClaim = 4;         // items one claim takes at most
constexpr int64_t kClaimsPerRange = 32;  // fewer items than this many claims per range: claims of one item

// Calls fn(item) once for every item in [0, total), from the OpenMP threads (inline when there is one).
template <typename F>
void for_each_item(int64_t total, const F& fn) {
  if (total <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), total);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t item = 0; item < total; ++item) fn(item);
    return;
  }
  std::vector<Range> ranges(threads);
  for (int64_t t = 0; t < threads; ++t) {
    ranges[t].next.store(total * t / threads, std::memory_order_relaxed);
    ranges[t].end = total * (t + 1) / threads;
  }
  // Items are claimed a few at a time: every claim is a locked instruction, which on x86 waits for the thread's
  // pending stores to drain (an item's output rows, cold in cache), and one claim per item of a 2,048-row product
  // (~2 us items) spent ~6% of its time there (perf: the samples on `lock xadd`; 2.2% with claims of 4). One layer's
  // four products at 2,048 rows: 6.25 -> 6.04 ms (medians of 40, alternated in one process). A claim of up to
  // kMaxClaim items leaves the other threads at most that many of one range to wait for at the end.
  const int64_t claim = std::clamp<int64_t>(total / threads / kClaimsPerRange, 1, kMaxClaim);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    // NOTE: normally one range per thread; should the pool run fewer threads, a call takes several and the
    // stealing below still covers every range.
    for (int64_t own = first; own < last; ++own) {
      for (int64_t k = 0; k < threads; ++k) {
        Range& r = ranges[(own + k) % threads];
        while (r.next.load(std::memory_order_relaxed) < r.end) {
          const int64_t item = r.next.fetch_add(claim, std::memory_order_relaxed);
          for (int64_t i = item; i < std::min(item + claim, r.end); ++i) fn(i);
        }
      }
    }
  });
}

}  // namespace tandem_parallel
