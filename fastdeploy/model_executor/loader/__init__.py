"""Model file loaders: every format ends as (ModelArchConfig, canonical float32 weights; a GGUF's
Q4_1 matrices optionally as Grid4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdeploy.model_executor.layers.grid4 import Grid4
from fastdeploy.model_executor.loader.gguf_loader import load_gguf
from fastdeploy.model_executor.model_config import ModelArchConfig


def load_model_weights(path: str, keep_grids: bool = False
                       ) -> tuple[ModelArchConfig, dict[str, np.ndarray | Grid4]]:
    """Load a resolved model path (see fastdeploy.model_store.resolve_model). keep_grids: a GGUF's
    Q4_1 matrices come as Grid4 (for wint8 layers) instead of float32."""
    if Path(path).is_file():
        return load_gguf(path, keep_grids)
    from fastdeploy.model_executor.loader.safetensors_loader import load_safetensors_dir

    return load_safetensors_dir(path)


__all__ = ["load_gguf", "load_model_weights"]

from fastdeploy.model_executor.loader.safetensors_loader import load_safetensors_dir  # noqa: E402

__all__ += ["load_safetensors_dir"]
