"""Starting real Tandem processes for tests: free ports, health waits, clean teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tandem.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


PORT_FLAGS = ("--port", "--kv-port")
BIND_RETRIES = 3


class TandemProcess:
    """A ``tandem <subcommand>`` child process with its log in a temp file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.args = list(args)
        self.env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.port = port
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.bind_retries = BIND_RETRIES
        self._launch()

    def _launch(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="tandem-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", *self.args],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True,
        )

    def _relaunch_on_new_ports(self) -> None:
        """Start again with fresh ``--port``/``--kv-port`` values.

        NOTE: ``free_port`` checks a port and closes it; until the child binds it, another process choosing
        a fixed port (not the kernel: the port lies outside its ephemeral range) can still take it first.
        """
        for i, arg in enumerate(self.args[:-1]):
            if arg in PORT_FLAGS and self.args[i + 1] != "0":
                new = free_port()
                if arg == "--port" and self.port is not None:
                    self.port, self.url = new, f"http://127.0.0.1:{new}"
                self.args[i + 1] = str(new)
        self._launch()

    def wait_healthy(self, timeout: float = 240.0) -> "TandemProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.bind_retries > 0 and "address already in use" in self.output():
                    self.bind_retries -= 1
                    self._relaunch_on_new_ports()
                    continue
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"not healthy after {timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_serve(*extra: str, env: dict[str, str] | None = None, wait: bool = True,
                subcommand: str = "serve") -> TandemProcess:
    port = free_port()
    proc = TandemProcess([subcommand, "--port", str(port), *extra], env=env, port=port)
    return proc.wait_healthy() if wait else proc


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in Prometheus text ``text``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0]
        if metric != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(f"metric {name} {labels} not found")
    return total
