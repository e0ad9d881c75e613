"""KV cache memory sized to the container: cgroup v1/v2 limits read from laid-out trees, the GPU arithmetic."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub.fixtures import tiny_llama_dir  # noqa: F401 - a fixture

from tandem.engine.config import (
    GIB,
    CacheConfig,
    MemoryLimit,
    cgroup_memory_limit,
    gpu_kv_cache_size,
    kv_cache_size,
    memory_limit,
)

V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 writes for "no limit"


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup_v2(root: Path, limits: dict[str, str], own: str) -> Path:
    """A cgroup v2 mount as the kernel lays it out (``memory.max`` per group), and a /proc/self/cgroup."""
    _write(root, "cgroup.controllers", "cpuset cpu io memory pids\n")
    for group, value in limits.items():
        _write(root, f"{group}/memory.max".lstrip("/"), value + "\n")
    _write(root, "proc-self-cgroup", f"0::{own}\n")
    return root / "proc-self-cgroup"


def cgroup_v1(root: Path, limits: dict[str, str], own: str, controllers: str = "memory") -> Path:
    """A cgroup v1 hierarchy (the memory controller under ``memory/``) and a /proc/self/cgroup."""
    _write(root, "memory/memory.limit_in_bytes", V1_UNLIMITED + "\n")
    for group, value in limits.items():
        _write(root, f"memory/{group}/memory.limit_in_bytes".replace("//", "/"), value + "\n")
    _write(root, "proc-self-cgroup", f"12:pids:/\n4:{controllers}:{own}\n1:name=systemd:/\n0::/\n")
    return root / "proc-self-cgroup"


def test_v2_container_view_4gi_and_half_is_2gib(tmp_path):
    proc = cgroup_v2(tmp_path, {"": str(4 * GIB)}, "/")
    limit = cgroup_memory_limit(tmp_path, proc)
    assert limit == MemoryLimit(4 * GIB, "cgroup v2 memory.max")
    size = kv_cache_size("0.5", limit)
    assert size.num_bytes == 2 * GIB
    assert size.explanation == "KV cache: 0.5 x cgroup v2 memory.max 4.0 GiB = 2.0 GiB"


def test_v2_nested_groups_take_the_tightest_ancestor(tmp_path):
    # A pod's limit sits on the pod group; the container's own group says "max".
    proc = cgroup_v2(tmp_path, {"kubepods": str(16 * GIB), "kubepods/pod-a": str(4 * GIB),
                                "kubepods/pod-a/ctr": "max"}, "/kubepods/pod-a/ctr")
    assert cgroup_memory_limit(tmp_path, proc) == MemoryLimit(4 * GIB, "cgroup v2 memory.max")


def test_v2_without_a_limit_is_none_and_falls_back_to_host_ram(tmp_path):
    proc = cgroup_v2(tmp_path, {"": "max", "system.slice": "max"}, "/system.slice")
    assert cgroup_memory_limit(tmp_path, proc) is None
    limit = memory_limit(tmp_path, proc)
    assert limit.source == "host RAM"
    assert limit.num_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_v1_memory_controller_limit_of_the_process_group(tmp_path):
    proc = cgroup_v1(tmp_path, {"docker/abc": str(4 * GIB)}, "/docker/abc")
    assert cgroup_memory_limit(tmp_path, proc) == MemoryLimit(4 * GIB, "cgroup v1 memory.limit_in_bytes")


def test_v1_co_mounted_controllers_line(tmp_path):
    proc = cgroup_v1(tmp_path, {"kubepods/pod-b": str(3 * GIB)}, "/kubepods/pod-b", controllers="cpuacct,memory")
    assert cgroup_memory_limit(tmp_path, proc).num_bytes == 3 * GIB


def test_v1_private_view_reads_the_mounted_root(tmp_path):
    # Inside a container the hierarchy is mounted at the container's own group, while /proc/self/cgroup still
    # names the host's path, which does not exist under the mount.
    proc = cgroup_v1(tmp_path, {}, "/kubepods/pod-c/ctr")
    _write(tmp_path, "memory/memory.limit_in_bytes", str(4 * GIB))
    assert cgroup_memory_limit(tmp_path, proc).num_bytes == 4 * GIB


def test_v1_huge_value_means_no_limit(tmp_path):
    proc = cgroup_v1(tmp_path, {"docker/abc": V1_UNLIMITED}, "/docker/abc")
    assert cgroup_memory_limit(tmp_path, proc) is None
    assert memory_limit(tmp_path, proc).source == "host RAM"


def test_a_limit_above_host_ram_counts_as_host_ram(tmp_path):
    proc = cgroup_v2(tmp_path, {"": str(1 << 50)}, "/")
    assert memory_limit(tmp_path, proc).source == "host RAM"


def test_cgroup_root_from_the_environment(tmp_path, monkeypatch):
    cgroup_v2(tmp_path, {"": str(4 * GIB)}, "/")
    monkeypatch.setenv("TANDEM_CGROUP_ROOT", str(tmp_path))
    assert memory_limit(proc_self_cgroup=tmp_path / "proc-self-cgroup") == MemoryLimit(4 * GIB, "cgroup v2 memory.max")


def test_sizes_that_are_not_fractions_and_bad_values():
    assert kv_cache_size("512MiB").num_bytes == 512 << 20
    assert kv_cache_size("512MiB").explanation == "KV cache: 512 MiB (kv_cache_memory)"
    assert kv_cache_size("512MiB").fraction is None
    with pytest.raises(ValueError, match="^kv_cache_memory: .*'lots'"):
        kv_cache_size("lots")


def test_gpu_share_is_utilization_minus_what_is_in_use_and_the_activations():
    size = gpu_kv_cache_size(total_bytes=80 * GIB, utilization=0.9, in_use_bytes=20 * GIB, activation_bytes=2 * GIB)
    assert size.num_bytes == 50 * GIB  # 72 - 20 - 2
    assert size.explanation.endswith("= 50.0 GiB") and "0.9 x GPU memory 80.0 GiB" in size.explanation
    with pytest.raises(ValueError, match="^gpu_memory_utilization: "):
        gpu_kv_cache_size(total_bytes=16 * GIB, utilization=0.5, in_use_bytes=7 * GIB, activation_bytes=1 * GIB)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_gpu_memory_utilization_is_validated(value):
    with pytest.raises(ValueError, match="^gpu_memory_utilization: "):
        CacheConfig(gpu_memory_utilization=value)


@pytest.mark.slow
def test_config_module_stays_torch_free():
    code = "import sys, tandem.engine.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _engine_args(*argv: str) -> argparse.Namespace:
    from tandem.engine.cli import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_fraction_on_cuda_is_refused_naming_the_field():
    from tandem.engine.cli import engine_config_from_args

    with pytest.raises(ValueError, match="^kv_cache_memory: "):
        engine_config_from_args(_engine_args("--device", "cuda", "--kv-cache-memory", "0.5"))


@pytest.mark.slow
def test_cpu_worker_with_a_4gi_limit_and_half_sizes_a_2gib_pool(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    from tandem.engine.cli import engine_config_from_args
    from tandem.engine.llm_engine import LLMEngine

    root = tmp_path / "cgroup"
    cgroup_v2(root, {"": str(4 * GIB)}, "/")
    monkeypatch.setenv("TANDEM_CGROUP_ROOT", str(root))
    config = engine_config_from_args(_engine_args("--model", str(tiny_llama_dir), "--kv-cache-memory", "0.5",
                                                  "--max-model-len", "256", "--threads", "1"))
    assert "tandem: KV cache: 0.5 x cgroup v2 memory.max 4.0 GiB = 2.0 GiB" in capsys.readouterr().err
    assert config.cache.kv_cache_memory == 2 * GIB
    engine = LLMEngine(config, progress=False)
    try:
        layout = engine.runner.layout
        assert 2 * GIB - layout.bytes_per_block_all_layers < layout.total_bytes <= 2 * GIB
    finally:
        del engine
