"""Real prefill, decode and aggregated workers (separate processes, real NIXL over UCX), shared per package.

Every engine runs float32 (so greedy output compares exactly) with ``--threads 1``: the machine has two cores.
"""

from __future__ import annotations

import subprocess

import pytest

from disagg_client import LEASE_S, MAX_MODEL_LEN
from procs import free_port, start_serve

COMMON = ("--dtype", "float32", "--threads", "1", "--kv-cache-memory", "160MiB", "--max-model-len", str(MAX_MODEL_LEN))


def start_worker(role: str, *extra: str, wait: bool = True):
    """A ``tandem prefill`` / ``tandem decode`` / ``tandem serve`` process on free ports."""
    args = list(COMMON) + list(extra)
    if role != "serve":
        args += ["--kv-port", str(free_port())]
    return start_serve(*args, subcommand=role, wait=wait)


ROLES = {
    "prefill": ("prefill",),
    "decode": ("decode",),
    "serve": ("serve",),
    # The fault tests' own pair: a short lease (the lease test; one test kills it) and the "fail" policy.
    "short_lease_prefill": ("prefill", "--kv-lease-seconds", str(LEASE_S)),
    "failing_decode": ("decode", "--kv-load-failure-policy", "fail", "--kv-transfer-timeout", "5"),
}


def wait_exit(proc, timeout: float = 60.0) -> int | str:
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return f"no exit within {timeout} s"


@pytest.fixture(scope="package")
def workers():
    """Every worker the package needs, started in parallel and shared by its tests."""
    procs = {name: start_worker(*spec, wait=False) for name, spec in ROLES.items()}
    try:
        for p in procs.values():
            p.wait_healthy()
        yield procs
    finally:
        alive = {name: p for name, p in procs.items() if p.proc.poll() is None}
        # One SIGTERM each, all at once, so the graceful shutdowns overlap. NOTE: a second SIGTERM could land
        # while the interpreter finalises (handlers back to default) and kill the process with -15.
        for p in alive.values():
            p.proc.terminate()
        try:
            codes = {name: wait_exit(p) for name, p in alive.items()}
            bad = {name: code for name, code in codes.items() if code != 0}
            assert not bad, f"exit codes {bad}:\n" + "\n".join(alive[n].output()[-3000:] for n in bad)
        finally:
            for p in procs.values():
                p.kill()


@pytest.fixture(scope="package")
def prefill(workers):
    return workers["prefill"]


@pytest.fixture(scope="package")
def decode(workers):
    return workers["decode"]


@pytest.fixture(scope="package")
def serve(workers):
    return workers["serve"]


@pytest.fixture(scope="package")
def short_lease_prefill(workers):
    return workers["short_lease_prefill"]


@pytest.fixture(scope="package")
def failing_decode(workers):
    return workers["failing_decode"]
