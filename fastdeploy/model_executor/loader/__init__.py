"""Model file loaders: every format ends as (ModelArchConfig, canonical float32 weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdeploy.model_executor.loader.gguf_loader import load_gguf
from fastdeploy.model_executor.model_config import ModelArchConfig


def load_model_weights(path: str) -> tuple[ModelArchConfig, dict[str, np.ndarray]]:
    """Load a resolved model path (see fastdeploy.model_store.resolve_model)."""
    if Path(path).is_file():
        return load_gguf(path)
    from fastdeploy.model_executor.loader.safetensors_loader import load_safetensors_dir

    return load_safetensors_dir(path)


__all__ = ["load_gguf", "load_model_weights"]

from fastdeploy.model_executor.loader.safetensors_loader import load_safetensors_dir  # noqa: E402

__all__ += ["load_safetensors_dir"]
