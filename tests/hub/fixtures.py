"""Fixtures for tests that download from the Hub stand-in: a tiny random Llama, the Hub, a tmp HF_HOME."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hub.server import FakeHub, Repo, files_of

TINY_REPO = "tandem-test/tiny-llama"
GATED_REPO = "tandem-test/gated-llama"
NO_SAFETENSORS_REPO = "tandem-test/bin-only"
GOOD_TOKEN = "hf_tandem_test_granted"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Files a real repository carries that serving must not download.
EXTRAS = {"README.md": b"# tiny\n", "original/consolidated.pth": b"\0" * 4096, "pytorch_model.bin": b"\0" * 4096}


def build_tiny_llama(target: Path, tokenizer_source: Path) -> Path:
    """A 2-layer Llama with random weights, saved as safetensors with the SmolLM2 tokenizer (vocab 49,152)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                         rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source / name, target / name)
    return target


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_dir) -> Path:
    """The tiny model as files on disk (what the Hub stand-in serves)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_dir)


def make_hub(model_dir: Path) -> FakeHub:
    """A Hub with a public and a gated copy of the tiny model, and a repository holding only a .bin checkpoint."""
    files = files_of(model_dir) | EXTRAS
    bin_only = {name: data for name, data in files.items() if not name.endswith(".safetensors")}
    return FakeHub(
        repos={TINY_REPO: Repo(files), GATED_REPO: Repo(dict(files), gated=True), NO_SAFETENSORS_REPO: Repo(bin_only)},
        tokens=frozenset({GOOD_TOKEN}),
    )


def hub_env(hub_url: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """Environment for a child process using ``hub_url`` as the Hub and ``hf_home`` as its cache."""
    return {"HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "HF_TOKEN": "",
            "HF_TOKEN_PATH": str(hf_home / "no-token"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1", **extra}
