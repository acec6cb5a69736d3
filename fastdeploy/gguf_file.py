"""GGUF files: one parsed GGUFReader per file and process, and a cached index of the file's
metadata and tensors.

gguf's reader builds a numpy view per metadata item, so the ~100k vocabulary and merge strings of
a chat model take seconds to parse. The loader (types, then tensors) and the tokenizer of one
process share a single parse, and the engine reads its model through the index: the scalar
metadata and each tensor's type, shape and place in the file, kept in the file cache
(file_cache.py) after the first parse, so later starts map the file and never parse it.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import msgspec
import numpy as np
from gguf import GGUFReader

from fastdeploy.file_cache import FileCache, file_version

# Metadata arrays the index leaves out: the tokenizer reads them (input/gguf_tokenizer.py).
_TOKENIZER_ARRAYS = ("tokens", "token_type", "merges", "scores")


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """The file's reader (read-only memory map), parsed once per (path, size, mtime)."""
    return _parse(*file_version(path))


@functools.lru_cache(maxsize=2)
def _parse(path: str, size: int, mtime_ns: int) -> GGUFReader:
    del size, mtime_ns  # cache key only: a rewritten file is parsed again
    return GGUFReader(path, "r")


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file, as gguf's ReaderTensor describes it."""

    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # ggml order: the innermost dimension first
    data: np.ndarray  # read-only view of the file: elements for float/int types, block bytes otherwise


class GGUFIndex(NamedTuple):
    metadata: dict[str, Any]  # scalar and string metadata, and short arrays
    tensors: list[GGUFTensor]


class _TensorEntry(msgspec.Struct, array_like=True):
    name: str
    tensor_type: int
    shape: list[int]
    offset: int  # of the data, from the start of the file
    dtype: str  # numpy dtype string of the data view, byte order included
    data_shape: list[int]


class _IndexEntry(msgspec.Struct):
    metadata: dict[str, Any]
    tensors: list[_TensorEntry]


_INDEX_CACHE = FileCache("gguf-index", version=1, value_type=_IndexEntry)


def open_gguf_index(path: str | os.PathLike[str]) -> GGUFIndex:
    """The file's metadata and tensors, from the index cache when this version of the file was
    indexed before; once per (path, size, mtime) and process."""
    return _index(*file_version(path))


@functools.lru_cache(maxsize=2)
def _index(path: str, size: int, mtime_ns: int) -> GGUFIndex:
    del mtime_ns  # cache key only
    entry = _INDEX_CACHE.get(path, lambda: _build_index(path))
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for t in entry.tensors:
        dtype = np.dtype(t.dtype)
        nbytes = math.prod(t.data_shape) * dtype.itemsize
        if t.offset < 0 or t.offset + nbytes > size:
            raise ValueError(f"{path}: tensor {t.name!r} lies outside the file")
        data = mapped[t.offset:t.offset + nbytes].view(dtype).reshape(t.data_shape)
        tensors.append(GGUFTensor(t.name, t.tensor_type, tuple(t.shape), data))
    return GGUFIndex(entry.metadata, tensors)


def _build_index(path: str) -> _IndexEntry:
    reader = open_gguf(path)
    tensors = [
        _TensorEntry(name=t.name, tensor_type=int(t.tensor_type), shape=[int(d) for d in t.shape],
                     offset=int(t.data_offset), dtype=t.data.dtype.str, data_shape=list(t.data.shape))
        for t in reader.tensors
    ]
    return _IndexEntry(metadata=_metadata(reader), tensors=tensors)


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in _TOKENIZER_ARRAYS:
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # exotic field types are not needed for inference
            continue
    return meta
