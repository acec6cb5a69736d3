"""Just-in-time build and load of the C++ Paddle custom operators in ``native/``.

Each extension (a name plus its ``.cc`` files) is compiled once per machine into
``$FASTDEPLOY_CACHE/native-build/<name>-<fingerprint>``; the fingerprint hashes the sources, every
header in ``native/``, the flags, the Paddle and Python versions and the CPU's feature flags
(the code is built with ``-march=native``), so an edit or an upgrade rebuilds and an unchanged tree
never does. The compiler runs in a child process whose output lands in ``build.log`` next to the
library; this process only loads the finished ``.so``. A ``fcntl`` lock per build directory lets
many processes (test workers, server replicas) start at once: one compiles, the rest wait and load.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from fastdeploy.model_store import cache_dir

logger = logging.getLogger("fastdeploy")

NATIVE_SRC_DIR = Path(__file__).resolve().parents[3] / "native"

NATIVE = "native"
REFERENCE = "reference"
"""The two backends an op family can run on (FASTDEPLOY_LINEAR_BACKEND, FASTDEPLOY_ATTENTION_BACKEND)."""
"""The repository's ``native/`` directory (sources are not shipped inside the wheel)."""

BASE_CXX_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-Wno-unused-parameter")
BUILD_TIMEOUT_S = 900.0
"""Upper bound on one compile; a hung compiler must not hang engine start-up forever."""
_DONE_MARKER = "BUILD_OK"
KEEP_BUILDS = 3
"""Finished builds kept per extension (older ones are pruned after a new build)."""

EXTENSION_NAME = "fastdeploy_ops"
EXTENSION_SOURCES: tuple[str, ...] = ("linear.cc", "norm.cc", "paged_attention.cc", "attention_tiled.cc",
                                      "kv_cache.cc", "rotary_kv.cc", "decoder_forward.cc",
                                      "thread_pool.cc")
"""Every op in one extension: fd_decoder_forward calls the other ops' kernels in C++, and Paddle
refuses to register one op name from two libraries."""

_loaded: dict[str, ModuleType] = {}
_load_lock = threading.Lock()


class NativeBuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message names the log to read."""


def native_num_threads() -> int:
    """Threads a native kernel may use: ``FASTDEPLOY_NUM_THREADS``, else the CPUs this process may
    run on. Passed to every op explicitly: importing Paddle pins the OpenMP default to one thread and
    writes ``OMP_NUM_THREADS=1`` into the environment when it was unset, so neither says what the
    user wanted."""
    value = os.environ.get("FASTDEPLOY_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _paddle_libs_dir() -> Path:
    import paddle

    return Path(paddle.__file__).resolve().parent / "libs"


def openmp_link_flags() -> list[str]:
    """Link against the OpenMP runtime Paddle already loads (Intel's libiomp5, which also exports
    the GNU ``GOMP_*`` entry points GCC emits) rather than a second runtime; plain ``-fopenmp``
    (libgomp) otherwise. The kernels run on their own pool (native/thread_pool.cc); OpenMP only
    serves ``FASTDEPLOY_THREAD_POOL=openmp``, one plain ``omp parallel`` region that hands out the
    same items (libiomp5 lacks GCC's ``GOMP_loop_nonmonotonic_*``, what ``schedule(dynamic)``
    lowers to)."""
    libs = _paddle_libs_dir()
    if sys.platform.startswith("linux") and (libs / "libiomp5.so").exists():
        return [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]
    return ["-fopenmp"]


def _cpu_signature() -> str:
    """Feature flags of this CPU: a cache shared between machines must not reuse -march=native code."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fingerprint(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    import paddle

    digest = hashlib.sha256()
    headers = sorted(NATIVE_SRC_DIR.glob("*.h")) if NATIVE_SRC_DIR.is_dir() else []
    for path in [*sources, *headers]:
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    meta = {
        "name": name,
        "cflags": list(cflags),
        "ldflags": list(ldflags),
        "paddle": paddle.__version__,
        "paddle_commit": getattr(paddle.version, "commit", ""),
        "python": sys.version,
        "machine": platform.machine(),
        "cpu": _cpu_signature(),
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive ``flock`` on ``path``; says once that it waits, and gives up after ``timeout_s``.
    The kernel drops the lock when its holder dies, so a crashed builder never wedges the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    logger.info("Waiting for another process to finish building %s (lock %s)", path.stem, path)
                    announced = True
                if time.monotonic() > deadline:
                    raise NativeBuildError(f"gave up after {timeout_s:.0f}s waiting for the build lock {path}")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# Runs in the child: paddle's JIT builder compiles and links into build_directory/<name>/<name>.so.
_BUILD_SCRIPT = """
import json, sys
from paddle.utils.cpp_extension import load
args = json.loads(sys.argv[1])
load(name=args["name"], sources=args["sources"], extra_cxx_cflags=args["cflags"],
     extra_ldflags=args["ldflags"], build_directory=args["build_dir"], verbose=True)
"""


def _compile(name: str, sources: Sequence[Path], cflags: list[str], ldflags: list[str], build_dir: Path) -> None:
    shutil.rmtree(build_dir, ignore_errors=True)  # leftovers of a build that died half way
    build_dir.mkdir(parents=True)
    log_path = build_dir / "build.log"
    args = {"name": name, "sources": [str(s) for s in sources], "cflags": cflags, "ldflags": ldflags,
            "build_dir": str(build_dir)}
    logger.info("Building native extension %s in %s (first use; log: %s)", name, build_dir, log_path)
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(args)], cwd=build_dir,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise NativeBuildError(f"building {name} timed out after {BUILD_TIMEOUT_S:.0f}s; see {log_path}") from exc
    if proc.returncode != 0 or not _library_path(name, build_dir).exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise NativeBuildError(f"building {name} failed (exit {proc.returncode}); see {log_path}:\n{tail}")
    (build_dir / _DONE_MARKER).write_text(f"{time.monotonic() - started:.1f}s\n")
    logger.info("Built native extension %s in %.1fs", name, time.monotonic() - started)


