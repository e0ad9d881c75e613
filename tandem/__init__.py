"""Tandem: a Kubernetes-native LLM serving platform.

``from tandem import LLM, SamplingParams`` is the offline Python API. Importing this package is
cheap: the engine (and torch) load only when ``LLM`` or ``SamplingParams`` are first touched, so
torch-free components (the router, the operator) can live in the same package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tandem.engine.llm import LLM
    from tandem.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from tandem.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tandem.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
