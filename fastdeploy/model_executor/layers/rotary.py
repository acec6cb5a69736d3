"""Rotary position embedding with precomputed cos/sin tables."""
from __future__ import annotations

import numpy as np
import paddle


class RotaryEmbedding:
    """Applies RoPE to [tokens, heads, head_dim] tensors at given positions.

    interleaved=False rotates (x[:d/2], x[d/2:]) pairs (HF Llama/Qwen2); True rotates adjacent
    lanes (x[2i], x[2i+1]) as ERNIE 4.5 does. The angle table is computed in float32 the way the
    reference implementations do, so logits match them closely.

    This is the reference: on CPU the model runs the same arithmetic fused with the KV-cache write
    (:mod:`fastdeploy.model_executor.ops.rotary_kv`), which reads ``cos``/``sin`` and ``interleaved``
    from here and rounds every product and sum in the same order (tests/test_rotary_kv.py checks
    that the two agree bit for bit), so a change here must be mirrored in native/rotary_kv.cc.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, interleaved: bool) -> None:
        self.head_dim = head_dim
        self.interleaved = interleaved
        inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        freqs = np.arange(max_position, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
        self.cos = paddle.to_tensor(np.cos(freqs).astype(np.float32))  # [max_pos, d/2]
        self.sin = paddle.to_tensor(np.sin(freqs).astype(np.float32))

    def angles(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """cos/sin [T, 1, d/2] for a batch; computed once per forward and shared by every layer."""
        return paddle.gather(self.cos, positions).unsqueeze(1), paddle.gather(self.sin, positions).unsqueeze(1)

    def __call__(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
        half = self.head_dim // 2
        if self.interleaved:
            pairs = x.reshape([x.shape[0], x.shape[1], half, 2])
            x1, x2 = pairs[..., 0], pairs[..., 1]
            out = paddle.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
            return out.reshape(x.shape)
        x1, x2 = x[..., :half], x[..., half:]
        return paddle.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