def _prune_old_builds(root: Path, name: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used finished builds of ``name`` (every source edit
    makes a new one). A build another process holds the lock of is left alone; lock files stay, so
    no two processes can ever lock different files for the same build."""
    pattern = re.compile(rf"{re.escape(name)}-[0-9a-f]{{16}}")
    builds = [(m.stat().st_mtime, m.parent) for m in root.glob(f"{name}-*/{_DONE_MARKER}")
              if pattern.fullmatch(m.parent.name)]
    builds.sort(reverse=True)
    for _, old in builds[keep:]:
        with open(root / f"{old.name}.lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            try:
                shutil.rmtree(old, ignore_errors=True)  # a process that loaded it keeps its mapping
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _library_path(name: str, build_dir: Path) -> Path:
    return build_dir / name / f"{name}.so"


def _import_library(name: str, build_dir: Path) -> ModuleType:
    """Register the library's operators with Paddle and return a module with one function per op.

    Uses the loader behind ``paddle.utils.cpp_extension.load`` directly (a private helper, present
    since Paddle 2.x): the public ``load`` re-runs the whole setup.py build in every process. Should a
    future Paddle drop it, the failure surfaces as NativeBuildError and the reference path is used."""
    from paddle.utils.cpp_extension import extension_utils

    # Paddle logs "using custom operator only" at INFO on every load; keep that out of our logs.
    paddle_logger = logging.getLogger("utils.cpp_extension")
    level = paddle_logger.level
    paddle_logger.setLevel(logging.WARNING)
    try:
        return extension_utils._import_module_from_library(name, str(build_dir / name), False)
    finally:
        paddle_logger.setLevel(level)


def native_ops() -> ModuleType:
    """The project's native ops (built on first use); raises NativeBuildError if unavailable."""
    return load_extension(EXTENSION_NAME, EXTENSION_SOURCES)


def load_extension(name: str, sources: Sequence[str], extra_cflags: Sequence[str] = (),
                   extra_ldflags: Sequence[str] = ()) -> ModuleType:
    """Build (if needed) and load the extension ``name`` made of ``sources`` (paths relative to
    ``native/``). Cached per process; raises NativeBuildError when it cannot be built or loaded."""
    with _load_lock:
        if name in _loaded:
            return _loaded[name]
        paths = [NATIVE_SRC_DIR / s for s in sources]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise NativeBuildError(f"native sources not found: {', '.join(missing)}")
        cflags = [*BASE_CXX_FLAGS, *extra_cflags]
        ldflags = [*openmp_link_flags(), *extra_ldflags]
        tag = f"{name}-{_fingerprint(name, paths, cflags, ldflags)}"
        root = cache_dir() / "native-build"
        build_dir = root / tag
        with _file_lock(root / f"{tag}.lock", timeout_s=BUILD_TIMEOUT_S + 60.0):
            marker = build_dir / _DONE_MARKER
            if marker.exists():
                os.utime(marker)  # "last used", for pruning
            else:
                _compile(name, paths, cflags, ldflags, build_dir)
                _prune_old_builds(root, name, keep=KEEP_BUILDS)
            try:
                module = _import_library(name, build_dir)
            except Exception as exc:  # noqa: BLE001 - any loader failure means "no native ops"
                raise NativeBuildError(f"loading {_library_path(name, build_dir)} failed: {exc}") from exc
        _loaded[name] = module
        return module


def requested_backend(env_name: str) -> str:
    """What ``env_name`` asks for: NATIVE, REFERENCE, or "" (native when it builds and runs here).
    Unset with a non-CPU default device means REFERENCE: the native kernels are CPU kernels, and
    device tensors take the plain-Paddle path."""
    import paddle

    requested = os.environ.get(env_name, "").strip().lower()
    if requested not in ("", NATIVE, REFERENCE):
        raise ValueError(f"{env_name}={requested!r}: expected {NATIVE!r} or {REFERENCE!r}")
    if not requested and not paddle.get_device().startswith("cpu"):
        return REFERENCE
    return requested
