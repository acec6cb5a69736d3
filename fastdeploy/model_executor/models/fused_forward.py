"""Every decoder layer in one native call (``fd_decoder_forward``, native/decoder_forward.cc).

A Paddle custom-op call costs tens of microseconds of dispatch, and the op-by-op layer is ~10 of
them plus reshapes: at decode batch 1 that overhead outweighs the arithmetic. The fused op runs
the same kernels in the same order in C++, so its output equals the op-by-op native path; it only
applies where every piece would be native anyway (CPU, float32 caches, native linear and
attention backends). ``FASTDEPLOY_FUSED_FORWARD=0`` turns it off (the op-by-op path then runs).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import paddle

from fastdeploy.model_executor.forward_batch import ForwardBatch
from fastdeploy.model_executor.ops import paged_attention as attn_ops
from fastdeploy.model_executor.ops import rotary_kv

if TYPE_CHECKING:
    from fastdeploy.model_executor.models.decoder import DecoderModel

FUSED_ENV = "FASTDEPLOY_FUSED_FORWARD"

KVCaches = list[tuple[paddle.Tensor, paddle.Tensor]]


def _linear_args(weights: list) -> list[int]:
    """[n, format, group, bf16_dot_min_rows, vnni] shared by one kind of linear layer in every layer.
    wint8 layers may differ in their code width (4-bit panels where the codes allow, see
    linear.pack_uint4): the op tells the widths apart by each tensor's size. vnni is the smallest
    of the kind's (1 and 0 differ only where the 16-bit-activation kernels are not built)."""
    args = {tuple(w.native_args[2:6]) for w in weights}
    if len(args) != 1:
        raise ValueError(f"layers disagree on their linear arguments: {sorted(args)}")
    vnni = min(int(w.native_args[6]) for w in weights)
    return [int(v) for v in args.pop()] + [vnni]


class FusedDecoderForward:
    """The per-layer tensors as the op's lists, gathered once from a loaded DecoderModel."""

    def __init__(self, model: "DecoderModel", op: Callable) -> None:
        cfg = model.cfg
        layers = model.layers
        self._op = op
        self._rotary = model.rotary
        self._input_norms = [layer.input_norm for layer in layers]
        self._post_norms = [layer.post_norm for layer in layers]
        self._qkv_w = [layer.qkv.native_args[0] for layer in layers]
        self._qkv_b = [layer.qkv.native_args[1] for layer in layers]
        self._o_w = [layer.o.native_args[0] for layer in layers]
        self._gate_up_w = [layer.gate_up.native_args[0] for layer in layers]
        self._down_w = [layer.down.native_args[0] for layer in layers]
        self._attrs = (cfg.num_attention_heads, cfg.num_key_value_heads, bool(cfg.rope_interleaved),
                       float(cfg.rms_norm_eps), float(model.scale),
                       _linear_args([layer.qkv for layer in layers]), _linear_args([layer.o for layer in layers]),
                       _linear_args([layer.gate_up for layer in layers]),
                       _linear_args([layer.down for layer in layers]), int(layers[0].qkv.native_args[7]))
        self._caches: tuple[list[paddle.Tensor], list[paddle.Tensor]] | None = None
        self._caches_of: KVCaches | None = None

    @classmethod
    def create(cls, model: "DecoderModel") -> "FusedDecoderForward | None":
        """The fused forward, or None where some piece would not run natively (then the op-by-op
        path runs, which picks native or reference per op)."""
        if os.environ.get(FUSED_ENV, "1").strip() == "0" or not model.layers:
            return None
        if attn_ops.attention_backend_name() != attn_ops.NATIVE:
            return None
        for layer in model.layers:
            if any(w.native_args is None for w in (layer.qkv, layer.o, layer.gate_up, layer.down)):
                return None
        return cls(model, attn_ops.native_ops().fd_decoder_forward)

    def applies(self, kv_caches: KVCaches) -> bool:
        return bool(kv_caches) and rotary_kv.native_applies(self._rotary, kv_caches[0][0])

    def __call__(self, h: paddle.Tensor, batch: ForwardBatch, kv_caches: KVCaches
                 ) -> tuple[paddle.Tensor, paddle.Tensor]:
        if self._caches_of is not kv_caches:
            # Written in place by the op: views would receive a copy's writes, so refuse them here.
            if not all(k.is_contiguous() and v.is_contiguous() for k, v in kv_caches):
                raise ValueError("the KV caches must be contiguous for the fused forward's in-place writes")
            self._caches = ([k for k, _ in kv_caches], [v for _, v in kv_caches])
            self._caches_of = kv_caches
        keys, values = self._caches  # type: ignore[misc]
        out, residual = self._op(
            h, batch.positions, self._rotary.cos, self._rotary.sin, batch.slot_mapping, batch.block_tables,
            batch.context_lens, batch.query_start_loc, self._input_norms, self._post_norms, self._qkv_w,
            self._qkv_b, self._o_w, self._gate_up_w, self._down_w, keys, values, *self._attrs)
        return out, residual
