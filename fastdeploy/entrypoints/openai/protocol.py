"""OpenAI request validation → SamplingParams, and the OpenAI error body.

Request bodies are plain JSON objects checked field by field (bool is not an int, NaN is not a
number), so every bad field becomes a 400 naming it in `param`. Unknown fields are ignored, as
FastDeploy documents.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from fastdeploy.engine.sampling_params import (
    LOGIT_BIAS_LIMIT,
    GuidedDecodingParams,
    SamplingParams,
    SamplingParamsError,
)

ACCEPTED_MODEL_ALIASES = ("default", "null")
MAX_PROMPTS = 64
MAX_BEAMS = 16
_ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


class ApiError(Exception):
    """An error answered with the OpenAI body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 404: "model_not_found",
                             413: "request_too_large", 429: "rate_limit_exceeded"}.get(status, "server_error")
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass
class ModelContext:
    served_model_name: str
    model: str
    max_model_len: int = 0
    vocab_size: int = 0


@dataclass
class ParsedRequest:
    kind: str
    """"chat" or "completion"."""
    model: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompts: list[str | list[int]] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    return_token_ids: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    logprobs: bool = False
    echo: bool = False
    score_only: bool = False
    """Completions' echo with max_tokens 0: the prompt (and its logprobs) alone is returned."""
    echo_texts: list[str] | None = None
    """Per prompt, the text echo returns; token-id prompts decoded (filled before serving)."""
    beam_width: int = 0
    """> 0: beam search with this many beams (use_beam_search / num_beams); n best are returned."""
    request_id: str | None = None
    """The client's id (FastDeploy's `request_id`): the response id, unique among requests in flight."""


