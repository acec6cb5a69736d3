"""SamplingParams: per-request generation settings (seed 003's names), also a wire type.

It is a msgspec Struct so it crosses process boundaries as is; construction validates every field
and raises ValueError naming the parameter, which the server turns into a 400 with `param` set.
"""
from __future__ import annotations

import json
import math
from typing import Any

import msgspec

from fastdeploy.engine.guided_decoding import GrammarError, compile_grammar

LOGIT_BIAS_LIMIT = 100.0
"""OpenAI's range for a logit_bias value: -100 bans a token in effect, +100 all but forces it."""


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid; `param` names it (the OpenAI error body's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class GuidedDecodingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Structured output (FastDeploy's and vLLM's names): exactly one constraint, which the output
    follows token by token (engine/guided_decoding.py, on llguidance)."""

    json: str | dict[str, Any] | None = None
    """A JSON schema (a dict, or its JSON text)."""
    regex: str | None = None
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A GBNF (llama.cpp) or Lark grammar."""
    json_object: bool | None = None
    """Any JSON object."""
    structural_tag: str | None = None
    """JSON text of {"structures": [{"begin", "schema", "end"}], "triggers": [...]}: free text in
    which each structure, once its trigger appears, is completed as begin + JSON(schema) + end."""

    def __post_init__(self) -> None:
        chosen = [name for name in self.__struct_fields__ if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise SamplingParamsError("guided_decoding", "set exactly one of json, regex, choice, grammar, "
                                      f"json_object, structural_tag (got {', '.join(chosen) or 'none'})")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError("guided_decoding", "choice must be a non-empty list of non-empty strings")
        try:
            compile_grammar(self)
        except GrammarError as exc:
            raise SamplingParamsError("guided_decoding", str(exc)) from None

    def key(self) -> str:
        """A stable text naming this constraint (the compiled-grammar cache's key)."""
        return json.dumps(msgspec.to_builtins(self), sort_keys=True)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True, gc=False):
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    """Filled by the tokenizer stage from bad_words (each word's token sequences)."""
    max_tokens: int | None = None
    """None: up to the model length."""
    min_tokens: int = 0
    logprobs: int | None = None
    """Number of top logprobs to return per generated token (0 = only the sampled token's)."""
    prompt_logprobs: int | None = None
    """Logprob of every prompt token under the model (raw logits) and this many top alternatives;
    the prompt is then computed in full rather than read from the prefix cache."""
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    reasoning_max_tokens: int | None = None
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit before penalties and sampling (OpenAI's logit_bias)."""
    response_format: str | None = None
    """"json_object": the output is one JSON object (engine/guided_decoding.py); None: free text."""
    guided_decoding: GuidedDecodingParams | None = None
    """Structured output: a JSON schema, regex, choice or grammar the output follows."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, param: str, msg: str) -> None:
            if not ok:
                raise SamplingParamsError(param, msg)

        need(isinstance(self.n, int) and 1 <= self.n <= 64, "n", f"must be an integer in [1, 64], got {self.n!r}")
        if self.best_of is not None:
            need(isinstance(self.best_of, int) and self.n <= self.best_of <= 64, "best_of",
                 f"must be an integer in [n, 64], got {self.best_of!r}")
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        need(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        need(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or a positive integer")
        need(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        if self.seed is not None:
            need(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", "must be a non-negative 64-bit integer")
        if self.max_tokens is not None:
            need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be at least 1")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        if self.max_tokens is not None:
            need(self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        if self.logprobs is not None:
            need(isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None:
            need(isinstance(self.prompt_logprobs, int) and not isinstance(self.prompt_logprobs, bool)
                 and 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]")
        if self.stop is not None:
            need(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16, "stop",
                 "must be at most 16 non-empty strings")
        if self.stop_token_ids is not None:
            need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 "must be non-negative integers")
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.logit_bias), "logit_bias",
                "must map non-negative integer token ids to numbers")
            need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     and -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT for v in self.logit_bias.values()),
                 "logit_bias", f"values must be numbers in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        need(self.response_format in (None, "json_object"), "response_format",
             f"must be 'json_object' or None, got {self.response_format!r}")
        # Beam search re-submits each beam as a new prompt, which would restart the object.
        need(not (self.response_format and self.use_beam_search), "response_format",
             "is not supported with beam search")
        if isinstance(self.guided_decoding, dict):  # e.g. sampling_params given as a dict (EngineClient)
            try:
                self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)
            except TypeError as exc:
                raise SamplingParamsError("guided_decoding", str(exc)) from None
        if self.guided_decoding is not None:
            need(isinstance(self.guided_decoding, GuidedDecodingParams), "guided_decoding",
                 "must be a GuidedDecodingParams or a dict of its fields")
            need(self.response_format is None, "guided_decoding", "cannot be combined with response_format")
            need(not self.use_beam_search, "guided_decoding", "is not supported with beam search")
        if self.reasoning_max_tokens is not None:
            need(self.reasoning_max_tokens >= 1, "reasoning_max_tokens", "must be at least 1")
        need(self.length_penalty >= 0.0, "length_penalty", "must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def clone(self, **changes: object) -> "SamplingParams":
        return msgspec.structs.replace(self, **changes)
