"""Shared fixtures: the real default model, the golden reference data, one offline LLM, and the
native extension's build (test_linear.py and test_norm.py check more and have their own)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

os.environ.setdefault("FD_LOG_DIR", str(Path(__file__).resolve().parent.parent / "log"))


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from fastdeploy.model_store import default_model_path as fetch

    return fetch()


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((DATA / "golden_smollm2.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def llm(default_model_path):
    """One LLM for the default model, shared by the offline tests (load once, ~6 s)."""
    from fastdeploy import LLM

    return LLM(model=default_model_path, max_model_len=2048, num_gpu_blocks_override=256, max_num_seqs=32,
               quantization="none", kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def native() -> None:
    """The native extension (every op of native/) is built, or the test is skipped; under
    FASTDEPLOY_REQUIRE_NATIVE (make test) a failed build fails the test instead."""
    from fastdeploy.model_executor.ops import native_build

    try:
        native_build.native_ops()
    except native_build.NativeBuildError as exc:
        if os.environ.get("FASTDEPLOY_REQUIRE_NATIVE"):
            pytest.fail(f"native ops failed to build and FASTDEPLOY_REQUIRE_NATIVE is set: {exc}")
        pytest.skip(f"native ops unavailable: {str(exc).splitlines()[0]}")
