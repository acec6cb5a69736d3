"""Logging setup: the "fastdeploy" logger also writes to $FD_LOG_DIR/fastdeploy.log (default ./log)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def log_dir() -> Path:
    return Path(os.environ.get("FD_LOG_DIR", "log"))


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Idempotent: attaches one file handler to the fastdeploy logger (one per process)."""
    logger = logging.getLogger("fastdeploy")
    logger.setLevel(level)
    if not any(getattr(h, "_fastdeploy_file", False) for h in logger.handlers):
        directory = log_dir()
        directory.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(directory / "fastdeploy.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._fastdeploy_file = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger
