"""A/B of the gated MLP's two CPU paths, alternated in one process: the plain packed linear of [gate; up] followed by
``silu_mul``, against the gated product (``packed_linear_silu_mul``, the activation applied as the product stores
its columns). Both then run the down projection; both give the same bits.

    python benchmarks/gated_mlp_ab.py [--threads 2] [--rounds 8] [--out results/gated_mlp_ab.json]

SmolLM2-135M's MLP shapes (576 -> 2 x 1,536 -> 576), 30 layers with their own random weights (so the weights stream
from memory as a model's do), at 2,048 rows (a prefill step) and 32 rows (a decode step of 32 streams). Prints the
median time of the 30 MLPs per path and the ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, LAYERS = 576, 1536, 30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="alternations per row count (x4 at 32 rows)")
    ap.add_argument("--out", default="results/gated_mlp_ab.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tandem.engine.ops import fused

    ops = fused.load()
    g = torch.Generator().manual_seed(0)
    gate_up = [(torch.randn(2 * INTER, HIDDEN, generator=g) * 0.05).to(torch.bfloat16) for _ in range(LAYERS)]
    down = [ops.pack_linear_weight((torch.randn(HIDDEN, INTER, generator=g) * 0.05).to(torch.bfloat16))
            for _ in range(LAYERS)]
    plain = [ops.pack_linear_weight(w) for w in gate_up]
    gated = [ops.pack_gated_weight(w) for w in gate_up]
    rows = []
    print(f"{'rows':>6s} {'linear + silu_mul ms':>22s} {'gated ms':>10s} {'ratio':>7s}", flush=True)
    for m in (2048, 32):
        x = torch.randn(m, HIDDEN, generator=g).to(torch.bfloat16)

        def separate(x=x) -> torch.Tensor:
            for layer in range(LAYERS):
                act = ops.silu_mul(ops.packed_linear(x, plain[layer], 2 * INTER, None))
                out = ops.packed_linear(act, down[layer], HIDDEN, None)
            return out

        def fused_product(x=x) -> torch.Tensor:
            for layer in range(LAYERS):
                act = ops.packed_linear_silu_mul(x, gated[layer], INTER)
                out = ops.packed_linear(act, down[layer], HIDDEN, None)
            return out

        assert torch.equal(separate(), fused_product())
        arms = {"separate": separate, "gated": fused_product}
        samples = {name: [] for name in arms}
        for r in range(args.rounds * (4 if m < 100 else 1)):
            for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                t0 = time.perf_counter()
                arms[name]()
                samples[name].append(time.perf_counter() - t0)
        med = {name: 1000 * statistics.median(v) for name, v in samples.items()}
        row = {"rows": m, "separate_ms": med["separate"], "gated_ms": med["gated"],
               "speedup": med["separate"] / med["gated"],
               "samples_ms": {name: [1000 * t for t in v] for name, v in samples.items()}}
        rows.append(row)
        print(f"{m:6d} {med['separate']:22.2f} {med['gated']:10.2f} {row['speedup']:7.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "layers": LAYERS, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
