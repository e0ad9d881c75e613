"""Offline throughput: Tandem vs transformers `generate` (batched and one at a time), same prompts.

Prints a table of generated tokens/s with ratios against the transformers baselines measured in the
same invocation, plus one request's decode speed (tokens/s after its first token), and writes JSON.

    python benchmarks/offline_throughput.py [--num-prompts 64 --input-len 128 --output-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


WARMUP_TOKENS = 8  # each arm first runs the whole batch for this many tokens, untimed


def bench_tandem(llm, prompts, output_len: int) -> float:
    from tandem import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm-up on the whole batch (its prefill shapes, the KV pages it touches), as the transformers arm below.
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS,
                                                                            ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return len(prompts) * output_len / dt


def bench_tandem_single_decode(llm, prompt, output_len: int) -> float:
    """Tokens/s of one request after its first token (decode speed, prefill excluded)."""
    from tandem import SamplingParams

    engine = llm.engine
    engine.add_request("single", prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    produced = 0
    start = None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            produced += len(delta.new_token_ids)
            if start is None and produced:
                start, first = time.perf_counter(), produced
    return (produced - first) / (time.perf_counter() - start)


def bench_hf_batched(model, prompts, output_len: int) -> float:
    import torch

    ids = torch.tensor(prompts, device=model.device)  # equal lengths: no padding needed
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=WARMUP_TOKENS, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False)
        dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == output_len
    return len(prompts) * output_len / dt


def bench_hf_one_at_a_time(model, prompts, output_len: int) -> float:
    import torch

    total, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False)
            total += out.shape[1] - ids.shape[1]
    return total / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both engines run (default %(default)s)")
    ap.add_argument("--one-at-a-time-prompts", type=int, default=4,
                    help="prompts for the sequential transformers baseline (a rate, so a subset suffices)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/offline_throughput.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from tandem import LLM
    from tandem.engine.model_files import ensure_converted

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    weights = ensure_converted(args.model).weights_dir
    log(f"loading Tandem ({args.dtype} on {args.device}, {threads} threads)")
    llm = LLM(model=str(weights), dtype=args.dtype, device=args.device,
              max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=max(args.num_prompts, 1), num_threads=threads, progress=False)
    vocab = llm.engine.model_config.vocab_size
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)

    log(f"Tandem: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out")
    tandem_tps = bench_tandem(llm, prompts, args.output_len)
    log("Tandem: one request's decode speed")
    single_tps = bench_tandem_single_decode(llm, prompts[0], args.output_len)
    del llm

    log("transformers: loading")
    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype).to(args.device).eval()
    log("transformers: generate, whole batch")
    hf_batched = bench_hf_batched(hf, prompts, args.output_len)
    k = max(1, min(args.one_at_a_time_prompts, args.num_prompts))
    log(f"transformers: generate, one request at a time ({k} prompts)")
    hf_single = bench_hf_one_at_a_time(hf, prompts[:k], args.output_len)

    rows = [
        ("Tandem (continuous batching)", tandem_tps, tandem_tps / hf_batched, tandem_tps / hf_single),
        ("transformers generate, batched", hf_batched, 1.0, hf_batched / hf_single),
        ("transformers generate, one at a time", hf_single, hf_single / hf_batched, 1.0),
    ]
    print(f"\nOffline throughput: {args.num_prompts} prompts, {args.input_len} in / {args.output_len} out, "
          f"{args.dtype} on {args.device}, {threads} threads")
    print(f"{'engine':40} {'gen tok/s':>10} {'vs batched':>11} {'vs 1-at-a-time':>15}")
    for name, tps, r1, r2 in rows:
        print(f"{name:40} {tps:10.1f} {r1:10.2f}x {r2:14.2f}x")
    print(f"\nTandem single request decode: {single_tps:.1f} tok/s after the first token")
    result = {
        "config": vars(args) | {"threads": threads},
        "tandem_tok_s": tandem_tps,
        "hf_batched_tok_s": hf_batched,
        "hf_one_at_a_time_tok_s": hf_single,
        "ratio_vs_batched": tandem_tps / hf_batched,
        "ratio_vs_one_at_a_time": tandem_tps / hf_single,
        "tandem_single_decode_tok_s": single_tps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
