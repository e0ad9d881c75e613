"""`tandem operator` as a real process against the emulator: reconciles, serves /healthz and /metrics, stops on SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import httpx
import pytest

from operator_support import LLMD_API, NAMESPACE, Cluster, eventually
from tandem.cli import build_parser
from tandem.ports import free_port


def test_arguments_parse_and_bad_values_are_refused():
    parser = build_parser("operator")
    args = parser.parse_args(["operator", "-n", "a", "-n", "b", "--resync-seconds", "5"])
    assert args.namespace == ["a", "b"] and args.resync_seconds == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["operator", "--namespace", "a", "--all-namespaces"])
    from tandem.operator.cli import run
    with pytest.raises(SystemExit, match="--resync-seconds must be positive"):
        run(parser.parse_args(["operator", "--resync-seconds", "0"]))


async def test_operator_process_reconciles_and_serves_health_and_metrics(cluster: Cluster):
    liveness, metrics = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        # NOTE: cluster-wide: with --namespace kopf lists /api/v1/namespaces, a path kmock 0.8 cannot parse.
        sys.executable, "-m", "tandem.cli", "operator", "--server", cluster.url, "--all-namespaces",
        "--liveness-host", "127.0.0.1", "--liveness-port", str(liveness),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics), "--resync-seconds", "1",
        "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await cluster.user.create({"apiVersion": LLMD_API, "kind": "LLMDeployment",
                                   "metadata": {"name": "p", "namespace": NAMESPACE}, "spec": {}})
        await eventually(lambda: cluster.obj("apps/v1", "deployments", "p-router"), timeout=30)
        await eventually(lambda: cluster.llmd("p").get("status", {}).get("phase") == "Progressing")
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{liveness}/healthz")
            assert health.status_code == 200
            text = (await http.get(f"http://127.0.0.1:{metrics}/metrics")).text
        assert 'tandem:operator_reconciles_total{result="ok"' in text
        assert "tandem:operator_reconcile_duration_seconds_bucket" in text
        assert "process_resident_memory_bytes" in text and "python_gc_collections_total" in text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            raise
    output = (await proc.stdout.read()).decode()
    assert proc.returncode == 0, output


# --- tandem operator render -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def render_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from tandem.cli import main

    code = main(["operator", "render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_examples_directory_is_not_empty():
    # The parametrized test below iterates examples/; an empty glob would make it vacuous.
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_render_prints_exactly_what_the_operator_applies_for_every_example(capsys, example):
    import kubernetes_validate
    import yaml

    from tandem.operator.render import render

    code, out, err = render_cli(capsys, str(example))
    assert code == 0 and err == ""
    printed = list(yaml.safe_load_all(out))
    obj = yaml.safe_load(example.read_text())
    obj["metadata"].update(namespace="default", uid="any")
    expected = render(obj)
    for m in expected:
        del m["metadata"]["ownerReferences"]  # no uid before the API server creates the object
    assert printed == expected
    for m in printed:
        kubernetes_validate.validate(m, "1.37.0", strict=True)
    assert out.startswith("# ownerReferences left out")


def test_render_namespace_and_a_known_uid(capsys, tmp_path):
    import yaml

    example = ROOT / "examples" / "llmdeployment-aggregated.yaml"
    code, out, _ = render_cli(capsys, str(example), "--namespace", "prod")
    assert code == 0
    assert {m["metadata"]["namespace"] for m in yaml.safe_load_all(out)} == {"prod"}
    # An object read back from the cluster has its uid: the children then point at it, as the operator's do.
    obj = yaml.safe_load(example.read_text())
    obj["metadata"].update(namespace="team", uid="1234-abcd")
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(obj))
    code, out, _ = render_cli(capsys, str(path))
    manifests = list(yaml.safe_load_all(out))
    assert code == 0 and all(m["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd" for m in manifests)
    assert {m["metadata"]["namespace"] for m in manifests} == {"team"}
    code, _, err = render_cli(capsys, str(path), "-n", "prod")
    assert code == 1 and err == "error: " + f"{path}: metadata.namespace is 'team' but --namespace is 'prod'\n"


def test_render_reads_a_stream_from_stdin(capsys, monkeypatch):
    import io

    import yaml

    two = "\n---\n".join(yaml.safe_dump({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                                         "metadata": {"name": n}, "spec": {}}) for n in ("a", "b"))
    monkeypatch.setattr("sys.stdin", io.StringIO(two))
    code, out, _ = render_cli(capsys, "-")
    deployments = [m["metadata"]["name"] for m in yaml.safe_load_all(out) if m["kind"] == "Deployment"]
    assert code == 0 and deployments == ["a-decode", "a-router", "b-decode", "b-router"]


@pytest.mark.parametrize("content, message", [
    ("apiVersion: tandem.dev/v1alpha1\nkind: LLMDeployment\nmetadata: {name: m}\n"
     "spec: {decode: {replicas: -1}, engine: {devcie: cuda}}\n",
     "error: {path} (m): spec.decode.replicas: must be >= 0, got -1; spec.engine.devcie: unknown field"),
    ("apiVersion: tandem.dev/v1alpha1\nkind: LLMDeployment\nmetadata: {name: m}\n"
     "spec: {model: {uri: hf://o/m}, engine: {kvCacheMemory: '0.4'}, decode: {resources: {limits: "
     "{nvidia.com/gpu: 1}}}}\n",
     "error: {path} (m): spec.engine.kvCacheMemory: a fraction is a share of a CPU worker's memory limit"),
    ("apiVersion: tandem.dev/v1alpha1\nkind: LLMDeployment\nmetadata: {name: " + "n" * 41 + "}\nspec: {}\n",
     "error: {path} (" + "n" * 41 + "): metadata.name must be at most 40 characters"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: m}\n",
     "error: {path}: not an LLMDeployment (apiVersion tandem.dev/v1alpha1); found apps/v1/Deployment"),
    ("apiVersion: tandem.dev/v1alpha1\nkind: LLMDeployment\nspec: {}\n", "error: {path}: metadata.name: required"),
    ("spec: [unclosed\n", "error: {path}: not valid YAML"),
    ("", "error: {path}: no LLMDeployment in the file"),
], ids=["spec-fields", "operator-rule", "name-length", "other-kind", "no-name", "bad-yaml", "empty"])
def test_render_refuses_invalid_files_with_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "llmd.yaml"
    path.write_text(content)
    code, out, err = render_cli(capsys, str(path))
    assert code == 1 and out == ""
    assert err.startswith(message.format(path=path)) and err.count("\n") == 1, err


def test_render_as_a_process_exits_1_without_a_traceback(tmp_path):
    import subprocess

    missing = tmp_path / "nope.yaml"
    result = subprocess.run([sys.executable, "-m", "tandem.cli", "operator", "render", str(missing)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: {missing}: No such file or directory\n"
