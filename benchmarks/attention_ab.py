"""A/B of attention backends on the real model's step, alternating in one process (noise hits both arms alike).

    python benchmarks/attention_ab.py [--threads 2] [--rounds 5] [--out results/attention_ab.json]

Times the model's forward (embedding, 30 layers, final norm; no sampling, no scheduler) for: decode steps at
batch 1 and 32 over a 512-token context each, a 1,000-token fresh prefill, and a 256-token chunk over a 768-token
cached prefix; each case alternates torch / cpu-paged for ``--rounds`` rounds and reports the median step time
and the ratio. Both backends read the same KV cache and index tensors (built as the model runner builds them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def build_step(runner, lengths: list[int], q_len: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """input ids, positions and AttentionMetadata of one step: each sequence computes its last ``q_len`` tokens of
    ``lengths[i]`` (q_len 1: decodes; otherwise one prefill chunk per sequence), on disjoint blocks."""
    from tandem.engine.attention import AttentionMetadata, PagedReads

    bs, indexer = runner.block_size, runner.indexer
    tables, next_block = [], 0
    for n in lengths:
        nb = -(-n // bs)
        tables.append(list(range(next_block, next_block + nb)))
        next_block += nb
    slots, positions = [], []
    for table, n in zip(tables, lengths):
        for pos in range(n - q_len, n):
            slots.append(table[pos // bs] * bs + pos % bs)
            positions.append(pos)
    reads = PagedReads(window=None)
    num_decode = 0
    if q_len == 1:
        num_decode = len(lengths)
        reads.decode_gather_rows, reads.decode_mask = indexer.paged_batch(list(zip(tables, lengths)), 1, None)
    else:
        q_start = 0
        for table, n in zip(tables, lengths):
            reads.prefills.append(indexer.prefill_seq(q_start, table, n, q_len, None))
            q_start += q_len
    meta = AttentionMetadata(write_index=indexer.token_slots(torch.tensor(slots)), num_decode=num_decode,
                             reads={None: reads})
    ids = torch.randint(0, runner.model_config.vocab_size, (len(slots),), generator=torch.Generator().manual_seed(0))
    return ids, torch.tensor(positions), meta


def time_forward(model, kv_buffer, step, reps: int) -> float:
    """Median seconds of ``reps`` forwards of one step."""
    ids, pos, meta = step
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids, pos, kv_buffer, meta)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two backends per case")
    ap.add_argument("--reps", type=int, default=5, help="forwards per backend per round (median taken)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default="results/attention_ab.json")
    args = ap.parse_args(argv)

    from tandem import LLM
    from tandem.engine.attention import TorchReferenceBackend
    from tandem.engine.attention.cpu_paged import CpuPagedBackend

    llm = LLM(dtype=args.dtype, max_model_len=2048, num_blocks=1100, num_threads=args.threads, progress=False)
    runner = llm.engine.runner
    model, kv = runner.model, runner.kv_buffer
    backends = {"torch": TorchReferenceBackend(), "cpu-paged": CpuPagedBackend.create()}
    cases = {
        "decode batch 1 (ctx 512)": (build_step(runner, [512], 1), args.reps * 4),
        "decode batch 32 (ctx 512)": (build_step(runner, [512] * 32, 1), args.reps),
        "prefill 1000 tokens (fresh)": (build_step(runner, [1000], 1000), max(1, args.reps // 2)),
        "prefill chunk 256 over 768 cached": (build_step(runner, [1024], 256), args.reps),
    }
    rows = []
    for name, (step, reps) in cases.items():
        samples = {b: [] for b in backends}
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for b in order:
                model.attention_backend = backends[b]
                samples[b].append(time_forward(model, kv, step, reps))
        med = {b: statistics.median(v) * 1000 for b, v in samples.items()}
        row = {"case": name, "torch_ms": med["torch"], "cpu_paged_ms": med["cpu-paged"],
               "speedup": med["torch"] / med["cpu-paged"],
               "samples_ms": {b: [x * 1000 for x in v] for b, v in samples.items()}}
        rows.append(row)
        print(f"{name:36s} torch {med['torch']:8.2f} ms   cpu-paged {med['cpu-paged']:8.2f} ms   "
              f"speedup {row['speedup']:.2f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "dtype": args.dtype, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
