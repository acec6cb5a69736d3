"""Llama-family decoder (Llama/SmolLM2, Qwen2, ERNIE 4.5 dense) in Paddle over a paged KV cache.

The architectures differ only in data (q/k/v bias, rotary pairing, tied head), so one class runs
all of them. Weights are kept as [in, out] matrices with q|k|v and gate|up fused so a layer costs
two GEMMs before attention and two after, whatever the batch.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from fastdeploy.model_executor.forward_batch import ForwardBatch
from fastdeploy.model_executor.layers.rotary import RotaryEmbedding
from fastdeploy.model_executor.model_config import ModelArchConfig
from fastdeploy.model_executor.ops import paged_attention as attn_ops


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    variance = paddle.mean(x * x, axis=-1, keepdim=True)
    return x * paddle.rsqrt(variance + eps) * weight


class DecoderLayerWeights:
    """Per-layer tensors, fused and transposed once at load time."""

    def __init__(self, cfg: ModelArchConfig, w: dict[str, np.ndarray], i: int) -> None:
        p = f"model.layers.{i}."

        def t(name: str) -> np.ndarray:
            return w[p + name]

        qkv = np.concatenate([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")])
        self.qkv = paddle.to_tensor(np.ascontiguousarray(qkv.T))
        self.qkv_bias = None
        if cfg.attention_bias:
            bias = np.concatenate([t("self_attn.q_proj.bias"), t("self_attn.k_proj.bias"), t("self_attn.v_proj.bias")])
            self.qkv_bias = paddle.to_tensor(bias)
        self.o = paddle.to_tensor(np.ascontiguousarray(t("self_attn.o_proj.weight").T))
        gate_up = np.concatenate([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")])
        self.gate_up = paddle.to_tensor(np.ascontiguousarray(gate_up.T))
        self.down = paddle.to_tensor(np.ascontiguousarray(t("mlp.down_proj.weight").T))
        self.input_norm = paddle.to_tensor(t("input_layernorm.weight"))
        self.post_norm = paddle.to_tensor(t("post_attention_layernorm.weight"))


class DecoderModel:
    """Forward pass: token ids of a ForwardBatch → logits of the requested rows."""

    def __init__(self, cfg: ModelArchConfig, weights: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.embed = paddle.to_tensor(weights["model.embed_tokens.weight"])
        head = weights["model.embed_tokens.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = paddle.to_tensor(np.ascontiguousarray(head.T))
        self.final_norm = paddle.to_tensor(weights["model.norm.weight"])
        self.layers = [DecoderLayerWeights(cfg, weights, i) for i in range(cfg.num_hidden_layers)]
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleaved)

    def _attention(self, layer: DecoderLayerWeights, h: paddle.Tensor, batch: ForwardBatch,
                   cache: tuple[paddle.Tensor, paddle.Tensor], rope: tuple[paddle.Tensor, paddle.Tensor]) -> paddle.Tensor:
        cfg = self.cfg
        qkv = paddle.matmul(h, layer.qkv)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        num_tokens = h.shape[0]
        heads = qkv.reshape([num_tokens, cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.head_dim])
        qk, v = paddle.split(heads, [cfg.num_attention_heads + cfg.num_key_value_heads, cfg.num_key_value_heads],
                             axis=1)
        qk = self.rotary(qk, *rope)  # q and k heads rotated in one pass
        q, k = paddle.split(qk, [cfg.num_attention_heads, cfg.num_key_value_heads], axis=1)
        key_cache, value_cache = cache
        attn_ops.write_kv_cache(k, v, key_cache, value_cache, batch.slot_mapping)
        out = attn_ops.paged_attention(q, key_cache, value_cache, batch.block_tables, batch.context_lens,
                                       batch.query_start_loc, self.scale)
        return paddle.matmul(out.reshape([num_tokens, self.q_size]), layer.o)

    def _mlp(self, layer: DecoderLayerWeights, h: paddle.Tensor) -> paddle.Tensor:
        gate, up = paddle.chunk(paddle.matmul(h, layer.gate_up), 2, axis=-1)
        return paddle.matmul(F.silu(gate) * up, layer.down)

    @paddle.no_grad()
    def hidden_states(self, batch: ForwardBatch, kv_caches: list[tuple[paddle.Tensor, paddle.Tensor]]) -> paddle.Tensor:
        eps = self.cfg.rms_norm_eps
        x = F.embedding(batch.input_ids, self.embed)
        rope = self.rotary.angles(batch.positions)
        for layer, cache in zip(self.layers, kv_caches):
            x = x + self._attention(layer, rms_norm(x, layer.input_norm, eps), batch, cache, rope)
            x = x + self._mlp(layer, rms_norm(x, layer.post_norm, eps))
        return x

    @paddle.no_grad()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[paddle.Tensor, paddle.Tensor]]) -> paddle.Tensor:
        """Logits [num_logits, vocab] (float32) for batch.logits_indices rows."""
        x = self.hidden_states(batch, kv_caches)
        x = paddle.gather(x, batch.logits_indices)
        return paddle.matmul(rms_norm(x, self.final_norm, self.cfg.rms_norm_eps), self.lm_head)

    def allocate_kv_caches(self, num_blocks: int, block_size: int) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        shape = [num_blocks, self.cfg.num_key_value_heads, block_size, self.cfg.head_dim]
        return [(paddle.zeros(shape, dtype="float32"), paddle.zeros(shape, dtype="float32"))
                for _ in range(self.cfg.num_hidden_layers)]

    def kv_bytes_per_block(self, block_size: int) -> int:
        return 2 * self.cfg.num_hidden_layers * self.cfg.num_key_value_heads * block_size * self.cfg.head_dim * 4
