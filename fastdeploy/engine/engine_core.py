"""EngineCore: the busy-loop body shared by the offline LLM API and the engine process.

add_request / abort_requests mutate the queues; step() runs one schedule → forward → sample
round and returns one columnar StepOutput. Every request ends with exactly one row whose
finish_reason is set, so every consumer can free its state.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np

from fastdeploy.config import EngineConfig
from fastdeploy.engine.block_manager import BlockManager
from fastdeploy.engine.guided_decoding import GrammarError, GuidedVocabulary
from fastdeploy.engine.protocol import EngineRequest, EngineStats, StepOutput, TokenLogprobs
from fastdeploy.engine.sampler import Sampler, token_logprobs
from fastdeploy.engine.sampling_params import GuidedDecodingParams
from fastdeploy.engine.scheduler import ScheduledSeq, Scheduler
from fastdeploy.engine.sequence import Sequence, SequenceStatus
from fastdeploy.logger import setup_logging
from fastdeploy.model_executor.model_runner import ModelRunner
from fastdeploy.model_store import resolve_model

logger = logging.getLogger("fastdeploy")

_JSON_OBJECT = GuidedDecodingParams(json_object=True)
"""JSON mode (response_format="json_object") is this constraint."""
_ABORT_MEMORY_SECONDS = 120.0
_ABORT_MEMORY_SIZE = 4096


class EngineRequestError(ValueError):
    """A request the engine cannot run; `param` names the offending field for the HTTP error body."""

    status = 400
    code = "invalid_value"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class DuplicateRequestError(EngineRequestError):
    """The client's request id is already in flight (FastDeploy answers "req_id repeated")."""

    status = 409
    code = "duplicate_request_id"


class ClientIds:
    """Client-chosen request ids in flight, engine-wide: the one place every api worker and the
    ZeroMQ gateway meet, so a duplicate is caught whichever process the second request came through.

    Engine ids are unique by construction ("<pipeline id>-<choice>"); the n choices of one request
    share its client id, so a claim from the same pipeline id is a sibling, not a duplicate.
    """

    def __init__(self) -> None:
        self._owner: dict[str, tuple[str, int]] = {}
        """client id → (pipeline id, engine requests still in flight)."""
        self._client_of: dict[str, str] = {}
        """engine request id → its client id."""

    def claim(self, client_id: str, request_id: str) -> None:
        if not client_id:
            return
        group = request_id.rpartition("-")[0] or request_id
        owner = self._owner.get(client_id)
        if owner is not None and owner[0] != group:
            raise DuplicateRequestError("request_id", f"request_id {client_id!r} is already in flight; "
                                                      "request ids must be unique among running requests")
        self._owner[client_id] = (group, (owner[1] if owner else 0) + 1)
        self._client_of[request_id] = client_id

    def release(self, request_id: str) -> None:
        client_id = self._client_of.pop(request_id, None)
        if client_id is None:
            return
        group, count = self._owner[client_id]
        if count <= 1:
            del self._owner[client_id]
        else:
            self._owner[client_id] = (group, count - 1)

    def __len__(self) -> int:
        return len(self._owner)


