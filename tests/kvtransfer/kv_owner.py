"""A real KV-owning engine process for the kvtransfer tests: a seeded KV buffer, a NIXL transport and a
handshake server. Talks to the test over stdin/stdout, one JSON object a line.

stdout: first ``{"port", "pid", "engine_id", "agent_name"}``; then one line per command.
stdin commands: ``notifs`` (answer ``{"notifs": [[agent, message], ...]}`` with everything received so far),
``exit`` (close everything twice, answer ``{"closed": true}``, exit 0).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import uuid

import torch

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer.handshake import HandshakeServer, KVCompatibility, make_payload
from tandem.kvtransfer.nixl_transport import NixlKVTransport

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def seeded_kv(layout: KVCacheLayout, seed: int) -> torch.Tensor:
    """The deterministic KV buffer an owner with ``seed`` holds (the test rebuilds it to compare bytes)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape, generator=generator, dtype=torch.float32).to(TORCH_DTYPES[layout.dtype])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="tiny-test-model")
    parser.add_argument("--ucx-tls", default=None)
    parser.add_argument("--device", default="cpu", help="where the KV buffer lives (cuda: NIXL registers VRAM)")
    args = parser.parse_args()

    layout = KVCacheLayout(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=32, dtype=args.dtype)
    engine_id = uuid.uuid4().hex
    kv = seeded_kv(layout, args.seed).to(args.device)
    transport = NixlKVTransport(kv, layout, f"prefill-{engine_id[:12]}", args.ucx_tls)
    compat = KVCompatibility.from_layout(args.model, layout)
    server = HandshakeServer("127.0.0.1", args.port, lambda: make_payload(transport, engine_id, compat))
    commands: queue.Queue[str] = queue.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("exit")  # the test process went away: do not linger

    threading.Thread(target=read_commands, daemon=True).start()

    def say(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"port": server.port, "engine_id": engine_id, "agent_name": transport.agent_name})
    received: list[list[str]] = []
    while True:
        received.extend([agent, msg.decode()] for agent, msg in transport.poll_notifications())
        try:
            command = commands.get(timeout=0.005)
        except queue.Empty:
            continue
        if command == "notifs":
            say({"notifs": received})
        elif command == "exit":
            server.close()
            server.close()
            transport.close()
            transport.close()
            say({"closed": True})
            return


if __name__ == "__main__":
    main()
