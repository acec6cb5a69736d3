"""Continuous batching with chunked prefill under a token budget, preempting by recompute."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from fastdeploy.config import SchedulerConfig
from fastdeploy.engine.block_manager import BlockManager
from fastdeploy.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk reaches the last known token, so a new token gets sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    """Running requests first (decode or the rest of a chunked prefill), then waiting ones (FIFO).

    When blocks run out the newest running request is preempted: its blocks are freed and it goes
    back to the front of the waiting queue to be recomputed, so nothing deadlocks or gets lost.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, self._chunk_limit(seq, budget))
            target = seq.num_computed_tokens + num_new
            while not self.blocks.can_grow(seq, target):
                # Victims come from the tail, which this loop has not scheduled yet (or is seq itself).
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.blocks.grow(seq, target)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self._admit_waiting(scheduled, budget)
        return scheduled

    def _chunk_limit(self, seq: Sequence, budget: int) -> int:
        """Most new tokens seq may compute in this step."""
        if seq.prompt_logprobs_pending and self.config.enable_chunked_prefill:
            return min(budget, self.config.max_prompt_scoring_tokens)
        return budget

    def _admit_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = [] if seq.prompt_logprobs_pending else self.blocks.match_prefix(seq)
            remaining = seq.num_tokens - len(hits) * self.blocks.block_size
            num_new = min(remaining, self._chunk_limit(seq, budget))
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            target = len(hits) * self.blocks.block_size + num_new
            if not self.blocks.can_allocate(seq, hits, target):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, hits, target)
            if seq.num_preemptions == 0 or not seq.first_scheduled_time:
                seq.num_cached_tokens = seq.num_computed_tokens
            if not seq.first_scheduled_time:
                seq.first_scheduled_time = time.time()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
