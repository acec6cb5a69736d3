"""Per-request state inside the engine."""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import numpy as np

from fastdeploy.engine.protocol import TokenLogprobs
from fastdeploy.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastdeploy.engine.guided_decoding import GuidedState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens, KV blocks and sampling state of one request.

    Invariant: the first `num_computed_tokens` of `all_token_ids` have their K/V in `block_table`.
    A preempted sequence drops its blocks and recomputes everything (prompt + output so far).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, arrival_time: float | None = None, reply_to: str = "") -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.arrival_time = arrival_time or time.time()
        self.reply_to = reply_to
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        """Chained hashes of the full blocks of all_token_ids registered so far."""
        self.num_cached_tokens = 0
        self.first_scheduled_time = 0.0
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # A private generator per seeded request makes its samples independent of batch composition.
        self.rng = np.random.default_rng(params.seed) if params.seed is not None else None
        self.output_counts: dict[int, int] = {}
        # Prompt logprobs (SamplingParams.prompt_logprobs), one entry per prompt token as its chunks
        # are computed. Nothing predicts the first token: its entry has logprob 0 and no alternatives.
        self.prompt_logprobs: list[TokenLogprobs] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [TokenLogprobs(token_id=t, logprob=0.0) for t in self.prompt_token_ids[:1]]
        # Structured output (guided_decoding, JSON mode): set by the engine, advanced by each sampled token.
        self.guided: GuidedState | None = None

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt logprobs asked for and not all computed: the prompt must be run, not read from the
        prefix cache, up to the last one missing."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
