"""Linear layers ``y = x @ W (+ bias)`` with fp32, bf16 or weight-only 8-bit weights.

A :class:`LinearWeight` takes a Hugging Face ``[out, in]`` float32 matrix once, quantizes it
(``quant``), and serves ``x [M, in] -> [M, out]`` float32 from then on.

Quantization (the same values on both backends, so they differ only by summation order):

- ``"none"``: fp32 as given.
- ``"bf16"``: weights rounded to bf16 (round to nearest even).
- ``"wint8"``: 8 bits per weight on an affine grid ``w = u * scale + zero`` (``u`` in 0..255), one
  fp32 (scale, zero) per group of ``group_size`` consecutive inputs of one output column. Per group
  the quantizer takes whichever of two grids fits better: the symmetric one (``zero = -128 scale``,
  exact for GGUF Q8_0 blocks) or the min-based one (``zero = min``, ``scale = (max - min) / 255``,
  exact for Q4_0/Q4_1/Q5_x blocks, whose 16 or 32 levels land on every 17th or 8th step). With
  groups of 32 aligned to the GGUF blocks, a GGUF model's weights come back unchanged (up to fp32
  rounding); for other weights the error is at most half a step, ``(max - min) / 510``.

Backends (``FASTDEPLOY_LINEAR_BACKEND`` = ``native`` | ``reference``; unset = native when the C++
extension builds and the CPU has AVX-512 or AVX2 + FMA, else the reference with one warning):

- native: ``native/linear.cc`` (``fd_linear``), weights pre-packed into 32-column panels, one
  packed layout for both kernel sets (AVX-512, or AVX2 + FMA: same arithmetic on 8-lane vectors,
  without the bf16-dot variant below, whose requests then compute in fp32).
  wint8 weights multiply 16-bit fixed-point activations (one step per row and group, so at most
  1/65278 of the group's largest activation off) with exact integer sums, about fp32's accuracy:
  with AVX512-VNNI (``vpdpbusd``) at every M, at the multiply rate of bf16; with AVX2
  (``vpmaddwd``) for calls of up to :func:`act16_max_rows` rows, where skipping the int-to-float
  conversion of the weights pays. With AVX2, wint8 layers whose groups all lie on 16-level grids
  (GGUF Q4_1 sources; :func:`quantize_uint4_exact`) are stored as 4-bit panels (two codes per
  byte, half scales: :func:`pack_uint4`, half the bytes a decode step streams): calls of up to
  :func:`four_bit_act16_max_rows` (32) rows multiply 16-bit activations (``vpmaddwd``, tiles of
  two rows), longer ones run the fp32 tiles on slices dequantized from the codes. Opt-in
  (``FASTDEPLOY_ACT8=1``, or ``act8=True``): calls of :func:`act8_min_rows` (2) rows or more
  multiply 8-bit activations instead (one step per row and group of 32: llama.cpp's Q8_1 grid, up
  to 1/254 of the group's largest activation off) with ``vpmaddubsw`` (``native/linear_s8.h``):
  0.54-0.79x the time per layer (``scripts/bench_linear.py --act8-ab``), but its error breaks
  wint8's precision rule (greedy output equal to fp32 wherever fp32's top-2 logit gap exceeds
  0.25): on SmolLM2 it cost top-2 margins up to 0.78 (``scripts/precision_margins.py``), the
  16-bit kernels 0.000, so it is not the default. ``FASTDEPLOY_ACT8=0`` keeps the layers in 8-bit
  panels. fp32 and bf16 weights (and wint8 8-bit panels beyond act16_max_rows rows, or with
  ``vnni=False``) stream the weights with fp32 activations at few rows; from
  ``bf16_dot_min_rows`` rows on, bf16 and 8-bit weights multiply bf16-rounded activations with
  AVX512-BF16 (``vdpbf16ps``), twice as fast as fp32 once the GEMM is compute-bound, but only as
  exact as bf16 (max logit error ~0.9 on SmolLM2, against ~0.0002 for wint8 through VNNI).
- reference: plain Paddle on any device: dequantize to fp32 and ``paddle.matmul``.

``FASTDEPLOY_REQUIRE_NATIVE=1`` turns a failed native build into an error instead of a fallback.

Choosing the native backend also calls :func:`retain_freed_memory` (opt out with
``FASTDEPLOY_MALLOC_TUNING=0``): Paddle's CPU allocator hands blocks of 2 MB and more to glibc, which
maps them fresh and unmaps them on free, so every large activation or output is page-faulted in
again on every call: 0.4 ms per MB measured here, more than the GEMM itself for a 1024-row prefill.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from types import ModuleType

import numpy as np
import paddle

from fastdeploy.model_executor.layers.grid4 import GROUP as GRID4_GROUP
from fastdeploy.model_executor.layers.grid4 import Grid4, as_float32
from fastdeploy.model_executor.ops import native_build
from fastdeploy.model_executor.ops.native_build import NativeBuildError, native_num_threads

logger = logging.getLogger("fastdeploy")

BACKEND_ENV = "FASTDEPLOY_LINEAR_BACKEND"
REQUIRE_NATIVE_ENV = "FASTDEPLOY_REQUIRE_NATIVE"
ACT8_ENV = "FASTDEPLOY_ACT8"
NATIVE = native_build.NATIVE
REFERENCE = native_build.REFERENCE
QUANT_MODES = ("none", "bf16", "wint8")


PANEL = 32
"""Output columns per packed panel (two AVX-512 or four AVX2 registers of fp32); see native/linear.cc."""
DEFAULT_GROUP_SIZE = 32
"""wint8 group along K: GGUF's block size, so GGUF weights requantize exactly. The fp32 scale and
zero cost 0.25 byte per weight; 64 halves that at the price of exactness (scripts/bench_linear.py
--accuracy compares them)."""
DEFAULT_BF16_DOT_MIN_ROWS = 16
"""From this many rows on, bf16/8-bit weights use the vdpbf16ps path (bf16 activations): by then the
GEMM is compute-bound, and vdpbf16ps multiplies twice as fast as fp32 FMA."""

_FORMAT_CODE = {"none": 0, "bf16": 1, "wint8": 2}
VNNI_GROUPS = (16, 32, 64, 128)
"""wint8 group sizes the VNNI kernel is compiled for (VnniGroupOk in native/linear.cc)."""
FOUR_BIT_GROUP = 32
"""The one group of 4-bit panels and their kernels (kS8Group in native/linear_s8.h)."""


# ------------------------------------------------------------------------------------------------
# Backend selection.


def _require_native() -> bool:
    return os.environ.get(REQUIRE_NATIVE_ENV, "").strip() not in ("", "0")


def native_ops() -> ModuleType:
    """The compiled extension (built on first use); raises NativeBuildError if unavailable."""
    return native_build.native_ops()


def _probe_caps() -> tuple[int, int, int, int, int]:
    """fd_linear_caps as built: (vector bits of the kernels: 512, 256 or 0; bf16 dot; the most rows
    a wint8 call on 8-bit panels multiplies 16-bit activations for, 0 = never; the fewest rows a
    call on 4-bit panels multiplies 8-bit activations for when asked to, 0 = no 4-bit panels; the
    most rows such a call multiplies 16-bit activations for otherwise)."""
    caps = native_ops().fd_linear_caps(paddle.zeros([1], dtype="float32")).numpy()
    return int(caps[0]), int(caps[1]), int(caps[2]), int(caps[3]), int(caps[4])


@functools.cache
def native_caps() -> tuple[bool, bool, bool]:
    """(fd_linear kernels built: AVX-512 or AVX2 + FMA; vdpbf16ps kernels, AVX-512 only;
    16-bit-activation kernels: vpdpbusd with AVX512-VNNI, vpmaddwd with AVX2). Raises
    NativeBuildError if the extension cannot be built."""
    kernels, bf16_dot, act16_rows, _, _ = _probe_caps()
    return bool(kernels), bool(bf16_dot), bool(act16_rows)


@functools.cache
def act16_max_rows() -> int:
    """The most rows a wint8 call runs the 16-bit-activation kernels for: any M with
    AVX512-VNNI, 8 with AVX2 (the fp32 path is as fast from about a dozen on), 0 without them."""
    return _probe_caps()[2]


def _act8_setting() -> str:
    return os.environ.get(ACT8_ENV, "").strip()


def act8_default() -> bool:
    """Whether wint8 layers on 4-bit panels multiply 8-bit activations unless told otherwise:
    only with ``FASTDEPLOY_ACT8=1`` (opt-in; see the module docstring)."""
    return _act8_setting() == "1"


def four_bit_panels() -> bool:
    """Whether wint8 layers on 16-level grids may be stored as 4-bit panels: the AVX2 build has
    their kernels, and ``FASTDEPLOY_ACT8`` is not ``0`` (which keeps them in 8-bit panels)."""
    return _act8_setting() != "0" and _act8_kernel_rows() > 0


def act8_min_rows() -> int:
    """The fewest rows for which a wint8 call on 4-bit panels multiplies 8-bit activations when
    they are asked for (2 in AVX2 builds, where a single row takes a 16-bit kernel, which streams
    the weights once), 0 when 4-bit panels are off or their kernels not built."""
    return _act8_kernel_rows() if four_bit_panels() else 0


@functools.cache
def _act8_kernel_rows() -> int:
    return _probe_caps()[3]


@functools.cache
def four_bit_act16_max_rows() -> int:
    """The most rows a call on 4-bit panels multiplies 16-bit activations for (two-row tiles) when
    it does not take 8-bit ones; longer calls run the fp32 tiles on dequantized slices. 0 when
    4-bit panels are not built."""
    return _probe_caps()[4]


def native_isa() -> str:
    """The instruction set of the fd_linear kernels built: ``avx512``, ``avx2`` (AVX2 + FMA) or
    ``none``. Raises NativeBuildError if the extension cannot be built."""
    return {512: "avx512", 256: "avx2"}.get(_probe_caps()[0], "none")


MALLOC_TUNING_ENV = "FASTDEPLOY_MALLOC_TUNING"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


@functools.cache
def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc serve blocks below ``mmap_threshold`` from its heap and keep up to
    ``trim_threshold`` of freed memory instead of returning it to the kernel, so a block freed by
    one op is reused by the next without page faults. Process-wide; True if applied."""
    if not sys.platform.startswith("linux") or os.environ.get(MALLOC_TUNING_ENV, "").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    logger.debug("glibc malloc: mmap threshold %d, trim threshold %d (applied=%s)",
                 mmap_threshold, trim_threshold, applied)
    return applied