class _Body:
    """Typed access to one JSON object; every failure is a 400 naming the field."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.data = data

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def integer(self, name: str, lo: int | None = None, hi: int | None = None, value: Any = None) -> int | None:
        value = self.data.get(name) if value is None else value
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"'{name}' must be an integer, got {type(value).__name__}", name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ApiError(400, f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", name)
        return value

    def number(self, name: str, lo: float, hi: float, value: Any = None) -> float | None:
        value = self.data.get(name) if value is None else value
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ApiError(400, f"'{name}' must be a finite number", name)
        if not lo <= value <= hi:
            raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", name)
        return float(value)

    def boolean(self, name: str, value: Any = None) -> bool | None:
        value = self.data.get(name) if value is None else value
        if value is None:
            return None
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be true or false", name)
        return value

    def obj(self, name: str) -> dict[str, Any] | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ApiError(400, f"'{name}' must be an object", name)
        return value

    def strings(self, name: str) -> list[str] | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ApiError(400, f"'{name}' must be a string or a list of strings", name)
        return value

    def int_list(self, name: str) -> list[int] | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ApiError(400, f"'{name}' must be a list of integers", name)
        return value


MAX_REQUEST_ID_CHARS = 256


def client_request_id(body: _Body) -> str | None:
    """FastDeploy clients (fdclient's req_id) name their requests; the engine rejects an id in flight."""
    value = body.get("request_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID_CHARS or not value.isprintable():
        raise ApiError(400, f"'request_id' must be a non-empty printable string of at most "
                            f"{MAX_REQUEST_ID_CHARS} characters", "request_id")
    return value


def check_model(body: _Body, ctx: ModelContext) -> str:
    model = body.get("model")
    if model is None or model in ACCEPTED_MODEL_ALIASES or model in (ctx.served_model_name, ctx.model):
        return ctx.served_model_name
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    raise ApiError(404, f"The model `{model}` does not exist; this server serves `{ctx.served_model_name}`",
                   "model", "model_not_found")


def _logit_bias(body: _Body, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} with JSON's string keys, as token id -> bias in [-100, 100]."""
    value = body.obj("logit_bias")
    if value is None:
        return None
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
        if token < 0 or (vocab_size and token >= vocab_size):
            raise ApiError(400, f"'logit_bias' keys must be token ids in [0, {vocab_size or 'vocab size'}), "
                                f"got {key!r}", "logit_bias")
        out[token] = body.number("logit_bias", -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT, bias)  # type: ignore[assignment]
    return out or None


_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "guided_json_object": "json_object", "structural_tag": "structural_tag"}
"""Request fields for structured output (FastDeploy's and vLLM's), and GuidedDecodingParams' names."""
_GUIDED_TYPES: dict[str, tuple[type, ...]] = {"json": (dict, str), "regex": (str,), "choice": (list,),
                                              "grammar": (str,), "json_object": (bool,), "structural_tag": (str,)}


def _structured_output(body: _Body) -> tuple[str | None, GuidedDecodingParams | None]:
    """OpenAI's response_format ("text", "json_object", "json_schema", FastDeploy's "structural_tag"),
    the guided_* fields and vLLM's structured_outputs: (JSON mode or None, the constraint or None)."""
    found: list[tuple[str, str, Any]] = []  # (request field, GuidedDecodingParams field, value)
    fmt = body.obj("response_format")
    kind = fmt.get("type", "text") if fmt is not None else "text"
    if kind == "json_schema":
        spec = fmt.get("json_schema")  # type: ignore[union-attr]
        schema = spec.get("schema", True) if isinstance(spec, dict) else None
        if not isinstance(schema, dict) and schema is not True:  # true: any JSON value
            raise ApiError(400, "response_format.json_schema must be an object whose 'schema' is a JSON schema",
                           "response_format")
        found.append(("response_format", "json", schema if isinstance(schema, dict) else {}))
    elif kind == "structural_tag":
        tags = {key: fmt.get(key) for key in ("structures", "triggers")}  # type: ignore[union-attr]
        found.append(("response_format", "structural_tag", json.dumps(tags)))
    elif kind not in ("text", "json_object"):
        raise ApiError(400, "response_format.type must be 'text', 'json_object', 'json_schema' or "
                            f"'structural_tag', got {kind!r}", "response_format")
    candidates = [(name, target, body.get(name)) for name, target in _GUIDED_FIELDS.items()]
    newer = body.obj("structured_outputs") or {}  # vLLM's newer object holding the same fields
    candidates += [("structured_outputs", target, newer.get(target)) for target in _GUIDED_TYPES]
    for name, target, value in candidates:
        if value is None or value is False:
            continue
        if not isinstance(value, _GUIDED_TYPES[target]):
            raise ApiError(400, f"'{name}' ({target}) has the wrong type ({type(value).__name__})", name)
        found.append((name, target, value))
    if len(found) > 1 or (found and kind == "json_object"):
        names = [name for name, _, _ in found] + (["response_format"] if kind == "json_object" else [])
        raise ApiError(400, f"only one structured-output constraint per request, got {', '.join(names)}", names[-1])
    if not found:
        return ("json_object" if kind == "json_object" else None), None
    name, target, value = found[0]
    try:
        return None, GuidedDecodingParams(**{target: value})
    except SamplingParamsError as exc:
        raise ApiError(400, f"{name}: {str(exc).removeprefix('guided_decoding: ')}", name) from None


def _sampling_params(body: _Body, max_tokens_default: int | None, logprobs: int | None, vocab_size: int
                     ) -> tuple[SamplingParams, int]:
    meta = body.obj("metadata") or {}
    # FastDeploy reads min_tokens etc. from metadata too; a top-level field wins.
    pick = lambda name: body.get(name) if body.get(name) is not None else meta.get(name)  # noqa: E731
    max_tokens = body.integer("max_tokens", 1, None)
    if max_tokens is None:
        max_tokens = body.integer("max_completion_tokens", 1, None)
    n = body.integer("n", 1, 64) or 1
    stop = body.strings("stop")
    json_mode, guided = _structured_output(body)
    if stop is not None and (len(stop) > 16 or not all(stop)):
        raise ApiError(400, "'stop' must be at most 16 non-empty strings", "stop")
    kwargs: dict[str, Any] = dict(
        n=n, best_of=body.integer("best_of", 1, 64),
        presence_penalty=body.number("presence_penalty", -2.0, 2.0),
        frequency_penalty=body.number("frequency_penalty", -2.0, 2.0),
        repetition_penalty=body.number("repetition_penalty", 1e-6, 10.0),
        temperature=body.number("temperature", 0.0, 2.0), top_p=body.number("top_p", 1e-9, 1.0),
        top_k=body.integer("top_k", -1, None), min_p=body.number("min_p", 0.0, 1.0),
        seed=body.integer("seed", 0, 2**63 - 1), stop=stop, stop_token_ids=body.int_list("stop_token_ids"),
        bad_words=body.strings("bad_words"), logit_bias=_logit_bias(body, vocab_size),
        response_format=json_mode, guided_decoding=guided,
        max_tokens=max_tokens if max_tokens is not None else max_tokens_default,
        min_tokens=body.integer("min_tokens", 0, None, pick("min_tokens")) or 0,
        logprobs=logprobs, ignore_eos=body.boolean("ignore_eos"),
        skip_special_tokens=body.boolean("skip_special_tokens"),
        include_stop_str_in_output=body.boolean("include_stop_str_in_output"),
        reasoning_max_tokens=body.integer("reasoning_max_tokens", 1, None, pick("reasoning_max_tokens")),
    )
    try:
        params = SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    except SamplingParamsError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    return params, _beam_width(body, params)


def _beam_width(body: _Body, params: SamplingParams) -> int:
    """Beam width as seed 002 defines it: num_beams, else best_of, else n; 0 when not searching."""
    num_beams = body.integer("num_beams", 1, MAX_BEAMS)
    use = bool(body.boolean("use_beam_search")) or (num_beams or 1) > 1
    if not use:
        if params.best_of is not None and params.best_of > params.n:
            raise ApiError(400, "best_of > n is only supported with beam search (use_beam_search: true)", "best_of")
        return 0
    if params.response_format is not None or params.guided_decoding is not None:
        field_ = next((name for name in (*_GUIDED_FIELDS, "structured_outputs") if body.get(name) not in (None, False)),
                      "response_format")
        raise ApiError(400, f"'{field_}' (structured output) is not supported with beam search", field_)
    width = num_beams if num_beams and num_beams > 1 else (params.best_of or params.n)
    if width > MAX_BEAMS or width < params.n:
        raise ApiError(400, f"beam width must be in [n, {MAX_BEAMS}], got {width}",
                       "num_beams" if num_beams else "best_of")
    return width


def _stream_options(body: _Body, stream: bool) -> tuple[bool, bool]:
    opts = body.obj("stream_options")
    if opts is None:
        return False, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    inner = _Body(opts)
    return bool(inner.boolean("include_usage")), bool(inner.boolean("continuous_usage_stats"))


def _turn_options(body: _Body) -> tuple[bool, bool]:
    """vLLM's add_generation_prompt (default on) and continue_final_message (default off; it turns
    the default of the other off, since the two cannot both hold)."""
    continue_final = bool(body.boolean("continue_final_message"))
    add_generation = body.boolean("add_generation_prompt")
    if add_generation is None:
        add_generation = not continue_final
    if add_generation and continue_final:
        raise ApiError(400, "'continue_final_message' cannot be combined with 'add_generation_prompt': true",
                       "continue_final_message")
    return add_generation, continue_final


def parse_chat(data: Any, ctx: ModelContext) -> ParsedRequest:
    body = _Body(data)
    model = check_model(body, ctx)
    messages = parse_messages(body.get("messages"))
    logprobs = bool(body.boolean("logprobs"))
    top = body.integer("top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' requires 'logprobs': true", "top_logprobs")
    params, beam_width = _sampling_params(body, None, (top or 0) if logprobs else None, ctx.vocab_size)
    stream = bool(body.boolean("stream"))
    include_usage, continuous = _stream_options(body, stream)
    meta = body.obj("metadata") or {}
    kwargs = body.obj("chat_template_kwargs")
    thinking = body.get("enable_thinking")
    if thinking is None:
        thinking = meta.get("enable_thinking", (kwargs or {}).get("enable_thinking"))
    if thinking is not None and not isinstance(thinking, bool):
        raise ApiError(400, "'enable_thinking' must be true or false", "enable_thinking")
    add_generation, continue_final = _turn_options(body)
    return ParsedRequest(kind="chat", model=model, params=params, messages=messages, stream=stream,
                         add_generation_prompt=add_generation, continue_final_message=continue_final,
                         include_usage=include_usage, continuous_usage=continuous,
                         return_token_ids=bool(body.boolean("return_token_ids")), chat_template_kwargs=kwargs,
                         enable_thinking=thinking, logprobs=logprobs, beam_width=beam_width,
                         request_id=client_request_id(body))


def parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object", "messages")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ApiError(400, f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", "messages")
        content = msg.get("content")
        if isinstance(content, list):
            content = _text_parts(content, where)
        elif content is None:
            if role != "assistant":
                raise ApiError(400, f"{where}.content is required for role {role!r}", "messages")
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", "messages")
        out.append({**msg, "content": content})
    return out


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"{where}.content: only text parts are supported by this text-only model, "
                                f"got {kind!r}", "messages")
        texts.append(part["text"])
    return "".join(texts)


