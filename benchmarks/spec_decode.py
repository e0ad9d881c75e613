"""Speculative decoding (n-gram prompt lookup) vs plain decoding: output tokens/s, same prompts, one invocation.

Two workloads on the bundled model, greedy: ``copy`` (prompts that ask to repeat or lightly edit a passage:
what prompt lookup is for) and ``open`` (open-ended questions: little to look up). For each, a batch of 1 and
of 8 requests, plain and speculative runs alternating ``--repeats`` times; prefix caching is off so every run
pays the same prefill. Prints a table (tokens/s, speed-up, draft acceptance) and writes JSON.

    .venv/bin/python benchmarks/spec_decode.py [--k 4] [--repeats 3] [--out results/spec_decode.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSAGES = [
    "The committee met on Tuesday to review the budget. It approved the new library wing, delayed the road repairs "
    "until spring, and asked the treasurer to publish the monthly accounts on the town website.",
    "To reset the router, hold the power button for ten seconds, wait until the light turns orange, then release it. "
    "The router restarts with its factory settings and the default password printed on its label.",
    "def total(items):\n    result = 0\n    for item in items:\n        result += item.price * item.quantity\n"
    "    return result\n",
    "Our store opens at nine in the morning and closes at six in the evening from Monday to Friday. On Saturday it "
    "opens at ten and closes at four. It is closed on Sunday and on public holidays.",
]
COPY_TASKS = ["Repeat the following text exactly:\n\n{}", "Copy this text word for word:\n\n{}",
              "Rewrite the following, keeping every sentence:\n\n{}"]
OPEN = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.", "Describe a good breakfast.",
        "Why do cats purr?", "Give advice to a new programmer.", "What makes a city pleasant to live in?",
        "Describe the ocean at night.", "How do bees make honey?"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def workload(name: str, batch: int) -> list[list[dict]]:
    if name == "copy":
        texts = [COPY_TASKS[i % len(COPY_TASKS)].format(PASSAGES[i % len(PASSAGES)]) for i in range(batch)]
    else:
        texts = [OPEN[i % len(OPEN)] for i in range(batch)]
    return [[{"role": "user", "content": t}] for t in texts]


def run(llm, prompts, max_tokens: int) -> tuple[float, int, list[list[int]]]:
    from tandem import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    started = time.perf_counter()
    outs = llm.chat(prompts, params)
    seconds = time.perf_counter() - started
    ids = [o.outputs[0].token_ids for o in outs]
    return seconds, sum(len(i) for i in ids), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/spec_decode.json")
    args = parser.parse_args()

    from tandem import LLM

    spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    common = dict(model=args.model, dtype="bfloat16", max_model_len=2048, num_threads=args.threads,
                  enable_prefix_caching=False, kv_cache_memory="256MiB")
    log("loading the plain and the speculative engine ...")
    engines = {"plain": LLM(**common, progress=False), "spec": LLM(**common, speculative_config=spec_config,
                                                                    progress=False)}
    for llm in engines.values():  # warm-up
        run(llm, workload("copy", 1), 8)

    cases = []
    for name in ("copy", "open"):
        for batch in (1, 8):
            prompts = workload(name, batch)
            rates: dict[str, list[float]] = {"plain": [], "spec": []}
            same = True
            before = engines["spec"].engine.stats()
            for repeat in range(args.repeats):
                outputs = {}
                for mode in (("plain", "spec") if repeat % 2 == 0 else ("spec", "plain")):
                    seconds, tokens, outputs[mode] = run(engines[mode], prompts, args.max_tokens)
                    rates[mode].append(tokens / seconds)
                same = same and outputs["plain"] == outputs["spec"]
                log(f"{name} batch {batch} round {repeat + 1}/{args.repeats}: plain {rates['plain'][-1]:.1f} tok/s, "
                    f"spec {rates['spec'][-1]:.1f} tok/s")
            after = engines["spec"].engine.stats()
            drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
            accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
            steps = after.spec_num_drafts - before.spec_num_drafts
            plain, spec = statistics.median(rates["plain"]), statistics.median(rates["spec"])
            cases.append({"workload": name, "batch": batch, "plain_tok_s": plain, "spec_tok_s": spec,
                          "speedup": spec / plain, "acceptance_rate": accepted / drafted if drafted else 0.0,
                          "accepted_per_verify_step": accepted / steps if steps else 0.0,
                          "identical_greedy_output": same, "samples": rates})

    print(f"\nn-gram speculative decoding (k={args.k}) vs plain, bf16, greedy, {args.threads} threads, "
          f"medians of {args.repeats}")
    print(f"{'workload':9} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speed-up':>9} {'accepted':>9} "
          f"{'tok/verify':>10} {'same output':>12}")
    for c in cases:
        print(f"{c['workload']:9} {c['batch']:5d} {c['plain_tok_s']:12.1f} {c['spec_tok_s']:11.1f} "
              f"{c['speedup']:8.2f}x {c['acceptance_rate']:9.2f} {c['accepted_per_verify_step']:10.2f} "
              f"{str(c['identical_greedy_output']):>12}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "cases": cases}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
