"""Offline inference: `from fastdeploy import LLM, SamplingParams` (seed 003 is the contract).

The LLM drives an in-process EngineCore: it tokenizes, queues every prompt at once (the engine
batches them continuously), steps until all finish, detokenizes incrementally and applies stop
strings and the reasoning parser with the same per-request text state the server's detokenizers use.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from fastdeploy.engine.args import EngineArgs
from fastdeploy.engine.engine_core import EngineCore, EngineRequestError
from fastdeploy.engine.protocol import EngineRequest, StepOutput, TokenLogprobs
from fastdeploy.engine.request import CompletionOutput, RequestMetrics, RequestOutput
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.input.bad_words import bad_words_to_token_ids
from fastdeploy.input.prompt_ids import PromptError, chat_prompt
from fastdeploy.input.tokenizer import Tokenizer, load_tokenizer
from fastdeploy.output.detokenizer import RequestTextState
from fastdeploy.output.reasoning import starts_in_reasoning

PromptType = str | list[int] | dict[str, Any]


class _Tracked:
    """What the LLM keeps per engine request until it finishes."""

    def __init__(self, output: RequestOutput, params: SamplingParams, text: RequestTextState) -> None:
        self.output = output
        self.params = params
        self.text = text
        self.stopped_by_string = False
        self.logprob_sum = 0.0


class LLM:
    def __init__(self, model: str = EngineArgs.model, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, **kwargs: Any) -> None:
        args = EngineArgs.from_kwargs(model=model, tensor_parallel_size=tensor_parallel_size,
                                      max_model_len=max_model_len, **kwargs)
        self.engine = EngineCore(args.create_engine_config())
        self.tokenizer: Tokenizer = load_tokenizer(self.engine.model_path)
        self.reasoning_parser = args.reasoning_parser
        self._ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        items = self._normalize_prompts(prompts)
        encoded = [self._encode_prompt(p) for p in items]
        return self._run(encoded, sampling_params, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[RequestOutput]:
        """continue_final_message: the last message is an assistant reply to carry on (then
        add_generation_prompt must be False), as in vLLM."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of messages or a list of conversations")
        batch = messages if isinstance(messages[0], list) else [messages]
        encoded = []
        for conversation in batch:
            try:
                encoded.append(chat_prompt(self.tokenizer, conversation, chat_template_kwargs,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message))
            except PromptError as exc:
                raise ValueError(f"{exc.param}: {exc}") from None
        thinking = bool((chat_template_kwargs or {}).get("enable_thinking", True))
        return self._run(encoded, sampling_params, use_tqdm, enable_thinking=thinking)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    # ---- prompts ------------------------------------------------------------------------------
    @staticmethod
    def _normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        if isinstance(prompts, Sequence) and prompts:
            return list(prompts)
        raise ValueError("prompts: expected str, list[str], list[int], list[list[int]] or dict")

    def _encode_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if isinstance(prompt, dict):
            if prompt.get("multimodal_data"):
                raise ValueError("prompts: multimodal_data is not supported by this text-only build")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"], add_special_tokens=True)
        raise ValueError(f"prompts: unsupported prompt {type(prompt).__name__}: {str(prompt)[:80]!r}")

    # ---- running ------------------------------------------------------------------------------
    def _params_for(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                    count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"sampling_params: got {len(sampling_params)} for {count} prompts")
        return list(sampling_params)

    def _run(self, encoded: list[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool, enable_thinking: bool = True) -> list[RequestOutput]:
        params_list = self._params_for(sampling_params, len(encoded))
        if any(p.use_beam_search for p in params_list):
            from fastdeploy.engine.beam_search import run_beam_search

            return run_beam_search(self, encoded, params_list, use_tqdm)
        tracked: dict[str, _Tracked] = {}
        order: list[str] = []
        try:
            for (text, ids), params in zip(encoded, params_list):
                for rid, child in self._fan_out(params):
                    tracked[rid] = self._submit(rid, text, ids, child, enable_thinking)
                    order.append(rid)
        except EngineRequestError as exc:
            self.engine.abort_requests(list(tracked))
            self._drain()
            raise ValueError(f"{exc.param}: {exc}") from None
        self._loop(tracked, use_tqdm)
        return [tracked[rid].output for rid in order]

    def _fan_out(self, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        base = str(next(self._ids))
        if params.n == 1:
            return [(base, params)]
        children = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else None
            children.append((f"{base}-{i}", params.clone(n=1, seed=seed)))
        return children

    def _submit(self, rid: str, text: str | None, ids: list[int], params: SamplingParams,
                enable_thinking: bool = True) -> _Tracked:
        if params.bad_words and not params.bad_words_token_ids:
            params = params.clone(bad_words_token_ids=bad_words_to_token_ids(self.tokenizer, params.bad_words))
        index = int(rid.rsplit("-", 1)[1]) if "-" in rid else 0
        now = time.time()
        self.engine.add_request(EngineRequest(
            request_id=rid, prompt_token_ids=ids, sampling_params=params, arrival_time=now,
            reasoning_first=starts_in_reasoning(self.reasoning_parser, enable_thinking)))
        output = RequestOutput(request_id=rid, prompt=text, prompt_token_ids=ids,
                               outputs=CompletionOutput(index=index), metrics=RequestMetrics(arrival_time=now))
        state = RequestTextState(self.tokenizer, params, reasoning_parser=self.reasoning_parser,
                                 prompt_token_ids=ids, enable_thinking=enable_thinking)
        return _Tracked(output, params, state)

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def _loop(self, tracked: dict[str, _Tracked], use_tqdm: bool) -> None:
        remaining = len(tracked)
        bar = tqdm(total=remaining, desc="Processed prompts", disable=not use_tqdm)
        try:
            while remaining:
                out = self.engine.step()
                if out is not None:
                    remaining -= self._absorb(out, tracked)
                    bar.n = len(tracked) - remaining
                    bar.refresh()
        finally:
            bar.close()

    def _absorb(self, out: StepOutput, tracked: dict[str, _Tracked]) -> int:
        """Apply one step's rows; returns how many requests finished."""
        finished = 0
        for i, rid in enumerate(out.request_ids):
            t = tracked.get(rid)
            if t is None or t.output.finished:
                continue
            o, c = t.output, t.output.outputs
            m = o.metrics
            if not m.inference_start_time and out.first_scheduled_times[i]:
                m.inference_start_time = out.first_scheduled_times[i]
                m.time_in_queue = m.inference_start_time - m.arrival_time
            o.num_cached_tokens = out.num_cached_tokens[i]
            new = out.new_token_ids[i]
            if new and not c.token_ids:
                m.first_token_time = out.step_time - m.inference_start_time
            c.token_ids.extend(new)
            c.send_idx = len(c.token_ids)
            self._record_logprobs(t, out, i)
            _, _, stop_hit = t.text.add_tokens(new)
            reason = out.finish_reasons[i]
            if stop_hit and reason is None:
                self.engine.abort_requests([rid])
                reason = "stop"
            if reason is None:
                continue
            t.text.finish()
            c.text = t.text.text
            c.reasoning_content = t.text.reasoning_text or None
            c.finish_reason = reason
            if reason == "error":
                o.error_code, o.error_msg = 500, out.error_messages[i] or "engine error"
            o.finished = True
            end = out.step_time or time.time()
            m.model_forward_time = end - (m.inference_start_time or end)
            m.model_execute_time = end - m.arrival_time
            finished += 1
        return finished

    @staticmethod
    def _record_logprobs(t: _Tracked, out: StepOutput, i: int) -> None:
        prompt = out.prompt_logprobs[i] if out.prompt_logprobs else None
        if prompt:
            t.output.prompt_logprobs = [None] + [_logprob_dict(lp) for lp in prompt[1:]]
        rows = out.logprobs[i] if out.logprobs else None
        if not rows:
            return
        c = t.output.outputs
        if c.logprobs is None:
            c.logprobs = []
        for lp in rows:
            c.logprobs.append(_logprob_dict(lp))
            t.logprob_sum += lp.logprob
        c.cumulative_logprob = t.logprob_sum


def _logprob_dict(lp: TokenLogprobs) -> dict[int, float]:
    """{token id: logprob} of the top alternatives and the token itself."""
    entry = {tok: val for tok, val in lp.top}
    entry[lp.token_id] = lp.logprob
    return entry
