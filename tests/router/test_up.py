"""``tandem up``: the process plan, and supervision of real child processes (health wait, clean stop, no orphans)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import signal
import socket
import sys
import textwrap
import threading
import time

import pytest

from tandem import ports, up

from .peers import free_port

def test_free_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice(monkeypatch):
    """Ports for children: the kernel never gives them to a UCX listener or a ZMQ socket binding port 0, a port
    someone listens on is skipped, and one process never gets the same number twice."""
    low, _ = ports.ephemeral_range()
    handed = [ports.free_port() for _ in range(300)]
    assert len(set(handed)) == len(handed)
    assert all(ports.LOWEST <= port < low for port in handed)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # The first two draws must be skipped; after them, candidates until one binds (any one may be in use by
        # another process of the suite at that moment: a fixed third draw made this test flaky).
        drawn = []
        draws = itertools.chain([busy, handed[0]], (p for p in range(busy + 1, 65000) if p not in handed))
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (65000, 65535))
        monkeypatch.setattr(ports.random, "randrange", lambda *span: drawn.append(next(draws)) or drawn[-1])
        port = ports.free_port()
        assert drawn[:2] == [busy, handed[0]] and port == drawn[-1] and port not in (busy, handed[0])


# A real HTTP child: answers /health after ``delay`` seconds, spawns a grandchild, and optionally ignores SIGTERM.
CHILD = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, time
    port, delay, stubborn, pidfile = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(pidfile, "w").write(f"{os.getpid()} {grandchild.pid}")
    started = time.monotonic()
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ready = time.monotonic() - started > delay
            self.send_response(200 if ready else 503)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def spec(tmp_path, name: str, delay: float, stubborn: bool) -> up.ChildSpec:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = free_port()
    return up.ChildSpec(name, [sys.executable, str(script), str(port), str(delay), "1" if stubborn else "0",
                               str(tmp_path / f"{name}.pids")], f"http://127.0.0.1:{port}/health")


def pids(tmp_path, name: str) -> list[int]:
    deadline = time.monotonic() + 10
    path = tmp_path / f"{name}.pids"
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def test_supervisor_waits_for_health_and_stops_everything(tmp_path):
    logs: list[str] = []
    supervisor = up.Supervisor(stop_timeout_s=1.0, log=logs.append)
    children = [supervisor.start(spec(tmp_path, "polite", 0.5, False)),
                supervisor.start(spec(tmp_path, "stubborn", 0.0, True))]
    try:
        started = time.monotonic()
        assert supervisor.wait_healthy(children, 20, threading.Event())
        assert time.monotonic() - started >= 0.5  # it really waited for the slow one
        assert any("polite is healthy" in line for line in logs)
        all_pids = pids(tmp_path, "polite") + pids(tmp_path, "stubborn")
        assert all(alive(p) for p in all_pids)
        # Children are in their own process groups, not ours.
        assert all(os.getpgid(c.proc.pid) == c.proc.pid != os.getpgid(0) for c in children)
    finally:
        stopped = time.monotonic()
        supervisor.stop_all()
    assert time.monotonic() - stopped < 5
    assert any("stubborn did not stop" in line for line in logs)
    time.sleep(0.2)
    assert not any(alive(p) for p in all_pids), "no orphans: children and grandchildren are gone"


def test_wait_healthy_gives_up_when_a_child_dies_or_on_stop(tmp_path):
    supervisor = up.Supervisor(stop_timeout_s=1.0, log=lambda m: None)
    dying = supervisor.start(up.ChildSpec("dying", [sys.executable, "-c", "raise SystemExit(3)"], "http://127.0.0.1:9/health"))
    try:
        assert not supervisor.wait_healthy([dying], 20, threading.Event())
        assert dying.proc.returncode == 3
        slow = supervisor.start(spec(tmp_path, "slow", 60, False))
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        assert not supervisor.wait_healthy([slow], 20, stop)
        assert time.monotonic() - started < 5
    finally:
        supervisor.stop_all()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_plan_for_disaggregated_serving():
    specs = up.plan(parse("--prefill", "1", "--decode", "1", "--port", "8123", "--api-key", "sekret",
                          "--redis-url", "redis://127.0.0.1:6399"))
    prefill, decode, router = specs
    assert prefill.argv[3:4] == ["prefill"] and decode.argv[3:4] == ["decode"]
    for worker in (prefill, decode):
        url = worker.health_url.removesuffix("/health")
        assert worker.argv[worker.argv.index("--advertise-url") + 1] == url
        assert "--kv-port" in worker.argv and "--model" in worker.argv
        assert worker.argv[worker.argv.index("--kv-events-redis") + 1] == "redis://127.0.0.1:6399"
        assert worker.env["TANDEM_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
        assert worker.env["TANDEM_API_KEY"] == ""  # unset: only the router checks keys
    assert router.argv[3] == "router" and router.env == {"TANDEM_API_KEY": "sekret"}
    assert router.argv[router.argv.index("--prefill") + 1] == prefill.health_url.removesuffix("/health")
    assert router.argv[router.argv.index("--decode") + 1] == decode.health_url.removesuffix("/health")
    assert router.argv[router.argv.index("--port") + 1] == "8123"
    assert router.argv[router.argv.index("--redis-url") + 1] == "redis://127.0.0.1:6399"


def test_plan_defaults_and_validation():
    worker, router = up.plan(parse())
    assert worker.argv[3] == "serve" and "--kv-port" not in worker.argv
    assert "--worker" in router.argv
    assert up.plan(parse("--workers", "2", "--threads", "3"))[0].env["TANDEM_NUM_THREADS"] == "3"
    with pytest.raises(ValueError):
        up.plan(parse("--prefill", "1"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tandem.engine.server") is None, reason="needs `tandem serve`")
def test_up_stops_on_sigterm_even_while_starting(tmp_path):
    """The real `tandem up` process: SIGTERM while workers load -> everything is stopped, exit code 130."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", "--workers", "1", "--port", str(free_port()),
                             "--stop-timeout", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert "starting 1 worker" in line
        time.sleep(1.0)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the worker was started"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, out
        assert "stopped" in out
        time.sleep(0.2)
        assert not any(alive(int(p)) for p in children)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tandem.engine.server") is None, reason="needs `tandem serve`")
