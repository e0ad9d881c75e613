"""Raw NIXL DRAM->DRAM READ bandwidth vs Tandem's paged-block transfer, between two real processes.

The owner (prefill-like) process holds a KV cache with SmolLM2-135M's layout (30 layers, 3 KV heads, head dim
64, block 16, bf16; no model is loaded) and serves the handshake; this process (decode-like) READs from it:

* raw: one descriptor covering N contiguous bytes (same agent, same connection): NIXL/UCX's own ceiling;
* blocks, contiguous: the KV of a T-token prompt, block ids consecutive on both sides (2 * 30 regions);
* blocks, scattered: the same number of blocks at random ids on both sides (2 * 30 regions per block);

for T in 256, 1,024, 4,096 tokens and both descriptor modes (``prepped``: per-block lists prepared once,
transfers built from indices; ``exact``: each transfer built from exact coalesced regions). Every number is
the median over ``--repeats`` timed READs (post -> completion seen), variants interleaved so machine noise
hits them alike. Prints a table and writes JSON (``--out``).

    .venv/bin/python benchmarks/kv_transfer_raw.py [--out results/kv_transfer_raw.json] [--ucx-tls tcp,cma]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tandem.engine.core.kv_layout import KVCacheLayout  # noqa: E402
from tandem.engine.host_memory import allocate_pool  # noqa: E402
from tandem.kvtransfer.handshake import HandshakeServer, KVCompatibility, RemotePeerCache, make_payload  # noqa: E402
from tandem.kvtransfer.nixl_transport import NixlKVTransport, TransferHandle  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_TOKENS = (256, 1024, 4096)
MODES = ("prepped", "exact")


def smol_layout(num_blocks: int) -> KVCacheLayout:
    """SmolLM2-135M's KV layout: 30 layers, 3 KV heads, head dim 64, block 16, bf16."""
    return KVCacheLayout(num_layers=30, num_blocks=num_blocks, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16")


def local_buffer(layout: KVCacheLayout, fill: float, huge_pages: bool) -> torch.Tensor:
    """A KV buffer of ``layout`` filled with ``fill``: an ordinary torch allocation, or a huge-page pool as the
    engine allocates its own."""
    if huge_pages:
        return allocate_pool(layout.shape, torch.bfloat16, fill).tensor
    return torch.full(layout.shape, fill, dtype=torch.bfloat16)


def seeded_kv(layout: KVCacheLayout, seed: int, huge_pages: bool = False) -> torch.Tensor:
    """Random bf16 KV of ``layout``, in a ``local_buffer``."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-32768, 32767, layout.shape, generator=generator, dtype=torch.int16).view(torch.bfloat16)
    return local_buffer(layout, 0.0, huge_pages).copy_(values) if huge_pages else values


def run_owner(num_blocks: int, ucx_tls: str | None, huge_pages: bool, device: str = "cpu") -> None:
    """The owner process: a registered KV cache and a handshake server; exits when stdin closes."""
    layout = smol_layout(num_blocks)
    kv = seeded_kv(layout, 7, huge_pages).to(device)
    transport = NixlKVTransport(kv, layout, f"bench-prefill-{os.getpid()}", ucx_tls)
    compat = KVCompatibility.from_layout(MODEL, layout)
    server = HandshakeServer("127.0.0.1", 0, lambda: make_payload(transport, f"bench-{os.getpid()}", compat))
    sys.stdout.write(json.dumps({"port": server.port}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # the reader closes our stdin when done (or dies)
    server.close()
    transport.close()


class ReadTiming(NamedTuple):
    """One READ's time on this process's clock (``wall_s``: creating the request, posting it, polling it) and on
    NIXL's own (``transfer_s``: post -> completion; the agent captures telemetry, see ``NixlKVTransport``)."""

    wall_s: float
    transfer_s: float


def read_region(transport: NixlKVTransport, remote_agent: str, remote_address: int, num_bytes: int,
                timeout_s: float, local_offset: int = 0) -> ReadTiming:
    """Raw NIXL READ of one contiguous region into the local buffer, ``local_offset`` bytes from its start.

    NOTE: uses the transport's own agent and backend so raw and block reads share one UCX connection and one
    progress setting: the difference between them is only the descriptors.
    """
    bind, agent = transport._bind, transport._agent  # noqa: SLF001 - the baseline deliberately bypasses the block logic
    started = time.perf_counter()
    local = bind.nixlXferDList(transport._mem_type, [(transport.base_address + local_offset, num_bytes, 0)])  # noqa: SLF001
    remote = bind.nixlXferDList(transport._mem_type, [(remote_address, num_bytes, 0)])  # noqa: SLF001
    xfer = agent.createXferReq(bind.NIXL_READ, local, remote, remote_agent, b"", transport._backends)  # noqa: SLF001
    try:
        status = agent.postXferReq(xfer, b"")
        deadline = started + timeout_s
        while status == bind.NIXL_IN_PROG:
            if time.perf_counter() > deadline:
                raise TimeoutError("raw READ did not finish")
            status = agent.getXferStatus(xfer)
        if status != bind.NIXL_SUCCESS:
            raise RuntimeError(f"raw READ failed: {status}")
        wall = time.perf_counter() - started
        return ReadTiming(wall, agent.getXferTelemetry(xfer).xferDuration / 1e6)
    finally:
        agent.releaseXferReq(xfer)


def read_blocks(transport: NixlKVTransport, peer, remote_ids: list[int], local_ids: list[int], timeout_s: float) -> tuple[float, TransferHandle]:
    started = time.perf_counter()
    handle = transport.read_blocks(peer.agent_name, peer.base_address, peer.layout, remote_ids, local_ids, timeout_s=timeout_s)
    return time.perf_counter() - started, handle


def gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/kv_transfer_raw.json")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--num-blocks", type=int, default=512, help="blocks in each engine's cache (>= 256)")
    parser.add_argument("--ucx-tls", default=None, help="UCX_TLS for both processes (default: UCX's own)")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--huge-pages", action="store_true",
                        help="both KV buffers on transparent huge pages, as the engine allocates its pool")
    parser.add_argument("--device", default="cpu",
                        help="where both KV buffers live: cpu (DRAM) or cuda (GPU memory; NIXL registers VRAM)")
    parser.add_argument("--owner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.huge_pages and args.device != "cpu":
        parser.error("--huge-pages is for host memory (--device cpu)")
    if args.owner:
        run_owner(args.num_blocks, args.ucx_tls, args.huge_pages, args.device)
        return

    layout = smol_layout(args.num_blocks)
    if max(PROMPT_TOKENS) // layout.block_size > layout.num_blocks:
        parser.error(f"--num-blocks must be >= {max(PROMPT_TOKENS) // layout.block_size}")
    command = [sys.executable, __file__, "--owner", "--num-blocks", str(args.num_blocks), "--device", args.device]
    if args.huge_pages:
        command.append("--huge-pages")
    if args.ucx_tls:
        command += ["--ucx-tls", args.ucx_tls]
    owner = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    transports: dict[str, NixlKVTransport] = {}
    try:
        port = None
        for line in owner.stdout:  # skip UCX log lines until the owner's JSON hello
            if line.startswith("{"):
                port = json.loads(line)["port"]
                break
        if port is None:
            raise RuntimeError(f"owner exited with {owner.wait(10)}")
        buffer = local_buffer(layout, 0.0, args.huge_pages).to(args.device)
        setup: dict[str, float] = {}
        peers = {}
        for mode in MODES:
            started = time.perf_counter()
            transports[mode] = NixlKVTransport(buffer, layout, f"bench-decode-{mode}", args.ucx_tls, descriptor_mode=mode,
                                               progress_thread=False)
            setup[f"{mode}_transport_create_s"] = time.perf_counter() - started
            started = time.perf_counter()
            peers[mode] = RemotePeerCache(transports[mode], KVCompatibility.from_layout(MODEL, layout)).get("127.0.0.1", port)
            setup[f"{mode}_handshake_s"] = time.perf_counter() - started
            # First READ: connects UCX and (prepped) prepares the peer's descriptor list.
            setup[f"{mode}_first_read_s"], _ = read_blocks(transports[mode], peers[mode], [0], [0], args.timeout_s)

        expected = seeded_kv(layout, 7)
        rng = random.Random(0)
        results = {"cases": []}
        # Raw peak: the whole remote cache in one descriptor.
        peer0 = peers["prepped"]
        raw_peak = [read_region(transports["prepped"], peer0.agent_name, peer0.base_address, layout.total_bytes, args.timeout_s).wall_s
                    for _ in range(5)]
        results["raw_peak"] = {"bytes": layout.total_bytes, "gbps": gbps(layout.total_bytes, statistics.median(raw_peak))}

        for tokens in PROMPT_TOKENS:
            n = tokens // layout.block_size
            num_bytes = n * layout.bytes_per_block_all_layers
            contiguous = (list(range(n)), list(range(n)))
            scattered = (rng.sample(range(layout.num_blocks), n), rng.sample(range(layout.num_blocks), n))
            samples: dict[str, list[float]] = {"raw": []}
            variants = [(mode, kind) for mode in MODES for kind in ("contiguous", "scattered")]
            for mode, kind in variants:
                samples[f"{mode}/{kind}"] = []
            for _ in range(args.repeats):
                samples["raw"].append(read_region(transports["prepped"], peer0.agent_name, peer0.base_address, num_bytes,
                                                  args.timeout_s).wall_s)
                for mode, kind in variants:
                    remote_ids, local_ids = contiguous if kind == "contiguous" else scattered
                    seconds, handle = read_blocks(transports[mode], peers[mode], remote_ids, local_ids, args.timeout_s)
                    samples[f"{mode}/{kind}"].append(seconds)
            # The last READ was exact/scattered: its bytes must match the owner's.
            remote_ids, local_ids = scattered
            if not torch.equal(buffer[local_ids].cpu().view(torch.int16), expected[remote_ids].view(torch.int16)):
                raise AssertionError(f"{tokens} tokens: scattered blocks do not match the owner's bytes")
            raw = gbps(num_bytes, statistics.median(samples["raw"]))
            case = {
                "prompt_tokens": tokens,
                "blocks": n,
                "bytes": num_bytes,
                "raw_gbps": raw,
                "raw_median_ms": statistics.median(samples["raw"]) * 1e3,
                "descriptors": {"contiguous": 1, "scattered": handle.num_descriptors},
            }
            for mode, kind in variants:
                seconds = statistics.median(samples[f"{mode}/{kind}"])
                case[f"{mode}_{kind}_gbps"] = gbps(num_bytes, seconds)
                case[f"{mode}_{kind}_median_ms"] = seconds * 1e3
                case[f"{mode}_{kind}_ratio_to_raw"] = gbps(num_bytes, seconds) / raw
            results["cases"].append(case)

        results.update(
            {
                "model_layout": MODEL,
                "layout": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16, "dtype": "bfloat16", "num_blocks": args.num_blocks},
                "bytes_per_block_all_layers": layout.bytes_per_block_all_layers,
                "ucx_tls": args.ucx_tls or "default",
                "huge_pages": args.huge_pages,
                "device": args.device,
                "repeats": args.repeats,
                "setup": setup,
                "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
                "goal": "block transfer >= 0.8 x raw GB/s for the same byte count",
            }
        )
    finally:
        for transport in transports.values():
            transport.close()
        if owner.stdin:
            owner.stdin.close()
        try:
            owner.wait(20)
        except subprocess.TimeoutExpired:
            owner.kill()
            owner.wait(10)

    print(f"UCX_TLS={results['ucx_tls']}  raw peak ({layout.total_bytes / 1e6:.0f} MB, one descriptor): {results['raw_peak']['gbps']:.2f} GB/s")
    header = f"{'tokens':>6} {'MB':>6} {'raw GB/s':>9} | " + " | ".join(f"{mode}/{kind[:4]} GB/s (x raw)" for mode in MODES for kind in ("contiguous", "scattered"))
    print(header)
    for case in results["cases"]:
        cells = [
            f"{case[f'{mode}_{kind}_gbps']:8.2f} ({case[f'{mode}_{kind}_ratio_to_raw']:.2f})".ljust(len(f"{mode}/{kind[:4]} GB/s (x raw)"))
            for mode in MODES
            for kind in ("contiguous", "scattered")
        ]
        print(f"{case['prompt_tokens']:>6} {case['bytes'] / 1e6:6.1f} {case['raw_gbps']:9.2f} | " + " | ".join(cells))
    print("setup: " + ", ".join(f"{k}={v * 1e3:.1f} ms" for k, v in results["setup"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