class _Rows:
    """Accumulates the columns of one StepOutput."""

    def __init__(self) -> None:
        self.out = StepOutput(request_ids=[], new_token_ids=[], finish_reasons=[], num_prompt_tokens=[],
                              num_cached_tokens=[], logprobs=[], first_scheduled_times=[], error_messages=[],
                              prompt_logprobs=[])

    def add(self, seq: Sequence, tokens: list[int], finish: str | None, lp: TokenLogprobs | None = None,
            error: str | None = None) -> None:
        o = self.out
        o.request_ids.append(seq.request_id)
        o.new_token_ids.append(tokens)
        o.finish_reasons.append(finish)
        o.num_prompt_tokens.append(seq.num_prompt_tokens)
        o.num_cached_tokens.append(seq.num_cached_tokens)
        o.logprobs.append([lp] if lp is not None else None)
        o.first_scheduled_times.append(seq.first_scheduled_time)
        o.error_messages.append(error)
        # With the first output token, once: the prompt's logprobs are all computed by then.
        first = seq.prompt_logprobs is not None and seq.num_output_tokens == 1 and bool(tokens)
        o.prompt_logprobs.append(seq.prompt_logprobs if first else None)

    def __len__(self) -> int:
        return len(self.out.request_ids)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        setup_logging()
        self.config = config
        self.model_path = resolve_model(config.model_config.model)
        self.runner = ModelRunner(self.model_path, config.model_config.max_model_len,
                                  config.model_config.quantization, config.cache_config.kv_cache_dtype)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.arch.vocab_size
        self.eos_token_ids = list(self.runner.arch.eos_token_ids)
        cache = config.cache_config
        num_blocks = self.runner.profile_num_blocks(cache)
        logger.info("Doing profile, the total_block_num:%d", num_blocks)
        self.runner.init_kv_cache(num_blocks, cache.block_size)
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.blocks)
        self.sampler = Sampler(self.eos_token_ids, seed=config.model_config.seed)
        self.seqs: dict[str, Sequence] = {}
        self.client_ids = ClientIds()
        self.recent_aborts: OrderedDict[str, float] = OrderedDict()
        self.pending = _Rows()
        self.num_steps = 0
        self.last_forward_seconds = 0.0
        if config.model_config.guided_decoding_backend == "xgrammar":
            logger.info("--guided-decoding-backend xgrammar: not part of this build; llguidance serves the "
                        "same constraints")
        if config.model_config.use_warmup:
            self._warmup()

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; raises EngineRequestError for anything that could never run."""
        rid = req.request_id
        if rid in self.seqs:
            raise EngineRequestError("request_id", f"request id {rid!r} is already in flight")
        params = req.sampling_params
        seq = Sequence(rid, req.prompt_token_ids, params, max_tokens=0, arrival_time=req.arrival_time,
                       reply_to=req.reply_to)
        self._validate(req, seq)
        guided = params.guided_decoding
        if params.response_format == "json_object":
            guided = _JSON_OBJECT
        if guided is not None:
            param = "response_format" if params.response_format else "guided_decoding"
            if self.config.model_config.guided_decoding_backend == "off":
                raise EngineRequestError(param, "structured output is off on this server "
                                                "(--guided-decoding-backend off)")
            try:
                seq.guided = self._guided_vocab().start(guided, thinking=req.reasoning_first)
            except GrammarError as exc:
                raise EngineRequestError(param, str(exc)) from None
        if self.recent_aborts.pop(rid, None) is not None:
            self.pending.add(seq, [], "abort")
            return
        self.client_ids.claim(req.client_id, rid)
        self.seqs[rid] = seq
        self.scheduler.add(seq)

    def _validate(self, req: EngineRequest, seq: Sequence) -> None:
        ids = req.prompt_token_ids
        if not ids:
            raise EngineRequestError("prompt", "the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise EngineRequestError("prompt", f"prompt token ids must be in [0, {self.vocab_size})")
        bias = req.sampling_params.logit_bias
        if bias and max(bias) >= self.vocab_size:
            raise EngineRequestError("logit_bias",
                                     f"token id {max(bias)} is outside the vocabulary [0, {self.vocab_size})")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise EngineRequestError(
                "prompt", f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                "which leaves no room for output")
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise EngineRequestError(
                "max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})")
        seq.max_tokens = max_tokens if max_tokens is not None else room
        need = self.blocks.blocks_needed(len(ids) + seq.max_tokens)
        if need > self.blocks.num_blocks:
            raise EngineRequestError(
                "max_tokens", f"prompt + max_tokens needs {need} KV blocks but the pool has "
                f"{self.blocks.num_blocks} (block_size {self.blocks.block_size})")

    def abort_requests(self, request_ids: list[str]) -> None:
        """Idempotent. An abort for an id not seen yet is remembered so it wins when the request arrives."""
        now = time.monotonic()
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is not None:
                self.scheduler.remove(seq)
                self.client_ids.release(rid)
                self.pending.add(seq, [], "abort")
            else:
                self.recent_aborts[rid] = now
        while self.recent_aborts and (len(self.recent_aborts) > _ABORT_MEMORY_SIZE
                                      or now - next(iter(self.recent_aborts.values())) > _ABORT_MEMORY_SECONDS):
            self.recent_aborts.popitem(last=False)

    def has_unfinished_requests(self) -> bool:
        return bool(self.seqs) or len(self.pending) > 0

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> StepOutput | None:
        rows, self.pending = self.pending, _Rows()
        scheduled = self.scheduler.schedule()
        if scheduled:
            self._run(scheduled, rows)
            self.num_steps += 1
        if not len(rows):
            return None
        rows.out.step_time = time.time()
        return rows.out

    def _run(self, scheduled: list[ScheduledSeq], rows: _Rows) -> None:
        chunks, starts, tables, logit_rows, sampling = [], [], [], [], []
        prompt_rows: list[tuple[int, Sequence, int]] = []  # (flat row, seq, prompt token it scores)
        offset = 0
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            chunks.append(seq.all_token_ids[start:start + n])
            starts.append(start)
            tables.append(seq.block_table)
            if seq.prompt_logprobs_pending:
                # Position q's logits predict token q + 1; positions already scored are skipped
                # (a preempted sequence recomputes its prompt).
                first = max(start, len(seq.prompt_logprobs) - 1)  # type: ignore[arg-type]
                last = min(start + n, seq.num_prompt_tokens - 1)
                prompt_rows += [(offset + q - start, seq, q + 1) for q in range(first, last)]
            offset += n
            if item.completes_prompt:
                logit_rows.append(offset - 1)
                sampling.append(seq)
        t0 = time.perf_counter()
        logits = self.runner.execute(chunks, starts, tables, logit_rows + [row for row, _, _ in prompt_rows])
        self.last_forward_seconds = time.perf_counter() - t0
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.blocks.register_full_blocks(item.seq)
        self._score_prompts(logits[len(sampling):], prompt_rows)
        if not sampling:
            return
        tokens, logprobs = self.sampler.sample(logits[:len(sampling)], sampling)
        for seq, token, lp in zip(sampling, tokens, logprobs):
            seq.append_token(token)
            if seq.guided is not None:
                self.sampler.guided_vocab.advance(seq.guided, token)  # type: ignore[union-attr]
            finish = self._finish_reason(seq, token)
            if finish is not None:
                self.seqs.pop(seq.request_id, None)
                self.scheduler.remove(seq)
                self.client_ids.release(seq.request_id)
            rows.add(seq, [token], finish, lp)

    @staticmethod
    def _score_prompts(logits: np.ndarray, prompt_rows: list[tuple[int, Sequence, int]]) -> None:
        """Appends each scored prompt token's logprob (raw logits, no penalties) to its sequence;
        rows come in prompt order, each right after the ones before it."""
        for row, (_, seq, index) in zip(logits, prompt_rows):
            scored = seq.prompt_logprobs
            assert scored is not None and len(scored) == index, "prompt logprobs out of order"
            entry = token_logprobs(row, seq.prompt_token_ids[index], seq.params.prompt_logprobs)
            scored.append(entry)  # type: ignore[arg-type]

    def _guided_vocab(self) -> GuidedVocabulary:
        """Token masks need each token's bytes: the tokenizer is read on the first constrained request."""
        if self.sampler.guided_vocab is None:
            from fastdeploy.input.tokenizer import load_tokenizer

            logger.info("Structured output: reading the vocabulary's token bytes")
            tok = load_tokenizer(self.model_path)
            self.sampler.guided_vocab = GuidedVocabulary(tok, self.vocab_size, self.eos_token_ids)
        return self.sampler.guided_vocab

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.guided is not None and seq.guided.complete:
            return "stop"
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if past_min and p.stop_token_ids and token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _warmup(self) -> None:
        """One short prefill so lazy initialisation (kernel builds, allocator growth) happens now."""
        table = list(range(min(2, self.blocks.num_blocks)))
        self.runner.execute([[0] * 8], [0], [table], [7])

    # ---- observability ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage(),
            num_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
        )

    def waiting_or_running(self, request_id: str) -> bool:
        seq = self.seqs.get(request_id)
        return seq is not None and seq.status != SequenceStatus.FINISHED