def parse_completion(data: Any, ctx: ModelContext) -> ParsedRequest:
    body = _Body(data)
    model = check_model(body, ctx)
    prompts = _prompts(body.get("prompt"), ctx.vocab_size)
    logprobs = body.integer("logprobs", 0, 20)
    echo = bool(body.boolean("echo"))
    # echo with max_tokens 0 scores a text without continuing it: the prompt's last row yields one
    # token anyway, which is generated and left out of the response.
    score_only = echo and body.integer("max_tokens", 0, None) == 0
    if score_only:
        body = _Body({**body.data, "max_tokens": 1})
    params, beam_width = _sampling_params(body, 16, logprobs, ctx.vocab_size)
    if echo and logprobs is not None:
        if beam_width:
            raise ApiError(400, "'echo' with 'logprobs' is not supported with beam search", "echo")
        params = params.clone(prompt_logprobs=logprobs)  # OpenAI: logprobs of the echoed prompt too
    stream = bool(body.boolean("stream"))
    include_usage, continuous = _stream_options(body, stream)
    return ParsedRequest(kind="completion", model=model, params=params, prompts=prompts, stream=stream,
                         include_usage=include_usage, continuous_usage=continuous,
                         return_token_ids=bool(body.boolean("return_token_ids")), logprobs=logprobs is not None,
                         echo=echo, score_only=score_only, beam_width=beam_width,
                         request_id=client_request_id(body))


