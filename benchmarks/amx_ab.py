"""The CPU kernels' two paths, AMX tiles vs AVX-512 only, alternated in one process (on a CPU with AMX).

    python benchmarks/amx_ab.py [--threads 2] [--rounds 3] [--out results/amx_ab.json]

Linears: SmolLM2's four layer products and its LM head through ``packed_linear`` with ``set_linear_amx`` on and off,
beside oneDNN's pre-packed product (what ``PackedLinear`` uses without the fused ops; on such a CPU oneDNN takes the
tile unit too), at 1, 32 and 2,048 rows, weights warm. Prefill attention: ``prefill_attention_dense`` with
``set_attention_amx`` on and off on ragged chunk sets (4 x 1,000 tokens, 16 x 128, head sizes 64 and 128). Each
figure is the best of ``--rounds`` rounds, the arms alternating within every round. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ATTENTION = {  # name: (chunks, tokens each, query heads, KV heads, head size)
    "4 x 1,000 tokens, 9/3 heads, d 64": (4, 1000, 9, 3, 64),
    "16 x 128 tokens, 9/3 heads, d 64": (16, 128, 9, 3, 64),
    "2 x 700 tokens, 8/8 heads, d 128": (2, 700, 8, 8, 128),
}


def best_of(fn, rounds_s: float) -> float:
    """Seconds per call: repeat ``fn`` for about ``rounds_s`` seconds after one untimed call."""
    fn()
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= rounds_s and calls >= 3:
            return elapsed / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="results/amx_ab.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tandem.engine.attention.cpu_paged as cpu_paged
    from tandem.engine.ops import fused

    ops = fused.load()
    cpu_paged.CpuPagedBackend.create()
    attention = cpu_paged._extension
    if ops is None or not ops.module.linear_amx_available():
        print("this CPU (or kernel) gives no AMX tiles: nothing to compare", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    rows_out = []
    print(f"{'linear':22s} {'AMX ms':>9s} {'AVX-512 ms':>11s} {'oneDNN ms':>10s} {'AMX GFLOP/s':>12s} {'vs AVX':>7s} "
          f"{'vs oneDNN':>9s}", flush=True)
    for rows in (1, 32, 2048):
        for name, (n, k) in SHAPES.items():
            w, x = rand(n, k) * 0.05, rand(rows, k)
            ours, onednn = ops.pack_linear_weight(w), torch.ops.mkldnn._reorder_linear_weight(w, None)
            best = {"amx": float("inf"), "avx512": float("inf"), "onednn": float("inf")}
            budget = 0.05 if rows * n * k < 2e8 else 0.3
            for _ in range(args.rounds):
                for arm in best:
                    if arm == "onednn":
                        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")  # noqa: E731
                    else:
                        ops.module.set_linear_amx(arm == "amx")
                        fn = lambda: ops.packed_linear(x, ours, n, None)  # noqa: E731
                    best[arm] = min(best[arm], best_of(fn, budget))
            ops.module.set_linear_amx(True)
            gflops = 2 * rows * n * k / best["amx"] / 1e9
            row = {"kind": "linear", "rows": rows, "shape": name, "n": n, "k": k,
                   **{f"{arm}_ms": 1e3 * v for arm, v in best.items()}, "amx_gflops": gflops}
            rows_out.append(row)
            print(f"{rows:5d} rows {name:11s} {row['amx_ms']:9.3f} {row['avx512_ms']:11.3f} {row['onednn_ms']:10.3f} "
                  f"{gflops:12.0f} {best['avx512'] / best['amx']:6.2f}x {best['onednn'] / best['amx']:8.2f}x",
                  flush=True)

    print(f"\n{'prefill attention':36s} {'AMX ms':>9s} {'AVX-512 ms':>11s} {'AMX GFLOP/s':>12s} {'vs AVX':>7s}")
    for name, (chunks, tokens, heads, kv_heads, d) in ATTENTION.items():
        q, k, v = rand(chunks * tokens, heads, d), rand(chunks * tokens, kv_heads, d), rand(chunks * tokens, kv_heads, d)
        starts, lens = torch.arange(chunks) * tokens, torch.full((chunks,), tokens)
        best = {"amx": float("inf"), "avx512": float("inf")}
        for _ in range(args.rounds):
            for arm in best:
                attention.set_attention_amx(arm == "amx")
                best[arm] = min(best[arm], best_of(
                    lambda: attention.prefill_attention_dense(q, k, v, starts, lens, d ** -0.5, 0, False, 0.0), 0.2))
        attention.set_attention_amx(True)
        gflops = chunks * tokens * tokens / 2 * heads * d * 4 / best["amx"] / 1e9
        row = {"kind": "prefill_attention", "case": name, **{f"{arm}_ms": 1e3 * t for arm, t in best.items()},
               "amx_gflops": gflops}
        rows_out.append(row)
        print(f"{name:36s} {row['amx_ms']:9.2f} {row['avx512_ms']:11.2f} {gflops:12.0f} "
              f"{best['avx512'] / best['amx']:6.2f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
