"""Models from the Hub: ``tandem download`` / ``serve`` against the Hub stand-in, the cache, offline restarts,
the router's tokenizer, and one clear line with exit status 1 for each failure.

Every test that starts a process is marked slow; the stand-in serves a tiny random Llama the session builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hub.fixtures import (  # noqa: F401 - tiny_llama_dir is a fixture
    GATED_REPO,
    GOOD_TOKEN,
    NO_SAFETENSORS_REPO,
    TINY_REPO,
    hub_env,
    make_hub,
    tiny_llama_dir,
)
from procs import ROOT, free_port, start_serve

from tandem.protocol.model_source import HubModel, ModelNotFoundError, hub_model_of, resolve_model

SERVING_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def hub(tiny_llama_dir):
    hub = make_hub(tiny_llama_dir).start()
    yield hub
    hub.stop()


def tandem(*argv: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", *argv], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 1, no traceback, and the error as the last line of stderr, naming ``needles``."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot_files(hf_home: Path, repo: str) -> set[str]:
    snapshots = list((hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*"))
    assert len(snapshots) == 1
    return {p.relative_to(snapshots[0]).as_posix() for p in snapshots[0].rglob("*") if p.is_file()}


# ---- resolution rules (no network) ----------------------------------------------------------------
def test_which_names_go_to_the_hub(tmp_path):
    assert hub_model_of("hf://Org/Name@v1.0") == HubModel("Org/Name", "v1.0")
    assert hub_model_of("Org/Name") == HubModel("Org/Name")
    assert hub_model_of("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # bundled
    assert hub_model_of("pvc://claim/models/x") is None and hub_model_of("file:///models/x") is None
    assert hub_model_of(str(tmp_path)) is None
    with pytest.raises(ModelNotFoundError, match="expected hf://ORG/NAME"):
        hub_model_of("hf://no-org")


def test_pvc_and_file_uris_resolve_to_local_directories(tmp_path, monkeypatch):
    model_dir = tmp_path / "llama" / "v1"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setenv("TANDEM_MODELS_MOUNT", str(tmp_path))
    resolved = resolve_model("pvc://models-claim/llama/v1")
    assert resolved.weights_dir == model_dir and resolved.gguf_file is None
    assert resolve_model(f"file://{model_dir}").weights_dir == model_dir
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("pvc://models-claim/absent")


# ---- download ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_download_fetches_only_what_serving_needs_with_progress(hub, tmp_path):
    proc = tandem("download", "--model", f"hf://{TINY_REPO}", env=hub_env(hub.url, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_dir()
    # README.md, pytorch_model.bin and original/ are in the repository but not fetched.
    assert snapshot_files(tmp_path, TINY_REPO) == SERVING_FILES
    assert "Fetching 6 files" in proc.stderr and "100%" in proc.stderr  # the progress bar, stderr not a tty


@pytest.mark.slow
def test_download_at_a_revision_and_without_progress_bars_when_disabled(hub, tmp_path):
    commit = hub.repos[TINY_REPO].commit
    proc = tandem("download", "--model", f"hf://{TINY_REPO}@{commit}",
                  env=hub_env(hub.url, tmp_path, HF_HUB_DISABLE_PROGRESS_BARS="1"))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).name == commit
    assert "Fetching" not in proc.stderr and "%|" not in proc.stderr


@pytest.mark.slow
def test_download_during_a_hub_outage_uses_a_complete_cached_copy(tiny_llama_dir, tmp_path):
    own_hub = make_hub(tiny_llama_dir).start()
    try:
        env = hub_env(own_hub.url, tmp_path)
        assert tandem("download", "--model", f"hf://{TINY_REPO}", env=env).returncode == 0
        own_hub.outage = True
        proc = tandem("download", "--model", f"hf://{TINY_REPO}", env=env)
        assert proc.returncode == 0, proc.stderr
        assert "503" in proc.stderr and "using the cached copy" in proc.stderr
        # Without a cached copy the outage is an error.
        other = tandem("download", "--model", f"hf://{GATED_REPO}", env=env)
        assert_one_error_line(other, "answered 503")
    finally:
        own_hub.stop()


@pytest.mark.slow
def test_download_tokenizer_only(hub, tmp_path):
    proc = tandem("download", "--model", TINY_REPO, "--tokenizer-only", env=hub_env(hub.url, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert snapshot_files(tmp_path, TINY_REPO) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


@pytest.mark.slow
def test_a_gated_repository_downloads_with_a_token_file(hub, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(GOOD_TOKEN)
    proc = tandem("download", "--model", f"hf://{GATED_REPO}",
                  env=hub_env(hub.url, tmp_path, HF_TOKEN_PATH=str(token_file)))
    assert proc.returncode == 0, proc.stderr
    assert ("GET", f"/{GATED_REPO}/resolve/{hub.repos[GATED_REPO].commit}/model.safetensors",
            f"Bearer {GOOD_TOKEN}") in hub.requests


@pytest.mark.slow
@pytest.mark.parametrize("model, extra, needles", [
    ("tandem-test/absent", {}, ["repository tandem-test/absent not found"]),
    (f"hf://{GATED_REPO}", {}, ["gated", "HF_TOKEN", "model.hfTokenSecretRef"]),
    (f"hf://{GATED_REPO}", {"HF_TOKEN": "hf_not_granted"}, ["gated", "no access", "request access"]),
    (f"hf://{NO_SAFETENSORS_REPO}", {}, ["no .safetensors weights", "pytorch_model.bin"]),
    (f"hf://{TINY_REPO}@v9", {}, ["revision 'v9' not found"]),
    (f"hf://{TINY_REPO}", {"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE", "tandem download", "pvc://"]),
], ids=["unknown", "gated-no-token", "gated-wrong-token", "no-safetensors", "bad-revision", "offline-uncached"])
def test_download_failures_are_one_line_and_status_1(hub, tmp_path, model, extra, needles):
    proc = tandem("download", "--model", model, env=hub_env(hub.url, tmp_path, **extra))
    assert_one_error_line(proc, *needles)
    assert not list((tmp_path / "hub").glob("models--*/snapshots/*/*.safetensors"))


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_saying_how_to_fill_the_cache(tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}"
    proc = tandem("download", "--model", f"hf://{TINY_REPO}", env=hub_env(unreachable, tmp_path))
    assert_one_error_line(proc, "cannot reach the Hub", unreachable, "tandem download", "pvc://")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "generate", "prefill", "decode"])
def test_engine_commands_fail_with_one_line_before_starting(hub, tmp_path, command):
    argv = [command, "--model", f"hf://{GATED_REPO}"] + (["hi"] if command == "generate" else [])
    proc = tandem(*argv, env=hub_env(hub.url, tmp_path))
    assert_one_error_line(proc, "gated", "HF_TOKEN")


# ---- the router's tokenizer ------------------------------------------------------------------------
ROUTER_TOKENIZE = """
import sys
from tandem.router.tokenizer import load_model_tokenizer
tokenizer = load_model_tokenizer(sys.argv[1])
assert "torch" not in sys.modules and "tandem.engine" not in sys.modules, "the router imported the engine"
print(tokenizer.encode_prompt("The router tokenizes like the engine."))
"""


@pytest.mark.slow
def test_router_fetches_tokenizer_files_only_and_matches_the_engine_tokenizer(hub, tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    proc = subprocess.run([sys.executable, "-c", ROUTER_TOKENIZE, f"hf://{TINY_REPO}"], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **hub_env(hub.url, tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = AutoTokenizer.from_pretrained(tiny_llama_dir)("The router tokenizes like the engine.").input_ids
    assert proc.stdout.strip() == str(expected)
    files = snapshot_files(tmp_path, TINY_REPO)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(name.endswith(".safetensors") for name in files)


@pytest.mark.slow
def test_router_with_an_unknown_repository_is_one_line_and_status_1(hub, tmp_path):
    proc = tandem("router", "--model", "hf://tandem-test/absent", "--worker", "http://127.0.0.1:9",
                  "--port", str(free_port()), env=hub_env(hub.url, tmp_path), timeout=60)
    assert_one_error_line(proc, "repository tandem-test/absent not found")


# ---- serve: download, serve, restart offline from the cache ----------------------------------------
@pytest.mark.slow
def test_serve_downloads_then_restarts_offline_from_the_cache(tiny_llama_dir, tmp_path):
    own_hub = make_hub(tiny_llama_dir).start()  # this test stops its Hub
    args = ("--model", f"hf://{TINY_REPO}", "--max-model-len", "256", "--kv-cache-memory", "64MiB", "--threads", "1")
    try:
        env = hub_env(own_hub.url, tmp_path)
        server = start_serve(*args, env=env)
        try:
            first = complete(server.url)
            assert "Fetching 6 files" in server.output() and "100%" in server.output()
            # Clients name the model by its repository id, as with `vllm serve ORG/NAME` and in a cluster.
            models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
            assert [m["id"] for m in models] == [TINY_REPO]
        finally:
            server.terminate()
    finally:
        own_hub.stop()
    # The Hub is gone and the client may not touch the network: everything comes from HF_HOME.
    server = start_serve(*args, env={**env, "HF_HUB_OFFLINE": "1"})
    try:
        assert complete(server.url) == first  # greedy: the same weights give the same text
        assert "Fetching" not in server.output()
    finally:
        server.terminate()
    # The router resolves the same model's tokenizer from that cache, offline.
    proc = subprocess.run([sys.executable, "-c", ROUTER_TOKENIZE, f"hf://{TINY_REPO}"], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def complete(url: str) -> str:
    response = httpx.post(f"{url}/v1/completions", timeout=120,
                          json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 8
    return body["choices"][0]["text"]
