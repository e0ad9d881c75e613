"""Free TCP ports for processes started on one machine (``tandem up``, the tests, the benchmarks).

A port found by binding port 0 comes from the kernel's ephemeral range, and it is closed before the child
that is given it binds it. In that gap the kernel can hand the same number to anyone else asking for an
ephemeral port: a UCX listener of a NIXL agent starting beside it, vLLM's ZMQ sockets (``tcp://*:<port>``),
even the local end of an outgoing connection. Measured in CI: a vLLM engine core failed with ``Address
already in use`` on such a port. ``free_port`` therefore picks below the ephemeral range, where the kernel
never assigns on its own, checks that the port binds on every address, and never hands out the same number
twice in one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

# Below the kernel's ephemeral range (Linux default 32768-60999, read at run time) and above the well-known
# services people run on a development machine (Redis 6379, Postgres 5432, 8000/8080 web servers).
LOWEST = 20000
_handed_out: set[int] = set()
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (``net.ipv4.ip_local_port_range``); the Linux default elsewhere."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _binds(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nothing listens on now, outside the ephemeral range, not handed out before by this process."""
    low, high = ephemeral_range()
    # The candidates: below the ephemeral range when it leaves room there, else above it; else (a kernel whose
    # range covers nearly every port) whatever binding port 0 gives.
    span = (LOWEST, low) if low - LOWEST >= 1000 else (high + 1, 65536)
    with _lock:
        if span[1] - span[0] < 1000:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            _handed_out.add(port)
            return port
        for _ in range(200):
            port = random.randrange(*span)
            if port not in _handed_out and _binds(port):
                _handed_out.add(port)
                return port
    raise OSError(f"no free TCP port found in {span[0]}-{span[1] - 1}")
