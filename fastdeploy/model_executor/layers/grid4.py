"""Weight matrices kept on their 16-level grids: a GGUF Q4_1 tensor as codes, steps and offsets.

A Q4_1 block stores 32 weights as d * q + m, q in 0..15, d and m halves: exactly what the 4-bit
panels of the wint8 linear layers hold (linear.pack_uint4). Handing the blocks over as they are
skips dequantizing every matrix to float32 and finding its grids again (quantize_uint4_exact),
which took ~4 of an engine start's ~9 s for SmolLM2-135M.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

GROUP = 32  # weights per block, along the input dimension
_Q4_1_BLOCK_BYTES = 20  # half d, half m, 16 bytes of nibbles


class Grid4(NamedTuple):
    """w[o, i] = codes[o, i] * scales[o, i // GROUP] + zeros[o, i // GROUP]."""

    codes: np.ndarray  # uint8 [out, in], 0..15
    scales: np.ndarray  # float32 [out, in / GROUP], exact halves
    zeros: np.ndarray  # float32 [out, in / GROUP], exact halves

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """float32 [out, in], rounded as gguf's Q4_1 dequantization rounds it (d * q, then + m)."""
        out, k = self.codes.shape
        q = self.codes.reshape(out, k // GROUP, GROUP).astype(np.float32)
        return (q * self.scales[..., None] + self.zeros[..., None]).reshape(out, k)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> Grid4:
        """The same rows rearranged by fn (a permutation along axis 0) in all three arrays."""
        return Grid4(fn(self.codes), fn(self.scales), fn(self.zeros))


def from_q4_1_blocks(blocks: np.ndarray) -> Grid4:
    """Q4_1 block bytes [out, in / 32 * 20] (gguf's data view of the tensor) as a Grid4."""
    out = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(out, -1, _Q4_1_BLOCK_BYTES)
    scales = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    zeros = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = b[..., 4:]
    # Weight j < 16 of a block is the low nibble of byte j, weight 16 + j its high nibble.
    codes = np.concatenate([nibbles & np.uint8(0x0F), nibbles >> np.uint8(4)], axis=-1)
    return Grid4(codes.reshape(out, -1), scales, zeros)


def concat_rows(parts: Sequence[np.ndarray | Grid4]) -> np.ndarray | Grid4:
    """Matrices stacked along the output dimension; grids stay grids when every part is one."""
    if all(isinstance(p, Grid4) for p in parts):
        return Grid4(*(np.concatenate([getattr(p, f) for p in parts]) for f in Grid4._fields))
    return np.concatenate([as_float32(p) for p in parts])


def as_float32(w: np.ndarray | Grid4) -> np.ndarray:
    return w.dequantize() if isinstance(w, Grid4) else w
