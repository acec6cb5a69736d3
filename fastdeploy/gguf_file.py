"""One parsed GGUFReader per model file and process.

gguf's reader builds a numpy view per metadata item, so the ~100k vocabulary and merge strings of
a chat model take seconds to parse; the loader (types, then tensors) and the tokenizer of one
process share a single parse instead of repeating it.
"""
from __future__ import annotations

import functools
import os

from gguf import GGUFReader


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """The file's reader (read-only memory map), parsed once per (path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _parse(real, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse(path: str, size: int, mtime_ns: int) -> GGUFReader:
    del size, mtime_ns  # cache key only: a rewritten file is parsed again
    return GGUFReader(path, "r")
