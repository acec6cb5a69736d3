"""ModelRunner: owns the model weights and the KV pool, turns a schedule into logits."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import paddle

from fastdeploy.config import KV_CACHE_DTYPES, CacheConfig
from fastdeploy.model_executor.forward_batch import ForwardBatch
from fastdeploy.model_executor.layers.linear import act8_default, act8_min_rows, linear_backend_name
from fastdeploy.model_executor.loader import load_model_weights
from fastdeploy.model_executor.loader.gguf_loader import WINT8_EXACT_TYPES, matrix_types
from fastdeploy.model_executor.model_config import ModelArchConfig
from fastdeploy.model_executor.models.decoder import DecoderModel

logger = logging.getLogger("fastdeploy")


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (falls back to physical pages if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_quantization(model_path: str, requested: str | None) -> str:
    """The linear layers' weight format: `requested`, or when it is None (auto) ``wint8`` for a GGUF
    file whose matrices are all in block types wint8 holds exactly (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0), if
    the native kernels run here, and ``none`` (fp32) otherwise. The quantized file's weights are
    then kept quantized instead of being widened to fp32 (4-bit codes for Q4 blocks in AVX2 builds,
    8-bit ones otherwise): the same values, a quarter of the bytes or less to stream per decode step
    (2.3x faster at batch 1 on the AVX2 machine with 8-bit codes)."""
    if requested is not None:
        return requested
    if not Path(model_path).is_file():
        return "none"
    types = matrix_types(model_path)
    if not types or not types <= WINT8_EXACT_TYPES or linear_backend_name() != "native":
        return "none"
    logger.info("Weights are GGUF %s blocks: kept as wint8, which holds them exactly "
                "(--quantization none for fp32)", "/".join(sorted(t.name for t in types)))
    return "wint8"


def resolve_kv_cache_dtype(requested: str | None) -> str:
    """The KV cache's element type: `requested`, or when it is None/"auto" ``float16`` where the
    native attention kernels run (they widen it to fp32 as they load it; half the bytes to stream
    per decode step and twice the tokens per GiB) and ``float32`` otherwise (the plain-Paddle
    reference would cast the whole cache on every call). ``int8`` stores each token's K and V rows
    as 8-bit codes with a float32 step per row (native/kv_types.h): 0.53x float16's bytes."""
    if requested not in (None, "auto"):
        if requested not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {requested!r}: choose auto, {', '.join(KV_CACHE_DTYPES)}")
        return requested
    from fastdeploy.model_executor.ops.paged_attention import NATIVE, attention_backend_name

    return "float16" if attention_backend_name() == NATIVE else "float32"


class ModelRunner:
    def __init__(self, model_path: str, max_model_len: int | None = None, quantization: str | None = None,
                 kv_cache_dtype: str | None = None) -> None:
        paddle.set_device(os.environ.get("FASTDEPLOY_DEVICE", paddle.device.get_device()))
        quantization = resolve_quantization(model_path, quantization)
        if quantization == "wint8" and act8_default() and act8_min_rows() > 0:
            logger.warning("FASTDEPLOY_ACT8=1: wint8 layers on 4-bit codes multiply 8-bit activations "
                           "(llama.cpp's Q8_1 arithmetic). Faster, but greedy output may leave fp32's where "
                           "its top-2 logit gap is below ~1 (scripts/precision_margins.py)")
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        # wint8 layers take a GGUF's Q4_1 matrices as their 4-bit codes (layers/grid4.py).
        cfg, weights = load_model_weights(model_path, keep_grids=quantization == "wint8")
        if max_model_len is not None:
            if max_model_len > cfg.max_position_embeddings:
                logger.warning("max_model_len %d exceeds the model's context length %d", max_model_len,
                               cfg.max_position_embeddings)
            cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_model_len)
        self.arch: ModelArchConfig = cfg
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.quantization = quantization
        self.model = DecoderModel(cfg, weights, quant=quantization)
        del weights
        self.kv_caches: list[tuple[paddle.Tensor, paddle.Tensor]] = []
        self.block_size = 0
        self.num_blocks = 0

    def profile_num_blocks(self, cache: CacheConfig) -> int:
        """KV blocks that fit the memory share the cache config grants (or the override)."""
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.model.kv_bytes_per_block(cache.block_size, self.kv_cache_dtype)
        if paddle.device.is_compiled_with_cuda() and "gpu" in paddle.device.get_device():
            total = paddle.device.cuda.get_device_properties().total_memory
            used = paddle.device.cuda.memory_allocated()
            budget = total * cache.gpu_memory_utilization - used
        else:
            # On the CPU the share applies to RAM still available after loading weights, capped so
            # the tokenizer/detokenizer/api processes and the OS keep room.
            budget = min(available_host_memory() * cache.gpu_memory_utilization * 0.5,
                         cache.cpu_kv_cache_max_gib * (1 << 30))
        # Never more blocks than max_num_seqs full-length sequences could use is not known here;
        # at least enough for one full-length sequence.
        minimum = -(-self.max_model_len // cache.block_size)
        return max(int(budget // per_block), minimum)

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_caches = self.model.allocate_kv_caches(num_blocks, block_size, self.kv_cache_dtype)
        logger.info("KV cache: %d blocks of %d tokens, %s, %.0f MiB", num_blocks, block_size, self.kv_cache_dtype,
                    num_blocks * self.model.kv_bytes_per_block(block_size, self.kv_cache_dtype) / (1 << 20))

    def execute(self, token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]],
                logits_rows: list[int]) -> np.ndarray:
        """Run one forward over the concatenated chunks; returns float32 logits for logits_rows."""
        batch = ForwardBatch.build(token_chunks, start_positions, block_tables, self.block_size, logits_rows)
        logits = self.model.forward(batch, self.kv_caches)
        return logits.numpy()