@functools.cache
def linear_backend_name() -> str:
    """``native`` or ``reference``, decided once per process."""
    requested = native_build.requested_backend(BACKEND_ENV)
    if requested == REFERENCE:
        return REFERENCE
    try:
        have_kernels = native_caps()[0]
    except NativeBuildError as exc:
        if requested == NATIVE or _require_native():
            raise
        logger.warning("Native linear ops unavailable, using the plain-Paddle reference: %s",
                       str(exc).splitlines()[0])
        return REFERENCE
    if not have_kernels:
        # The build worked (FASTDEPLOY_REQUIRE_NATIVE is satisfied); this CPU just lacks the
        # instructions the kernels are written in. Only an explicit request for native is an error.
        message = "the native linear kernels need AVX-512 or AVX2 + FMA, which this CPU lacks"
        if requested == NATIVE:
            raise NativeBuildError(message)
        logger.warning("%s; using the plain-Paddle reference", message)
        return REFERENCE
    retain_freed_memory()
    return NATIVE


@functools.cache
def _num_threads() -> int:
    return native_num_threads()


# ------------------------------------------------------------------------------------------------
# Quantization (numpy, once per weight).


def round_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even, as vcvtneps2bf16 does."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_uint8(w_out_in: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine 8-bit per (output row, group of ``group_size`` inputs): returns ``u`` uint8
    ``[out, in]``, ``scales`` and ``zeros`` float32 ``[out, in / group_size]`` with
    ``w ~= u * scale + zero``, each group on the better of the symmetric and the min-based grid."""
    n, k = w_out_in.shape
    u = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, k // group_size), dtype=np.float32)
    zeros = np.empty_like(scales)
    rows = max(1, (1 << 22) // max(k, 1))  # bounded temporaries for the 49152-row lm_head
    for r0 in range(0, n, rows):
        g = np.asarray(w_out_in[r0:r0 + rows], dtype=np.float32).reshape(-1, k // group_size, group_size)
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        s_min = (hi - lo) / np.float32(255.0)
        s_sym = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(127.0)
        u_min = _round_to_grid(g - lo[..., None], s_min, 0.0)
        u_sym = _round_to_grid(g, s_sym, 128.0)
        z_sym = np.float32(-128.0) * s_sym
        err_min = np.abs(u_min * s_min[..., None] + lo[..., None] - g).max(axis=-1)
        err_sym = np.abs(u_sym * s_sym[..., None] + z_sym[..., None] - g).max(axis=-1)
        use_sym = err_sym < err_min
        u[r0:r0 + rows] = np.where(use_sym[..., None], u_sym, u_min).reshape(-1, k).astype(np.uint8)
        scales[r0:r0 + rows] = np.where(use_sym, s_sym, s_min)
        zeros[r0:r0 + rows] = np.where(use_sym, z_sym, lo)
    return u, scales, zeros


def quantize_uint4_exact(w_out_in: np.ndarray, group_size: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``w`` on 16-level grids, as quantize_uint8's (u, scales, zeros) with every u in 0..15, when
    each group already lies on one whose step and offset are IEEE halves (GGUF Q4_1 blocks, and
    Q4_0 blocks that use both end levels, store them so), up to fp32 rounding: 1e-5 of the group's
    range, where wint8 allows half a 255-level step. None otherwise. The scale is then the block's
    own step, where the 8-bit grid would take 1/17 of it, and pack_uint4 stores it as a half."""
    n, k = w_out_in.shape
    u = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, k // group_size), dtype=np.float32)
    zeros = np.empty_like(scales)
    rows = max(1, (1 << 22) // max(k, 1))
    for r0 in range(0, n, rows):
        g = np.asarray(w_out_in[r0:r0 + rows], dtype=np.float32).reshape(-1, k // group_size, group_size)
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        step = ((hi - lo) / np.float32(15.0)).astype(np.float16).astype(np.float32)
        lo = lo.astype(np.float16).astype(np.float32)
        codes = np.clip(np.rint((g - lo[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, 15)
        err = np.abs(codes.astype(np.float64) * step[..., None] + lo[..., None] - g).max(axis=-1)
        if np.any(err > np.float64(1e-5) * (hi - lo)):
            return None
        u[r0:r0 + rows] = codes.reshape(-1, k).astype(np.uint8)
        scales[r0:r0 + rows] = step
        zeros[r0:r0 + rows] = lo
    return u, scales, zeros


def _round_to_grid(values: np.ndarray, step: np.ndarray, offset: float) -> np.ndarray:
    """round(values / step) + offset clipped to 0..255, as float32 (step 0: a constant group)."""
    safe = np.where(step > 0, step, np.float32(1.0))[..., None]
    return np.clip(np.rint(values / safe) + np.float32(offset), 0, 255).astype(np.float32)


def dequantize_uint8(u: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Inverse of quantize_uint8: the float32 weights the native kernel multiplies with. It forms
    ``u * scale + zero`` with one FMA, i.e. rounded once; float64 arithmetic does the same here."""
    n, k = u.shape
    groups = scales.shape[1]
    w = u.reshape(n, groups, k // groups).astype(np.float64) * scales[..., None] + zeros[..., None]
    return w.astype(np.float32).reshape(n, k)


def pick_group_size(k: int, preferred: int = DEFAULT_GROUP_SIZE) -> int:
    """The preferred group if it divides K, else the largest multiple of 4 that does (the kernels
    read k-quads), else K itself (one scale per output channel; reference backend only)."""
    for size in (preferred, 64, 32, 16, 8, 4):
        if size <= k and k % size == 0:
            return size
    return k


# ------------------------------------------------------------------------------------------------
# Packing into the panel layout of native/linear.cc.


def _panels(w_in_out: np.ndarray) -> tuple[np.ndarray, int]:
    """[K, N] -> [P, K, 32] with N zero-padded to P * 32."""
    k, n = w_in_out.shape
    num_panels = -(-n // PANEL)
    padded = np.zeros((k, num_panels * PANEL), dtype=w_in_out.dtype)
    padded[:, :n] = w_in_out
    return np.ascontiguousarray(padded.reshape(k, num_panels, PANEL).transpose(1, 0, 2)), num_panels


def pack_f32(w_out_in: np.ndarray) -> np.ndarray:
    panels, _ = _panels(np.ascontiguousarray(w_out_in.T, dtype=np.float32))
    return panels.reshape(-1).view(np.uint8)


def pack_bf16(bits_out_in: np.ndarray) -> np.ndarray:
    """bf16 bits [N, K] -> per panel [K/2][32][2]: k-pairs side by side, as vdpbf16ps reads them."""
    panels, num_panels = _panels(bits_out_in.T)  # [P, K, 32]
    k = bits_out_in.shape[1]
    pairs = panels.reshape(num_panels, k // 2, 2, PANEL).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(pairs).reshape(-1).view(np.uint8)


def _quad_panels(u_out_in: np.ndarray, groups: int) -> tuple[np.ndarray, int]:
    """codes [N, K] -> [P, groups, G/4, 32, 4]: per panel and group, k-quads side by side."""
    n, k = u_out_in.shape
    u_panels, num_panels = _panels(u_out_in.T)                  # [P, K, 32] uint8
    quads = u_panels.reshape(num_panels, groups, k // groups // 4, 4, PANEL).transpose(0, 1, 2, 4, 3)
    return quads, num_panels


def _with_scales(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """[P, groups, bytes] codes followed per group by scale[32] and zero[32] in their dtype."""
    num_panels, groups = codes.shape[:2]
    s_panels, _ = _panels(np.ascontiguousarray(scales.T))       # [P, groups, 32]
    z_panels, _ = _panels(np.ascontiguousarray(zeros.T))
    parts = [codes, s_panels.reshape(num_panels, groups, PANEL).view(np.uint8),
             z_panels.reshape(num_panels, groups, PANEL).view(np.uint8)]
    return np.ascontiguousarray(np.concatenate(parts, axis=2)).reshape(-1)


def pack_uint8(u_out_in: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Per panel and group along K: uint8 [G/4][32][4] (k-quads side by side, as vpdpbusd reads
    them), float32 scale[32], float32 zero[32]."""
    groups = scales.shape[1]
    quads, num_panels = _quad_panels(u_out_in, groups)
    return _with_scales(np.ascontiguousarray(quads).reshape(num_panels, groups, -1), scales, zeros)


def pack_uint4(u_out_in: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """pack_uint8's layout for codes 0..15 with two k-quads per byte (per group, quad 2i in the low
    nibbles and quad 2i + 1 in the high ones) and half-precision scales and zeros, which must be
    exact halves (native/linear_s8.h): half the bytes of pack_uint8 at group 32."""
    groups = scales.shape[1]
    if u_out_in.shape[1] // groups % 8:
        raise ValueError(f"4-bit panels need groups of a multiple of 8 rows, got {u_out_in.shape[1] // groups}")
    if u_out_in.size and int(u_out_in.max()) > 15:
        raise ValueError("4-bit panels hold codes 0..15 only")
    halves = [np.asarray(a, dtype=np.float32).astype(np.float16) for a in (scales, zeros)]
    if any(not np.array_equal(h.astype(np.float32), a) for h, a in zip(halves, (scales, zeros))):
        raise ValueError("4-bit panels hold scales and zeros that are exact halves only")
    quads, num_panels = _quad_panels(u_out_in, groups)
    pairs = quads.reshape(num_panels, groups, -1, 2, PANEL, 4)
    nibbles = pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)
    return _with_scales(np.ascontiguousarray(nibbles).reshape(num_panels, groups, -1), *halves)


# ------------------------------------------------------------------------------------------------


class LinearWeight:
    """A prepared weight for ``y = x @ W (+ bias)``. quant: "none" (fp32), "bf16", "wint8".

    ``w_out_in`` is float32 in Hugging Face layout ``[out, in]``, or a Grid4 (weights on 16-level
    grids), which wint8 layers with 4-bit panels pack without going through float32. ``backend``
    overrides :func:`linear_backend_name` for this weight (tests build one of each); ``group_size`` is the
    wint8 group along K; ``vnni`` lets wint8 use the 16-bit-activation kernels (where they are
    built and the group is one of VNNI_GROUPS; with AVX2 only for calls of few rows);
    ``bf16_dot_min_rows`` (0 = never) is where the other bf16/8-bit paths switch to bf16
    activations on the native backend; ``act8`` lets a layer on 4-bit panels multiply 8-bit
    activations (None: :func:`act8_default`).
    """

    def __init__(self, w_out_in: np.ndarray | Grid4, bias: np.ndarray | None = None, quant: str = "none", *,
                 backend: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 bf16_dot_min_rows: int = DEFAULT_BF16_DOT_MIN_ROWS, vnni: bool = True,
                 act8: bool | None = None) -> None:
        if quant not in QUANT_MODES:
            raise ValueError(f"quant={quant!r}: expected one of {QUANT_MODES}")
        w = w_out_in if isinstance(w_out_in, Grid4) else np.asarray(w_out_in, dtype=np.float32)
        if len(w.shape) != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {w.shape}")
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.quant = quant
        self._format = _FORMAT_CODE[quant]
        self.group_size = pick_group_size(self.in_features, group_size) if quant == "wint8" else 0
        self.bf16_dot_min_rows = int(bf16_dot_min_rows)
        self.vnni_requested = bool(vnni)
        self.act8_requested = act8_default() if act8 is None else bool(act8)
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float32).reshape(-1)
            if bias.shape[0] != self.out_features:
                raise ValueError(f"bias has {bias.shape[0]} elements, expected {self.out_features}")
        self.backend = backend if backend is not None else linear_backend_name()
        if self.backend not in (NATIVE, REFERENCE):
            raise ValueError(f"backend={self.backend!r}: expected {NATIVE!r} or {REFERENCE!r}")
        if self.backend == NATIVE and not self._native_supported():
            self.backend = REFERENCE  # shapes the kernel does not take (odd K for bf16/wint8)

        self._bias = paddle.to_tensor(bias) if bias is not None else None
        self._packed: paddle.Tensor | None = None
        self._nibbles = False  # wint8 packed as 4-bit panels
        self._ref_w: paddle.Tensor | None = None
        self._ref_scales: paddle.Tensor | None = None
        self._ref_zeros: paddle.Tensor | None = None
        if self.backend == NATIVE:
            self._init_native(w)
            self._forward = self._native
        else:
            self._init_reference(as_float32(w))
            self._forward = self.reference

    # -- construction ------------------------------------------------------------------------

    def _native_supported(self) -> bool:
        k = self.in_features
        if self.quant == "bf16":
            return k % 2 == 0
        if self.quant == "wint8":
            return self.group_size % 4 == 0 and k % self.group_size == 0
        return True

    def _init_native(self, w: np.ndarray | Grid4) -> None:
        if self.quant == "wint8":
            packed = self._pack_wint8(w)
        else:
            w = as_float32(w)
            packed = pack_f32(w) if self.quant == "none" else pack_bf16(round_to_bf16_bits(w))
        self._packed = paddle.to_tensor(packed)
        # The op always takes a bias tensor: an optional input costs ~10 us more per call in Paddle.
        self._bias_arg = self._bias if self._bias is not None else paddle.zeros([0], dtype="float32")
        _, has_bf16_dot, has_vnni = native_caps()
        self._dot_rows = self.bf16_dot_min_rows if has_bf16_dot else 0
        self._vnni = int(self.vnni_requested and has_vnni and self.quant == "wint8" and self.group_size in VNNI_GROUPS)
        if self._nibbles and self.act8_requested:
            self._vnni = 2  # the op's "8-bit activations allowed" (native/linear.h)
        self._threads = _num_threads()
        self._op = native_ops().fd_linear  # looked up once: load_extension takes a lock

    def _pack_wint8(self, w: np.ndarray | Grid4) -> np.ndarray:
        """4-bit panels where the weights lie on 16-level grids and their kernels are built (and not
        turned off), 8-bit panels otherwise."""
        four_bit = None
        if self.vnni_requested and self.group_size == FOUR_BIT_GROUP and four_bit_panels():
            if isinstance(w, Grid4) and self.group_size == GRID4_GROUP:
                four_bit = tuple(w)
            else:
                four_bit = quantize_uint4_exact(as_float32(w), self.group_size)
        if four_bit is not None:
            self._nibbles = True
            return pack_uint4(*four_bit)  # the op knows it by its size
        return pack_uint8(*quantize_uint8(as_float32(w), self.group_size))

    def _init_reference(self, w: np.ndarray) -> None:
        if self.quant == "none":
            self._ref_w = paddle.to_tensor(np.ascontiguousarray(w.T))
        elif self.quant == "bf16":
            # numpy uint16 becomes a Paddle bfloat16 tensor: half the memory of fp32 until used.
            self._ref_w = paddle.to_tensor(np.ascontiguousarray(round_to_bf16_bits(w).T))
        else:
            u, scales, zeros = quantize_uint8(w, self.group_size)
            self._ref_w = paddle.to_tensor(np.ascontiguousarray(u.T))            # [K, N] uint8
            self._ref_scales = paddle.to_tensor(np.ascontiguousarray(scales.T))  # [K/G, N]
            self._ref_zeros = paddle.to_tensor(np.ascontiguousarray(zeros.T))

    # -- forward -------------------------------------------------------------------------------

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        """``x [..., in]`` float32 -> ``[..., out]`` float32."""
        return self._forward(x)

    def _native(self, x: paddle.Tensor) -> paddle.Tensor:
        # The hot path of a decode step (~120 calls): no dtype or place checks here (each costs
        # ~0.5 us in Paddle); the op itself rejects anything but a float32 CPU tensor.
        if x.ndim == 2:
            return self._op(x, self._packed, self._bias_arg, self.out_features, self._format, self.group_size,
                            self._dot_rows, self._vnni, self._threads)
        lead = list(x.shape[:-1])
        y = self._op(x.reshape([-1, self.in_features]), self._packed, self._bias_arg, self.out_features,
                     self._format, self.group_size, self._dot_rows, self._vnni, self._threads)
        return y.reshape([*lead, self.out_features])

    @property
    def native_args(self) -> tuple | None:
        """``(packed, bias, n, format, group, bf16_dot_min_rows, vnni, threads)``, the arguments after ``x``
        of the native ops that run this layer (norm.rms_norm_linear fuses one in), or None when this
        weight is on the reference backend."""
        if self._packed is None:
            return None
        return (self._packed, self._bias_arg, self.out_features, self._format, self.group_size, self._dot_rows,
                self._vnni, self._threads)

    def dequantized_weight(self) -> paddle.Tensor:
        """The fp32 ``[in, out]`` matrix this layer multiplies with (reference backend only)."""
        if self._ref_w is None:
            raise RuntimeError("dequantized_weight() needs the reference backend")
        if self.quant == "none":
            return self._ref_w
        if self.quant == "bf16":
            return self._ref_w.astype("float32")
        k, n = self.in_features, self.out_features
        groups = k // self.group_size
        u = self._ref_w.astype("float32").reshape([groups, self.group_size, n])
        return (u * self._ref_scales.unsqueeze(1) + self._ref_zeros.unsqueeze(1)).reshape([k, n])

    def reference(self, x: paddle.Tensor) -> paddle.Tensor:
        """Plain Paddle: dequantize to fp32, matmul, add the bias."""
        y = paddle.matmul(x, self.dequantized_weight())
        return y + self._bias if self._bias is not None else y

    @property
    def uses_vnni(self) -> bool:
        """Whether calls may run the 16-bit-activation kernels (wint8 on the native backend)."""
        return self._packed is not None and bool(self._vnni)

    @property
    def four_bit(self) -> bool:
        """Whether the layer is stored as 4-bit panels (:func:`pack_uint4`): 16-bit activations
        up to four_bit_act16_max_rows rows, fp32 beyond, or 8-bit ones where :meth:`uses_act8`."""
        return self._packed is not None and self._nibbles

    def uses_act16(self, rows: int) -> bool:
        """Whether a call with this many rows multiplies 16-bit activations (uses_vnni, and rows
        within what the CPU's kernels take: :func:`act16_max_rows`, or on 4-bit panels
        :func:`four_bit_act16_max_rows` unless :meth:`uses_act8`)."""
        if self.four_bit:
            return rows <= four_bit_act16_max_rows() and not self.uses_act8(rows)
        return self.uses_vnni and rows <= act16_max_rows()

    def uses_act8(self, rows: int) -> bool:
        """Whether a call with this many rows multiplies 8-bit activations: 4-bit panels (see
        :func:`quantize_uint4_exact`), asked for (``act8``), and at least the kernel's fewest rows."""
        return self.four_bit and self._vnni == 2 and rows >= _act8_kernel_rows()

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight data one call reads (packed layout, or the reference's stored tensors)."""
        if self._packed is not None:
            return int(self._packed.shape[0])
        size = int(np.prod(self._ref_w.shape)) * (4 if self.quant == "none" else 2 if self.quant == "bf16" else 1)
        if self._ref_scales is not None:
            size += int(np.prod(self._ref_scales.shape)) * 8  # scales and zeros
        return size

    def __repr__(self) -> str:
        return (f"LinearWeight(in={self.in_features}, out={self.out_features}, quant={self.quant!r}, "
                f"backend={self.backend!r}, bias={self._bias is not None})")
