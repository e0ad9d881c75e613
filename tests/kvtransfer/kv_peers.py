"""A real owner engine process (``kv_owner.py``) driven from the tests over stdin/stdout."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OWNER_SCRIPT = Path(__file__).with_name("kv_owner.py")
START_TIMEOUT_S = 60.0  # a cold start imports torch and NIXL; two cores are shared with everything else


class OwnerProcess:
    """One ``kv_owner.py`` process: a prefill-like engine whose KV blocks the test READs."""

    def __init__(self, dtype: str = "bfloat16", seed: int = 1, port: int = 0, ucx_tls: str | None = None,
                 device: str = "cpu") -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), NIXL_LOG_LEVEL=os.environ.get("NIXL_LOG_LEVEL", "WARN"))
        self.dtype = dtype
        self.seed = seed
        self.proc = subprocess.Popen(
            [sys.executable, str(OWNER_SCRIPT), "--dtype", dtype, "--seed", str(seed), "--port", str(port),
             "--device", device]
            + (["--ucx-tls", ucx_tls] if ucx_tls else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        hello = self.read(START_TIMEOUT_S)
        self.port: int = hello["port"]
        self.engine_id: str = hello["engine_id"]
        self.agent_name: str = hello["agent_name"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout_s: float) -> dict:
        """The owner's next JSON answer; other stdout lines (UCX writes its log there) are skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise TimeoutError(f"owner process gave no answer within {timeout_s} s") from None
            if line is None:
                raise RuntimeError(f"owner process exited with {self.proc.wait(5)}")
            if line.startswith("{"):
                return json.loads(line)

    def command(self, command: str, timeout_s: float = 10.0) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the engine is alive but answers nothing (a hung peer). Returns once every thread has stopped:
        the signal is delivered asynchronously, and a READ sent before the stop lands would still be served."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not all(_thread_state(self.proc.pid, tid) in "tT" for tid in os.listdir(f"/proc/{self.proc.pid}/task")):
            if time.monotonic() > deadline:
                raise AssertionError(f"owner {self.proc.pid} did not stop within 10 s of SIGSTOP")
            time.sleep(0.005)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the engine dies without closing anything."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """Ask for a clean exit (closes everything twice); returns the exit code."""
        if self.proc.poll() is None:
            answer = self.command("exit", 20.0)
            assert answer == {"closed": True}
        return self.proc.wait(20)

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)


def _thread_state(pid: int, tid: str) -> str:
    """A thread's state letter from /proc (R, S, T, ...); "T" for a thread already gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "T"
