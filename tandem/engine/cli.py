"""``tandem generate``: one prompt in, one completion out, with the offline engine."""

from __future__ import annotations

import argparse
import sys

from tandem.engine.model_files import DEFAULT_MODEL


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by ``generate``, ``serve``, ``prefill`` and ``decode``."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hf://ORG/NAME[@REVISION] or ORG/NAME (downloaded into HF_HOME), the bundled id "
                        "(%(default)s), a directory, a .gguf file, file:///PATH or pvc://CLAIM/PATH")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    g.add_argument("--device", default="cpu", help="where the model and KV cache live: cpu, cuda or cuda:N "
                   "(default %(default)s)")
    g.add_argument("--max-model-len", type=int, default=4096)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-long-partial-prefills", type=int, default=1,
                   help="at most this many long prompts get prefill tokens in one step (default 1); later long "
                        "prompts wait, shorter ones behind them go first")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="prompt tokens still to compute from which a prefill counts as long (default 0: a quarter "
                        "of --max-num-batched-tokens)")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size: bytes ('2GiB', '512MB') or, on CPU, a fraction (0.5) of the container's "
                        "memory limit (cgroup memory.max), or of the host's RAM where none is set; default 1GiB "
                        "on CPU, --gpu-memory-utilization's share on CUDA")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: the fraction of the GPU's memory this engine may use; the KV cache gets what is "
                        "left after the weights and activations (default %(default)s, like vLLM)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kv-keep-warm-interval", type=float, default=5.0, metavar="SECONDS",
                   help="busy or idle, touch the pages of the next max-model-len of free KV blocks this often, so "
                        "hosts that reclaim idle guest memory do not slow the next prompt's KV writes or "
                        "transfers (default %(default)s; 0 = off)")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (default: off)')
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: TANDEM_NUM_THREADS or all cores)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu-paged"],
                   help="paged attention: cpu-paged (a C++ operator built once at start-up and cached), torch (the "
                        "reference); auto = cpu-paged on CPU when it builds, else torch (default %(default)s)")


def speculative_config_from_json(text: str | None):
    """Parse ``--speculative-config``; ValueError with the reason for anything malformed."""
    import json

    from tandem.engine.config import SpeculativeConfig

    if not text:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--speculative-config: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError("--speculative-config: must be a JSON object")
    try:
        return SpeculativeConfig.from_dict(raw)
    except TypeError as exc:
        raise ValueError(f"--speculative-config: {exc}") from None


def kv_cache_memory_from_args(args: argparse.Namespace) -> int | None:
    """``--kv-cache-memory`` in bytes (None: the engine's default), saying on stderr how it was sized."""
    from tandem.engine.config import kv_cache_size

    if args.kv_cache_memory is None:
        return None
    size = kv_cache_size(args.kv_cache_memory)
    if args.device != "cpu" and size.fraction is not None:
        raise ValueError("kv_cache_memory: a fraction is of the CPU's memory limit; on CUDA give a size ('8GiB') "
                         "or use --gpu-memory-utilization")
    print(f"tandem: {size.explanation}", file=sys.stderr)
    return size.num_bytes


def engine_config_from_args(args: argparse.Namespace):
    from tandem.download import prefetch_or_exit
    from tandem.engine.config import CacheConfig, EngineConfig, SchedulerConfig

    config = EngineConfig(
        speculative=speculative_config_from_json(args.speculative_config),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        num_threads=args.threads,
        attention_backend=getattr(args, "attention_backend", "auto"),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=kv_cache_memory_from_args(args),
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            kv_keep_warm_interval_s=args.kv_keep_warm_interval,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens if args.enable_chunked_prefill
            else max(args.max_num_batched_tokens, args.max_model_len),
            enable_chunked_prefill=args.enable_chunked_prefill,
            max_model_len=args.max_model_len,
            max_long_partial_prefills=args.max_long_partial_prefills,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
        ),
    )
    prefetch_or_exit(args.model)  # a Hub model downloads here, once the flags are valid, before any server starts
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt (sent through the chat template unless --raw)")
    parser.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    add_engine_arguments(parser)
    parser.set_defaults(max_model_len=2048)


def run(args: argparse.Namespace) -> int:
    from tandem.engine.llm import LLM
    from tandem.engine.llm_engine import ModelLoadError
    from tandem.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
        llm = LLM.from_config(engine_config_from_args(args))
        if args.raw:
            out = llm.generate(args.prompt, params)
        else:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)
    except (ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out[0].outputs[0].text)
    return 0
