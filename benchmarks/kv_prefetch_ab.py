"""A/B of the decoder stack's KV prefetch (each layer's MLP prefetching the next layer's KV rows), in one process.

    python benchmarks/kv_prefetch_ab.py [--threads 2] [--rounds 3] [--out results/kv_prefetch_ab.json]

Runs the engine (no HTTP) on batches of concurrent greedy requests and times every decode-only step, switching the
prefetch on and off every ``--switch`` steps, so that the machine's noise hits both arms alike. Cases: the
32-stream row of ``vs_vllm.py`` (32 x 128-token prompts, 128 out), the same batch over longer contexts
(32 x 512-token prompts, 64 out), and 8 streams. Prints each arm's mean and median step time, the ratio and the
spread of the per-round means; writes JSON. Outputs are the same either way (a prefetch reads nothing it changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CASES = {  # name: (streams, prompt tokens, output tokens)
    "32 streams x (128 + 128)": (32, 128, 128),
    "32 streams x (512 + 64)": (32, 512, 64),
    "8 streams x (128 + 128)": (8, 128, 128),
}


def run_case(engine, stack, streams: int, prompt_len: int, out_len: int, switch: int, seed: int) -> dict:
    """One batch to completion; decode-step seconds by arm ("on"/"off")."""
    from offline_throughput import make_prompts

    from tandem import SamplingParams

    prompts = make_prompts(streams, prompt_len, engine.model_config.vocab_size, seed)
    for i, p in enumerate(prompts):
        engine.add_request(f"ab{seed}-{i}", p, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    steps = {"on": [], "off": []}
    decodes = 0
    started: set[str] = set()  # requests past their prefill
    while engine.has_unfinished_requests():
        arm = "on" if (decodes // switch) % 2 == seed % 2 else "off"
        stack.kv_prefetch = arm == "on"
        t0 = time.perf_counter()
        out = engine.step()
        dt = time.perf_counter() - t0
        # A decode-only step of the full batch: every request in it had its first token before this step.
        if len(out) == streams and all(o.request_id in started for o in out):
            steps[arm].append(dt)
            decodes += 1
        started.update(o.request_id for o in out)
    stack.kv_prefetch = True
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="batches per case")
    ap.add_argument("--switch", type=int, default=8, help="decode steps between switching the arm")
    ap.add_argument("--out", default="results/kv_prefetch_ab.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))

    from tandem import LLM

    llm = LLM(dtype="bfloat16", max_model_len=1024, max_num_seqs=32, num_threads=args.threads, progress=False)
    engine = llm.engine
    native = engine.runner.model.native_decoder
    if native is None:
        print("this model runs without the native decoder stack: nothing to compare", file=sys.stderr)
        return 1
    rows = []
    print(f"{'case':28s} {'off ms':>8s} {'on ms':>8s} {'off/on':>7s}  round means off/on (ms)", flush=True)
    for name, (streams, prompt_len, out_len) in CASES.items():
        samples = {"on": [], "off": []}
        rounds = []
        for r in range(args.rounds):
            steps = run_case(engine, native.stack, streams, prompt_len, out_len, args.switch, seed=r)
            for arm in samples:
                samples[arm] += steps[arm]
            rounds.append({arm: 1000 * statistics.mean(v) for arm, v in steps.items()})
        mean = {arm: 1000 * statistics.mean(v) for arm, v in samples.items()}
        median = {arm: 1000 * statistics.median(v) for arm, v in samples.items()}
        row = {"case": name, "streams": streams, "prompt_tokens": prompt_len, "output_tokens": out_len,
               "off_mean_ms": mean["off"], "on_mean_ms": mean["on"], "off_median_ms": median["off"],
               "on_median_ms": median["on"], "speedup": mean["off"] / mean["on"], "rounds_ms": rounds,
               "steps": {arm: len(v) for arm, v in samples.items()}}
        rows.append(row)
        spread = "  ".join(f"{x['off']:.1f}/{x['on']:.1f}" for x in rounds)
        print(f"{name:28s} {mean['off']:8.2f} {mean['on']:8.2f} {row['speedup']:7.3f}  {spread}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "switch": args.switch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
