"""Engine configuration, grouped by concern. EngineArgs (engine/args.py) builds these from flags/kwargs."""
from __future__ import annotations

from dataclasses import dataclass, field


# KV cache element types (--kv-cache-dtype, besides "auto"); int8: codes and a step per row.
KV_CACHE_DTYPES = ("float32", "float16", "int8")
# --guided-decoding-backend values (FastDeploy's, vLLM's); all but "off" run on llguidance here.
GUIDED_DECODING_BACKENDS = ("auto", "guidance", "llguidance", "xgrammar", "off")


@dataclass
class ModelConfig:
    model: str = "smollm2-135m-instruct"
    """A .gguf path, a safetensors directory, or an alias of the default model."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; None takes the model's context length."""
    dtype: str = "float32"
    """Compute dtype of the Paddle forward ("float32" on the CPU)."""
    reasoning_parser: str | None = None
    """Name of the parser that splits reasoning_content from text (e.g. "qwen3", "ernie-45-vl")."""
    enable_mm: bool = False
    """Multimodal input; refused for the text-only models we serve."""
    use_warmup: bool = False
    """Run one dummy step at start so the first request does not pay one-time costs."""
    quantization: str | None = None
    """Weight format of the linear layers: "none" (fp32), "bf16" or "wint8" (8-bit weight-only). None
    (auto): wint8 for a GGUF file stored in Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks, which wint8 holds
    exactly, when the native kernels run; fp32 otherwise (ModelRunner's resolve_quantization)."""
    seed: int = 0
    """Seed of the generator shared by requests that set no seed of their own (reproducible runs)."""
    guided_decoding_backend: str = "auto"
    """Structured output (JSON mode, schemas, regexes, choices, grammars): "off" refuses such
    requests; every other value of GUIDED_DECODING_BACKENDS serves them with llguidance
    (engine/guided_decoding.py): xgrammar is not part of this build."""


@dataclass
class CacheConfig:
    block_size: int = 64
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """Share of device memory for KV blocks; on the CPU, the share of *available* RAM after loading."""
    kv_cache_ratio: float = 0.75
    """Accepted for FastDeploy compatibility (expected input share of the cache); informational."""
    num_gpu_blocks_override: int | None = None
    """Fixed number of KV blocks; skips profiling."""
    enable_prefix_caching: bool = True
    """Share full prompt blocks between requests by a chained hash of their tokens."""
    cpu_kv_cache_max_gib: float = 4.0
    """On the CPU, never take more than this for KV, whatever is free (other processes need RAM too)."""
    kv_cache_dtype: str = "auto"
    """Element type of the KV cache: "float32", "float16", "int8" (8-bit codes and a step per token
    and head), or "auto" (float16 where the native CPU attention kernels run, float32 otherwise;
    ModelRunner's resolve_kv_cache_dtype)."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step; longer prompts are prefilled in chunks."""
    scheduler_name: str = "local"
    enable_chunked_prefill: bool = True
    max_prompt_scoring_tokens: int = 256
    """Most prompt tokens a prompt-logprobs request computes in one step (with chunked prefill).
    Each such token pays the lm_head and a log-softmax, so a 2,048-token chunk would stall every
    other stream for about a second on the CPU."""


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    engine_worker_queue_port: int | None = None
    """Accepted for FastDeploy compatibility; our processes talk over ipc:// and need no port."""


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Refuse what we cannot honour, with a message naming the option."""
        if self.parallel_config.tensor_parallel_size != 1:
            raise ValueError("--tensor-parallel-size > 1 is not supported yet on this build (CPU, one device)")
        if self.model_config.enable_mm:
            raise ValueError("--enable-mm: the served model is text-only; multimodal input is not supported")
        if self.scheduler_config.scheduler_name != "local":
            raise ValueError(f"--scheduler-name {self.scheduler_config.scheduler_name!r}: only 'local' is supported")
        if self.model_config.dtype not in ("float32", "fp32", "auto"):
            raise ValueError(f"--dtype {self.model_config.dtype!r}: compute is float32 on this build; "
                             "use --quantization bf16 or wint8 for lower-precision weights")
        if self.model_config.quantization not in (None, "none", "bf16", "wint8"):
            raise ValueError(f"--quantization {self.model_config.quantization!r}: choose none, bf16 or wint8")
        if self.model_config.guided_decoding_backend not in GUIDED_DECODING_BACKENDS:
            raise ValueError(f"--guided-decoding-backend {self.model_config.guided_decoding_backend!r}: choose "
                             f"{', '.join(GUIDED_DECODING_BACKENDS)}")
        cc = self.cache_config
        if cc.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ValueError(f"--kv-cache-dtype {cc.kv_cache_dtype!r}: choose auto, {', '.join(KV_CACHE_DTYPES)}")
        if cc.block_size < 1 or cc.block_size & (cc.block_size - 1):
            raise ValueError("--block-size must be a power of two")
        if not 0.0 < cc.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        if cc.num_gpu_blocks_override is not None and cc.num_gpu_blocks_override < 2:
            raise ValueError("--num-gpu-blocks-override must be at least 2")
        sc = self.scheduler_config
        if sc.max_num_seqs < 1:
            raise ValueError("--max-num-seqs must be at least 1")
        if sc.max_num_batched_tokens < 16:
            raise ValueError("--max-num-batched-tokens must be at least 16")
