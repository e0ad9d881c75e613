"""Shared fixtures: the real bundled model (converted once), transformers references, helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# Two cores are shared by everything a test starts; keep torch inside the test process modest.
os.environ.setdefault("TANDEM_NUM_THREADS", "2")
# NOTE: with spinning OpenMP workers, a process sharing its cores with others (servers the tests
# start, the other test processes) runs up to 10x slower; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Directory of the bundled SmolLM2-135M-Instruct, converted to safetensors (cached)."""
    from tandem.engine.model_files import ensure_converted

    return ensure_converted(None).weights_dir


@pytest.fixture(scope="session")
def hf_smol(smol_dir):
    """transformers' own SmolLM2 in float32: the reference for greedy equality."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def cpu_ops():
    """Tandem's CPU kernels (``tandem/engine/ops``), built or loaded once. The test machine has g++ and ninja: a
    failed build is a failure, not a skip."""
    from tandem.engine.ops import fused

    loaded = fused.load()
    if loaded is None:
        pytest.fail("the CPU ops did not build")
    return loaded
