"""Building Tandem's C++ CPU kernels: ``torch.utils.cpp_extension`` at start-up, cached on disk.

Each extension is compiled once per machine and torch version into ``<tandem cache>/torch_extensions/<torch>/<name>``
(~50 s on two cores for both extensions, logged); later starts load the cached build in well under a second. Sources share
``tandem/engine/csrc/simd.h``. Nothing is compiled on the request path: callers build at start-up and fall back,
logged, to the torch implementations when a build fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from tandem.protocol.model_source import cache_root

logger = logging.getLogger(__name__)

INCLUDE_DIR = Path(__file__).resolve().parent.parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


class OperatorBuildError(RuntimeError):
    """A C++ operator could not be built or loaded here (no compiler, no ninja, a compile error)."""


def build_dir(name: str | None = None) -> Path:
    """Where built operators are cached: ``<tandem cache>/torch_extensions/<torch version>[/<name>]``."""
    root = cache_root() / "torch_extensions" / torch.__version__.replace("+", "_")
    return root if name is None else root / name


def build_extension(name: str, sources: Sequence[Path], what: str, verbose: bool = False) -> ModuleType:
    """Build (first time) or load (cached) extension ``name``; ``what`` names it in logs and errors. Raises
    ``OperatorBuildError``."""
    directory = build_dir(name)
    started = time.monotonic()
    logger.info("%s: building or loading the operator in %s ...", what, directory)
    from torch.utils import cpp_extension

    try:
        directory.mkdir(parents=True, exist_ok=True)  # a read-only cache is a build failure (fallback), not a crash
        module = cpp_extension.load(
            name=name, sources=[str(s) for s in sources], build_directory=str(directory), verbose=verbose,
            extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], extra_include_paths=[str(INCLUDE_DIR)],
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise OperatorBuildError(f"{what} operator: {str(exc).strip().splitlines()[-1]}") from exc
    logger.info("%s: operator ready in %.1fs", what, time.monotonic() - started)
    return module
