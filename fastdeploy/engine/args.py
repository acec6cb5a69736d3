"""EngineArgs: the engine's options as keyword arguments (LLM(...)) and as command-line flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from fastdeploy.config import (
    GUIDED_DECODING_BACKENDS,
    KV_CACHE_DTYPES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)


def _str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


@dataclass
class EngineArgs:
    model: str = ModelConfig.model
    max_model_len: int | None = None
    dtype: str = "float32"
    reasoning_parser: str | None = None
    enable_mm: bool = False
    use_warmup: bool = False
    seed: int = 0
    guided_decoding_backend: str = ModelConfig.guided_decoding_backend
    quantization: str | None = None
    block_size: int = CacheConfig.block_size
    gpu_memory_utilization: float = CacheConfig.gpu_memory_utilization
    kv_cache_ratio: float = CacheConfig.kv_cache_ratio
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = CacheConfig.kv_cache_dtype
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    scheduler_name: str = "local"
    tensor_parallel_size: int = 1
    engine_worker_queue_port: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "EngineArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known - _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def create_engine_config(self) -> EngineConfig:
        cfg = EngineConfig(
            model_config=ModelConfig(model=self.model, max_model_len=self.max_model_len, dtype=self.dtype,
                                     reasoning_parser=self.reasoning_parser, enable_mm=self.enable_mm,
                                     use_warmup=self.use_warmup, seed=self.seed,
                                     quantization=self.quantization,
                                     guided_decoding_backend=self.guided_decoding_backend),
            cache_config=CacheConfig(block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
                                     kv_cache_ratio=self.kv_cache_ratio,
                                     num_gpu_blocks_override=self.num_gpu_blocks_override,
                                     enable_prefix_caching=self.enable_prefix_caching,
                                     kv_cache_dtype=self.kv_cache_dtype),
            scheduler_config=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                             max_num_batched_tokens=self.max_num_batched_tokens,
                                             scheduler_name=self.scheduler_name),
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                           engine_worker_queue_port=self.engine_worker_queue_port),
        )
        cfg.validate()
        return cfg

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=d.model, help="GGUF file, safetensors directory, or alias")
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--dtype", default=d.dtype)
        g.add_argument("--reasoning-parser", default=None)
        g.add_argument("--enable-mm", type=_str2bool, nargs="?", const=True, default=False)
        g.add_argument("--use-warmup", type=_str2bool, nargs="?", const=True, default=False)
        g.add_argument("--seed", type=int, default=0, help="sampling seed for requests without their own")
        g.add_argument("--quantization", default=None, choices=["none", "bf16", "wint8"],
                       help="weight format of linear layers (default: wint8 for GGUF files in Q4_0/Q4_1/Q5_0/"
                            "Q5_1/Q8_0 blocks, which it holds exactly, on CPUs with the native kernels; fp32 "
                            "otherwise)")
        g.add_argument("--guided-decoding-backend", default=d.guided_decoding_backend,
                       choices=GUIDED_DECODING_BACKENDS,
                       help="structured output (response_format, guided_json/regex/choice/grammar): off refuses "
                            "it; every other value serves it with llguidance")
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--kv-cache-ratio", type=float, default=d.kv_cache_ratio)
        g.add_argument("--num-gpu-blocks-override", type=int, default=None)
        g.add_argument("--enable-prefix-caching", type=_str2bool, nargs="?", const=True, default=True)
        g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", *KV_CACHE_DTYPES],
                       help="KV cache element type (default auto: float16 where the native CPU attention kernels "
                            "run, float32 otherwise; int8: 8-bit codes with a step per token and head, about half "
                            "of float16's memory)")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        g.add_argument("--scheduler-name", default="local")
        g.add_argument("--tensor-parallel-size", type=int, default=1)
        g.add_argument("--engine-worker-queue-port", type=int, default=None)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# Accepted for FastDeploy compatibility and ignored on this build (documented in README).
_IGNORED_KWARGS = {"limit_mm_per_prompt", "tokenizer"}
