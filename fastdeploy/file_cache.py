"""Data derived from a model file, cached on disk per version of that file.

An entry lives at cache_dir()/<kind>/<hash of the file's real path, size, mtime and the format
version>.msgpack, so a rewritten file or a changed format is never served a stale entry. Entries
are written atomically (processes starting together may race to write one), and each kind keeps
its `keep` most recently used ones. Everything is best effort: an unreadable or unwritable cache
only costs the work of building the value again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import msgspec

logger = logging.getLogger(__name__)

T = TypeVar("T")


def file_version(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(real path, size, mtime in ns): what tells one version of a file from another."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


class FileCache(Generic[T]):
    """Values of type `value_type` (msgspec-encodable), one per model file version."""

    def __init__(self, kind: str, version: int, value_type: type[T], keep: int = 16) -> None:
        self.kind = kind
        self.version = version  # bump when the value's type or its derivation changes
        self.value_type = value_type
        self.keep = keep

    def entry(self, path: str | os.PathLike[str]) -> Path | None:
        """The entry's file for this version of `path`, or None where the cache directory cannot be made."""
        from fastdeploy.model_store import cache_dir

        try:
            real, size, mtime_ns = file_version(path)
            root = cache_dir() / self.kind
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        key = f"{real}\0{size}\0{mtime_ns}\0{self.version}".encode()
        return root / f"{hashlib.sha256(key).hexdigest()[:32]}.msgpack"

    def get(self, path: str | os.PathLike[str], build: Callable[[], T]) -> T:
        """The cached value for this version of `path`, or build() (then stored)."""
        entry = self.entry(path)
        if entry is not None:
            try:
                value = msgspec.msgpack.decode(entry.read_bytes(), type=self.value_type)
                os.utime(entry)  # "last used", for pruning
                return value
            except (OSError, msgspec.DecodeError):
                pass  # not cached yet, or unreadable: build
        value = build()
        if entry is not None:
            self._store(entry, value)
        return value

    def _store(self, entry: Path, value: T) -> None:
        tmp_name = None
        try:
            data = msgspec.msgpack.encode(value)
            with tempfile.NamedTemporaryFile(dir=entry.parent, suffix=".tmp", delete=False) as tmp:
                tmp_name = tmp.name
                tmp.write(data)
            os.replace(tmp_name, entry)
            tmp_name = None
            entries = sorted(entry.parent.glob("*.msgpack"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in entries[self.keep:]:
                old.unlink(missing_ok=True)
        except (OSError, TypeError, msgspec.MsgspecError) as exc:
            logger.debug("%s cache entry not written: %s", self.kind, exc)
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)
