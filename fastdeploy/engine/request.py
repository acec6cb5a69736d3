"""Offline API result types, named and shaped as in FastDeploy's docs (seed 003)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestMetrics:
    arrival_time: float = 0.0
    """Wall time the request was received."""
    inference_start_time: float = 0.0
    """Wall time the engine first scheduled it."""
    first_token_time: float = 0.0
    """Seconds from inference start to the first generated token."""
    time_in_queue: float = 0.0
    """Seconds between arrival and inference start."""
    model_forward_time: float = 0.0
    """Seconds from inference start to the last token (forward passes and sampling)."""
    model_execute_time: float = 0.0
    """Seconds from arrival to the last token, including queueing and pre/post-processing."""


@dataclass
class CompletionOutput:
    index: int = 0
    """Choice index (0..n-1) of this output for its prompt."""
    send_idx: int = 0
    """Number of tokens returned so far (the index of the next token to send)."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning_content: str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: CompletionOutput
    finished: bool = False
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    num_cached_tokens: int = 0
    error_code: int = 200
    error_msg: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With SamplingParams(prompt_logprobs=k): per prompt token, its logprob and the k most likely
    tokens' ({token id: logprob}, as CompletionOutput.logprobs); None for the first token."""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
