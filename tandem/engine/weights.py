"""Loading model weights: Hugging Face directories (safetensors) and GGUF files via transformers.

GGUF sources are dequantized once by transformers and saved as one ``model.safetensors`` plus
``config.json`` and the tokenizer files into the cache directory (``model_files.ResolvedModel.cache_dir``);
every later load reads that copy directly.

Run ``python -m tandem.engine.weights convert MODEL`` to convert ahead of time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.engine.model_files import ModelNotFoundError, ResolvedModel, resolve_model

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """The weights exist but cannot be used (corrupt file, unsupported architecture...)."""


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", module="transformers")


def convert_gguf(resolved: ResolvedModel) -> Path:
    """Dequantize a GGUF model into the cache directory; returns that directory. Shows progress."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolved.cache_dir
    if (target / "model.safetensors").exists():
        return target
    src = resolved.directory / (resolved.gguf_file or "")
    print(f"tandem: converting {src.name} once (dequantizing GGUF; cached in {target})", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.directory, gguf_file=resolved.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.directory, gguf_file=resolved.gguf_file, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise WeightsError(f"cannot read GGUF file {src}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    # NOTE: a GGUF-loaded model carries its quantizer; drop it so save_pretrained writes plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
        tokenizer.save_pretrained(tmp)
        shards = sorted(tmp.glob("*.safetensors"))
        if len(shards) == 1 and shards[0].name != "model.safetensors":
            shards[0].rename(tmp / "model.safetensors")
        os.replace(tmp, target)  # atomic: concurrent converters never see a half-written copy
    except OSError:
        if (target / "model.safetensors").exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(weights_dir: Path) -> dict:
    try:
        return json.loads((weights_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {weights_dir / 'config.json'}: {exc}") from exc


def load_state_dict(weights_dir: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of every safetensors shard in ``weights_dir`` (names as in the HF checkpoint); with ``keep``,
    only those it accepts (a multimodal checkpoint's vision tower is never read for a text model)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors files in {weights_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    if keep is None or keep(name):
                        state[name] = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"corrupt weights file {f}: {exc}") from exc
    return state


def prepare(model: str | None) -> tuple[ResolvedModel, Path]:
    """Resolve ``model`` and make sure converted weights exist; returns (resolved, weights_dir)."""
    resolved = resolve_model(model)
    if resolved.gguf_file is not None:
        convert_gguf(resolved)
    return resolved, resolved.weights_dir


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "convert":
        print("usage: python -m tandem.engine.weights convert MODEL", file=sys.stderr)
        return 2
    try:
        _, path = prepare(argv[1])
    except (ModelNotFoundError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
