// Intel AMX (Sapphire Rapids and later) for the CPU kernels: whether the process may use the tile unit, and the
// tile shapes a kernel loads. Kernels that use it are compiled with `__attribute__((target("amx-tile,amx-bf16")))`,
// so the extensions build on any x86-64 host and take the tiles only where `amx_granted()` says so.
//
// NOTE: a thread's tile shapes are only trusted within one call of a kernel: other code on the thread between two
// calls (oneDNN's AMX kernels, another of ours) loads shapes of its own or releases the tiles (TILERELEASE). A
// kernel therefore takes a fresh `amx_call()` number per call and loads its shapes once per thread and call.
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <immintrin.h>

#include <atomic>
#include <cstdint>

namespace tandem_amx {

// Whether this CPU has AMX-BF16 and Linux has granted this process the tile state (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA; the grant is process-wide).
inline bool amx_granted() {
  static const bool granted = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return granted;
}

// The 64-byte operand of LDTILECFG (palette 1): rows and bytes per row of tmm0-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int tile, int rows_, int bytes) {
    rows[tile] = uint8_t(rows_);
    colsb[tile] = uint16_t(bytes);
  }
};

// A number for this call of a kernel (see the NOTE above).
inline int64_t amx_call() {
  static std::atomic<int64_t> calls{0};
  return calls.fetch_add(1, std::memory_order_relaxed);
}

// Load `cfg` on this thread unless this call already loaded the shapes named `key` here.
__attribute__((target("amx-tile"))) inline void load_tiles(int64_t call, int64_t key, const TileConfig& cfg) {
  thread_local int64_t loaded_call = -1, loaded_key = -1;
  if (loaded_call == call && loaded_key == key) return;
  // NOTE: GCC 12 does not tell the optimiser that ldtilecfg reads its operand: without the barrier it dropped the
  // stores of the shapes (and the tile instructions then faulted as unconfigured).
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
  loaded_call = call;
  loaded_key = key;
}

}  // namespace tandem_amx
