"""``tandem up``: the local platform. Starts workers and the router as child processes on 127.0.0.1.

Each child runs in its own process group (so a worker's own children go with it), and gets its parent's
death signal (so not even a SIGKILLed ``tandem up`` leaves orphans on Linux). Shutdown on Ctrl-C/SIGTERM
or when any child dies: SIGTERM to every group, then SIGKILL after a timeout.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from tandem.ports import free_port

if TYPE_CHECKING:
    from tandem.worker.vllm import VllmPython

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM us when the supervisor dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: shutdown still works through the normal signal path


@dataclass(slots=True)
class ChildSpec:
    """One child process: its command, where it answers /health, and its environment."""

    name: str
    argv: list[str]
    health_url: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Child:
    spec: ChildSpec
    proc: subprocess.Popen
    healthy: bool = False


class Supervisor:
    """Starts children in their own process groups, waits for their health, and stops them all."""

    def __init__(self, stop_timeout_s: float = 10.0, log=print) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []
        self._log = log

    def start(self, spec: ChildSpec) -> Child:
        env = {**os.environ, **spec.env}
        for key, value in spec.env.items():
            if value == "":
                env.pop(key, None)  # an empty value in the spec means "unset it for this child"
        proc = subprocess.Popen(spec.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        child = Child(spec, proc)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def wait_healthy(self, children: list[Child], timeout_s: float, stop: threading.Event) -> bool:
        """Poll /health until every child answers 200; False on timeout, a dead child or a stop request."""
        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        with httpx.Client(timeout=1.0) as client:
            while not all(c.healthy for c in children):
                for child in children:
                    if child.proc.poll() is not None:
                        self._log(f"tandem up: {child.spec.name} exited with status {child.proc.returncode} while starting")
                        return False
                    if not child.healthy:
                        try:
                            child.healthy = client.get(child.spec.health_url).status_code == 200
                        except httpx.HTTPError:
                            child.healthy = False
                        if child.healthy:
                            self._log(f"tandem up: {child.spec.name} is healthy "
                                      f"({sum(c.healthy for c in children)}/{len(children)})")
                if stop.is_set() or time.monotonic() > deadline:
                    return False
                now = time.monotonic()
                if now - last_report > 10:
                    waiting = ", ".join(c.spec.name for c in children if not c.healthy)
                    self._log(f"tandem up: waiting for {waiting} ...")
                    last_report = now
                stop.wait(0.25)
        return True

    def stop_all(self) -> None:
        """SIGTERM every child's process group, then SIGKILL whatever is left after the timeout."""
        for child in reversed(self.children):  # the router first, so it stops sending work
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log(f"tandem up: {child.spec.name} did not stop in {self.stop_timeout_s:.0f}s; killing it")
        for child in self.children:
            # The group too: a worker's own children may outlive it.
            self._signal(child, signal.SIGKILL)
            child.proc.wait()

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return  # the child's group is already gone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", type=int, default=0, metavar="N", help="prefill workers")
    parser.add_argument("--decode", type=int, default=0, metavar="N", help="decode workers")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="aggregated workers (default 1 if none given)")
    parser.add_argument("--port", type=int, default=8000, help="router port")
    parser.add_argument("--redis-url", default=None, help="carry KV events through Redis instead of the direct channel")
    parser.add_argument("--model", default=None, help="model id, directory or GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--api-key", default=None, help="API key the router requires (default: env TANDEM_API_KEY)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: cores // engines)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every process")
    parser.add_argument("--stop-timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--router-arg", action="append", default=[], help="extra argument for `tandem router` (repeatable)")
    parser.add_argument("--engine", choices=("tandem", "vllm"), default="tandem",
                        help="the workers' engine: Tandem's own, or vLLM's OpenAI server (its KV events and NixlConnector)")
    parser.add_argument("--engine-python", default=None, metavar="PATH",
                        help="--engine vllm: the python of an environment with vLLM (default: `python` on PATH; "
                             "`make vllm-env` builds one)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                        help="--engine vllm: extra argument for every vLLM server, verbatim (repeatable; "
                             "e.g. --engine-arg=--enforce-eager)")


def _worker_counts(args: argparse.Namespace) -> tuple[int, int, int]:
    n_prefill, n_decode, n_workers = args.prefill, args.decode, args.workers
    if min(n_prefill, n_decode, n_workers) < 0:
        raise ValueError("worker counts must be >= 0")
    if n_prefill and not n_decode:
        raise ValueError("--prefill needs at least one --decode worker")
    if not (n_prefill or n_decode or n_workers):
        n_workers = 1
    return n_prefill, n_decode, n_workers


def _router_spec(args: argparse.Namespace, model: str, served: list[str], router_args: list[str]) -> ChildSpec:
    tandem = [sys.executable, "-m", "tandem.cli"]
    router_env = {"TANDEM_API_KEY": args.api_key} if args.api_key else {}
    router = [*tandem, "router", "--host", "127.0.0.1", "--port", str(args.port), "--model", model, *served,
              *router_args, *(["--redis-url", args.redis_url] if args.redis_url else []), *args.router_arg]
    return ChildSpec(f"router http://127.0.0.1:{args.port}", router, f"http://127.0.0.1:{args.port}/health", router_env)


def plan_vllm(args: argparse.Namespace, python: "VllmPython") -> list[ChildSpec]:
    """``--engine vllm``: vLLM OpenAI servers as the workers (each given its share of the cores), then the router."""
    from tandem.engine.model_files import DEFAULT_MODEL, ensure_converted
    from tandem.protocol.model_source import default_served_name
    from tandem.worker.vllm import share_cores, vllm_worker

    model = args.model or DEFAULT_MODEL
    n_prefill, n_decode, n_workers = _worker_counts(args)
    # vLLM loads a directory: the bundled GGUF (or any GGUF) goes through Tandem's converter first.
    model_dir = str(ensure_converted(model).weights_dir)
    served_name = args.served_model_name or default_served_name(model)
    roles = ["prefill"] * n_prefill + ["decode"] * n_decode + ["aggregated"] * n_workers
    cores = share_cores(len(roles)) if args.threads is None else [None] * len(roles)
    specs: list[ChildSpec] = []
    router_args: list[str] = []
    counters: dict[str, int] = {}
    for role, cpus in zip(roles, cores):
        worker = vllm_worker(python, role, model_dir, served_name, free_port(), free_port(),
                             side_channel_port=None if role == "aggregated" else free_port(),
                             engine_args=args.engine_arg, cpus=cpus, replay_port=free_port())
        if args.threads is not None:
            worker.env["OMP_NUM_THREADS"] = str(args.threads)
        index = counters[role] = counters.get(role, -1) + 1
        name = {"aggregated": "worker"}.get(role, role)
        specs.append(ChildSpec(f"vllm-{name}-{index} {worker.url}", worker.argv, worker.url + "/health", worker.env))
        router_args += worker.router_flag
    specs.append(_router_spec(args, model, ["--served-model-name", served_name], router_args))
    return specs


def plan(args: argparse.Namespace) -> list[ChildSpec]:
    """The children to start: workers first, the router last (it is given the workers' URLs)."""
    from tandem.engine.model_files import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    n_prefill, n_decode, n_workers = _worker_counts(args)
    engines = n_prefill + n_decode + n_workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // engines)
    # The router holds the API key; workers on 127.0.0.1 behind it must not demand one of their own.
    worker_env = {"TANDEM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "TANDEM_API_KEY": ""}
    tandem = [sys.executable, "-m", "tandem.cli"]
    served = ["--served-model-name", args.served_model_name] if args.served_model_name else []
    redis = ["--kv-events-redis", args.redis_url] if args.redis_url else []
    specs: list[ChildSpec] = []
    router_args: list[str] = []
    for role, count in (("prefill", n_prefill), ("decode", n_decode), ("serve", n_workers)):
        for i in range(count):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [*tandem, role, "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url, "--model", model,
                    *served, *redis]
            if role != "serve":
                argv += ["--kv-port", str(free_port())]
            name = {"serve": "worker"}.get(role, role)
            specs.append(ChildSpec(f"{name}-{i} {url}", argv, url + "/health", dict(worker_env)))
            router_args += [f"--{name}", url]
    specs.append(_router_spec(args, model, served, router_args))
    return specs


def run(args: argparse.Namespace) -> int:
    try:
        if args.engine == "vllm":
            from tandem.worker.vllm import VllmNotFoundError, find_vllm_python

            try:
                python = find_vllm_python(args.engine_python)
            except VllmNotFoundError as exc:
                print(f"tandem up: {exc}", file=sys.stderr)
                return 2
            print(f"tandem up: vLLM {python.version} ({python.device}) from {python.executable}", flush=True)
            specs = plan_vllm(args, python)
        else:
            if args.engine_python or args.engine_arg:
                raise ValueError("--engine-python and --engine-arg apply to --engine vllm only")
            specs = plan(args)
    except ValueError as exc:
        print(f"tandem up: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(args.stop_timeout, log=lambda m: print(m, flush=True))
    status = 0
    try:
        *worker_specs, router_spec = specs
        print(f"tandem up: starting {len(worker_specs)} worker(s)", flush=True)
        workers = [supervisor.start(s) for s in worker_specs]
        if not supervisor.wait_healthy(workers, args.startup_timeout, stop):
            return 130 if received else 1
        router = supervisor.start(router_spec)
        if not supervisor.wait_healthy([router], args.startup_timeout, stop):
            return 130 if received else 1
        print(f"tandem up: ready at http://127.0.0.1:{args.port}/v1 (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            dead = supervisor.dead()
            if dead:
                names = ", ".join(f"{c.spec.name} (status {c.proc.returncode})" for c in dead)
                print(f"tandem up: {names} exited; stopping everything", flush=True)
                status = 1
                break
        return status
    finally:
        print("tandem up: stopping", flush=True)
        supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("tandem up: stopped", flush=True)