@pytest.mark.parametrize("layout", [["--workers", "1"], ["--prefill", "1", "--decode", "1"]], ids=["aggregated", "pd"])
def test_up_serves_and_stops_cleanly(tmp_path, layout):
    """`tandem up`: progress, the URL, a working API behind the key, and no orphans after SIGTERM."""
    import subprocess

    import openai

    port = free_port()
    env = {**os.environ, "TANDEM_API_KEY": "local-key"}
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", *layout, "--port", str(port),
                             "--router-arg=--log-level=warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any("ready at" in line for line in lines):
            # The error lines first: a worker that fails to start leaves its shutdown after its cause.
            assert time.monotonic() < deadline and proc.poll() is None, "".join(
                [line for line in lines if "Error" in line or "error:" in line][-20:] + ["...\n"] + lines[-30:])
            lines.append(proc.stdout.readline())
        first_worker = "worker-0" if "--workers" in layout else "prefill-0"
        assert any(first_worker in line and "is healthy" in line for line in lines)
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]
        descendants = subprocess.run(["pgrep", "-g", ",".join(
            subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split())],
            capture_output=True, text=True).stdout.split()
        assert len(descendants) >= 2  # the worker and the router
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local-key", max_retries=0) as client:
            reply = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hello",
                                              max_tokens=4, temperature=0)
            assert reply.choices[0].text
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped" in out
        time.sleep(0.2)
        assert not any(alive(int(p)) for p in descendants), "no orphan processes"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