def _prompts(value: Any, vocab_size: int) -> list[str | list[int]]:
    def ids_ok(ids: list[Any]) -> bool:
        return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t and (not vocab_size or t < vocab_size)
                   for t in ids)

    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        prompts = value
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "token id lists", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
    for p in prompts:
        if not p:
            raise ApiError(400, "'prompt' must not be empty", "prompt")
        if isinstance(p, list) and not ids_ok(p):
            raise ApiError(400, f"'prompt' token ids must be integers in [0, {vocab_size or 'vocab size'})", "prompt")
    return prompts


@dataclass
class TokenizeRequest:
    """POST /tokenize (vLLM's): a completion prompt or chat messages."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


def parse_tokenize(data: Any, ctx: ModelContext) -> TokenizeRequest:
    body = _Body(data)
    check_model(body, ctx)
    chat = body.get("messages") is not None
    if not chat and not isinstance(body.get("prompt"), str):
        raise ApiError(400, "give 'prompt' (a string) or 'messages'", "prompt")
    add_special = body.boolean("add_special_tokens")
    add_generation, continue_final = _turn_options(body)
    return TokenizeRequest(
        prompt=None if chat else body.get("prompt"), messages=parse_messages(body.get("messages")) if chat else None,
        # As the generation endpoints encode: completions add special tokens, chat templates write their own.
        add_special_tokens=(not chat) if add_special is None else add_special,
        add_generation_prompt=add_generation, continue_final_message=continue_final,
        chat_template_kwargs=body.obj("chat_template_kwargs"),
        return_token_strs=bool(body.boolean("return_token_strs")))


def parse_detokenize(data: Any, ctx: ModelContext) -> list[int]:
    """POST /detokenize's token ids, each in the vocabulary."""
    body = _Body(data)
    check_model(body, ctx)
    tokens = body.int_list("tokens")
    if tokens is None:
        raise ApiError(400, "'tokens' (a list of token ids) is required", "tokens")
    if any(not 0 <= t < (ctx.vocab_size or 2**31) for t in tokens):
        raise ApiError(400, f"'tokens' must be token ids in [0, {ctx.vocab_size or 'vocab size'})", "tokens")
    return tokens
