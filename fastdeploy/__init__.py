"""fastdeploy: LLM inference and serving on Paddle.

`LLM` is imported lazily so light processes (api workers, tokenizers, detokenizers) that import
`fastdeploy.*` modules never pay for importing Paddle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastdeploy.engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from fastdeploy.entrypoints.llm import LLM


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from fastdeploy.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'fastdeploy' has no attribute {name!r}")
