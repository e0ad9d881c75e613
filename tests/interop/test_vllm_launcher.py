"""The vLLM launcher's plan: flags per role, cores, ports, and what happens without vLLM (no servers started)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from tandem import up
from tandem.worker.vllm import VllmNotFoundError, VllmPython, find_vllm_python, share_cores, vllm_worker

CPU = VllmPython("/opt/vllm/bin/python", "0.32.0", "cpu")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(argv)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_tandems_own_python_is_refused_with_how_to_install_vllm():
    with pytest.raises(VllmNotFoundError, match="cannot import vllm.*make vllm-env"):
        find_vllm_python(sys.executable)
    with pytest.raises(VllmNotFoundError, match="no such file"):
        find_vllm_python("/nonexistent/python")


def test_up_without_vllm_exits_2_with_the_reason(capsys):
    assert up.run(parse("--engine", "vllm", "--engine-python", sys.executable)) == 2
    assert "make vllm-env" in capsys.readouterr().err
    assert up.run(parse("--engine-arg=--enforce-eager")) == 2
    assert "--engine vllm only" in capsys.readouterr().err


def test_plan_for_vllm_prefill_decode_and_its_router():
    specs = up.plan_vllm(parse("--engine", "vllm", "--prefill", "1", "--decode", "2", "--served-model-name", "smol",
                               "--engine-arg=--enforce-eager", "--engine-arg=--block-size", "--engine-arg=64"),
                         CPU)
    *workers, router = specs
    assert [s.name.split()[0] for s in workers] == ["vllm-prefill-0", "vllm-decode-0", "vllm-decode-1"]
    prefill = workers[0].argv
    assert prefill[:3] == [CPU.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(prefill, "--served-model-name") == "smol"
    assert flag(prefill, "--block-size") == "64" and prefill.count("--block-size") == 1  # the user's wins
    assert prefill[-3:] == ["--enforce-eager", "--block-size", "64"]
    events = json.loads(flag(prefill, "--kv-events-config"))
    assert events["endpoint"].startswith("tcp://*:") and events["topic"] == "kv-events"
    transfer = json.loads(flag(prefill, "--kv-transfer-config"))
    assert transfer == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu"}
    assert json.loads(flag(workers[1].argv, "--kv-transfer-config"))["kv_role"] == "kv_consumer"
    side_channels = {w.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for w in workers}
    assert len(side_channels) == 3
    assert all(w.env["VLLM_API_KEY"] == "" for w in workers)  # the router holds the key
    # The router knows each worker's kind, role and KV-event endpoint.
    port = events["endpoint"].rsplit(":", 1)[1]
    replay = events["replay_endpoint"].rsplit(":", 1)[1]
    assert (f"http://127.0.0.1:{flag(prefill, '--port')},kv-events=tcp://127.0.0.1:{port},"
            f"replay=tcp://127.0.0.1:{replay}") in router.argv
    assert router.argv.count("--vllm-decode") == 2 and "--served-model-name" in router.argv


def test_aggregated_workers_get_no_connector_and_a_core_each():
    worker = vllm_worker(CPU, "aggregated", "/m", "smol", 1, 2, cpus=[1])
    assert "--kv-transfer-config" not in worker.argv
    assert worker.env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and worker.env["OMP_NUM_THREADS"] == "1"
    assert worker.router_flag == ["--vllm-worker", "http://127.0.0.1:1,kv-events=tcp://127.0.0.1:2"]
    gpu = vllm_worker(VllmPython("p", "0.32.0", "cuda"), "decode", "/m", "smol", 1, 2, side_channel_port=3)
    assert "kv_buffer_device" not in flag(gpu.argv, "--kv-transfer-config")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in gpu.env
    assert share_cores(2, [0, 1]) == [[0], [1]]
    assert share_cores(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert share_cores(3, [0, 1]) == [None, None, None]  # fewer cores than workers: shared, one thread each
    with pytest.raises(ValueError, match="side-channel"):
        vllm_worker(CPU, "prefill", "/m", "smol", 1, 2)
