"""Llama-family decoder (Llama/SmolLM2, Qwen2, ERNIE 4.5 dense) in Paddle over a paged KV cache.

The architectures differ only in data (q/k/v bias, rotary pairing, tied head), so one class runs
all of them. q|k|v and gate|up are fused so a layer costs two GEMMs before attention and two after,
whatever the batch; LinearWeight packs each for the native kernels (fp32, bf16 or int8 weights).
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from fastdeploy.model_executor.forward_batch import ForwardBatch
from fastdeploy.model_executor.layers.grid4 import Grid4, as_float32, concat_rows
from fastdeploy.model_executor.layers.linear import LinearWeight
from fastdeploy.model_executor.layers.norm import rms_norm, silu_mul
from fastdeploy.model_executor.layers.rotary import RotaryEmbedding
from fastdeploy.model_executor.model_config import ModelArchConfig
from fastdeploy.model_executor.models.fused_forward import FusedDecoderForward
from fastdeploy.model_executor.ops import paged_attention as attn_ops
from fastdeploy.model_executor.ops import rotary_kv


class DecoderLayerWeights:
    """Per-layer tensors, fused (q|k|v, gate|up) and packed once at load time."""

    def __init__(self, cfg: ModelArchConfig, w: dict[str, np.ndarray | Grid4], i: int, quant: str) -> None:
        p = f"model.layers.{i}."

        def take(name: str) -> np.ndarray | Grid4:
            return w.pop(p + name)

        qkv = concat_rows([take("self_attn.q_proj.weight"), take("self_attn.k_proj.weight"),
                           take("self_attn.v_proj.weight")])
        bias = None
        if cfg.attention_bias:
            bias = np.concatenate([take("self_attn.q_proj.bias"), take("self_attn.k_proj.bias"),
                                   take("self_attn.v_proj.bias")])
        self.qkv = LinearWeight(qkv, bias, quant)
        self.o = LinearWeight(take("self_attn.o_proj.weight"), None, quant)
        self.gate_up = LinearWeight(concat_rows([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")]),
                                    None, quant)
        self.down = LinearWeight(take("mlp.down_proj.weight"), None, quant)
        self.input_norm = paddle.to_tensor(take("input_layernorm.weight"))
        self.post_norm = paddle.to_tensor(take("post_attention_layernorm.weight"))


class DecoderModel:
    """Forward pass: token ids of a ForwardBatch → logits of the requested rows.

    quant selects the linear layers' weight format ("none" = fp32, "bf16", "wint8"); the embedding
    table stays fp32. The weights dict is consumed (popped) to keep peak memory low.
    """

    def __init__(self, cfg: ModelArchConfig, weights: dict[str, np.ndarray | Grid4], quant: str = "none") -> None:
        self.cfg = cfg
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        embed = weights.pop("model.embed_tokens.weight")
        self.embed = paddle.to_tensor(as_float32(embed))
        head = embed if cfg.tie_word_embeddings else weights.pop("lm_head.weight")
        self.lm_head = LinearWeight(head, None, quant)
        self.final_norm = paddle.to_tensor(weights.pop("model.norm.weight"))
        self.layers = [DecoderLayerWeights(cfg, weights, i, quant) for i in range(cfg.num_hidden_layers)]
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleaved)
        self._fused: FusedDecoderForward | None = None
        self._fused_checked = False

    def _fused_forward(self) -> FusedDecoderForward | None:
        """All layers in one native call where everything would run natively (decided on first use,
        when the backends are known)."""
        if not self._fused_checked:
            self._fused = FusedDecoderForward.create(self)
            self._fused_checked = True
        return self._fused

    def _attention(self, layer: DecoderLayerWeights, h: paddle.Tensor, batch: ForwardBatch,
                   cache: tuple[paddle.Tensor, paddle.Tensor],
                   rope: tuple[paddle.Tensor, paddle.Tensor] | None) -> paddle.Tensor:
        """``rope`` None: the fused native rotary + KV-write op applies (see hidden_states)."""
        cfg = self.cfg
        qkv = layer.qkv(h)
        num_tokens = h.shape[0]
        key_cache, value_cache = cache
        # q comes back rotated; k (rotated) and v are already in the cache.
        args = (self.rotary, key_cache, value_cache, batch.slot_mapping, cfg.num_attention_heads,
                cfg.num_key_value_heads)
        if rope is None:
            q = rotary_kv.native_rotary_write_kv(qkv, batch.positions, *args)
        else:
            q = rotary_kv.reference_rotary_write_kv(qkv, rope, *args)
        out = attn_ops.paged_attention(q, key_cache, value_cache, batch.block_tables, batch.context_lens,
                                       batch.query_start_loc, self.scale)
        return layer.o(out.reshape([num_tokens, self.q_size]))

    def _mlp(self, layer: DecoderLayerWeights, h: paddle.Tensor) -> paddle.Tensor:
        return layer.down(silu_mul(layer.gate_up(h)))

    @paddle.no_grad()
    def hidden_states(self, batch: ForwardBatch,
                      kv_caches: list[tuple[paddle.Tensor, paddle.Tensor]]) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Last layer's MLP output and the residual stream before it (their sum is the hidden state)."""
        eps = self.cfg.rms_norm_eps
        h = F.embedding(batch.input_ids, self.embed)
        fused = self._fused_forward()
        if fused is not None and fused.applies(kv_caches):
            return fused(h, batch, kv_caches)
        residual = None
        # The fused native op reads the angle tables itself; the reference gathers them once here.
        native_rope = bool(kv_caches) and rotary_kv.native_applies(self.rotary, kv_caches[0][0])
        rope = None if native_rope else self.rotary.angles(batch.positions)
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = rms_norm(h, layer.input_norm, eps, residual)
            h = self._attention(layer, x, batch, cache, rope)
            x, residual = rms_norm(h, layer.post_norm, eps, residual)
            h = self._mlp(layer, x)
        return h, residual

    @paddle.no_grad()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[paddle.Tensor, paddle.Tensor]]) -> paddle.Tensor:
        """Logits [num_logits, vocab] (float32) for batch.logits_indices rows."""
        h, residual = self.hidden_states(batch, kv_caches)
        rows = batch.logits_indices
        x, _ = rms_norm(paddle.gather(h, rows), self.final_norm, self.cfg.rms_norm_eps, paddle.gather(residual, rows))
        return self.lm_head(x)

    def allocate_kv_caches(self, num_blocks: int, block_size: int, dtype: str = "float32"
                           ) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        """One (key, value) pair per layer, ``[num_blocks, num_kv_heads, block_size, row]`` of
        ``dtype``: float32 or float16 rows of head_dim, or int8 rows of head_dim + 4 (codes and
        their float32 step, native/kv_types.h). Left uninitialized: every kernel reads only the
        positions a sequence has written (the reference masks the rest, NaN included), and zeroing
        gigabytes of host memory up front took seconds of each start; pages now fault in as blocks
        fill."""
        shape = [num_blocks, self.cfg.num_key_value_heads, block_size, self._kv_row(dtype)[0]]
        return [(paddle.empty(shape, dtype=dtype), paddle.empty(shape, dtype=dtype))
                for _ in range(self.cfg.num_hidden_layers)]

    def kv_bytes_per_block(self, block_size: int, dtype: str = "float32") -> int:
        row, element = self._kv_row(dtype)
        return 2 * self.cfg.num_hidden_layers * self.cfg.num_key_value_heads * block_size * row * element

    def _kv_row(self, dtype: str) -> tuple[int, int]:
        """Elements per cache row and bytes per element."""
        if dtype == "int8":
            return self.cfg.head_dim + attn_ops.INT8_ROW_EXTRA, 1
        return self.cfg.head_dim, 2 if dtype == "float16" else 4
