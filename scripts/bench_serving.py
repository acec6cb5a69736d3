"""Online serving benchmark for any OpenAI-compatible server (streaming, fixed output length).

    .venv/bin/python scripts/bench_serving.py --base-url http://127.0.0.1:8188/v1 --model default \\
        --endpoint chat --dataset chat --input-len 233 --output-len 128 --num-prompts 64 \\
        --max-concurrency 32 [--request-rate 4] [--tokenizer MODEL.gguf] [--json-out FILE]

Every request streams (`stream: true`, `stream_options.include_usage`) and asks for exactly
--output-len tokens (`max_tokens` plus `ignore_eos: true`, which vLLM, FastDeploy and llama.cpp's
server honour). Requests start as a Poisson process of --request-rate per second (default: all at
once) and at most --max-concurrency run at a time (default: no limit).

Reported like `vllm bench serve`: TTFT, TPOT, ITL and E2EL (mean, median, p99, ms), request,
output-token and total-token throughput, failed requests. Definitions:
- TTFT: request start to the first chunk that carries text (a role-only first chunk is not a token).
- ITL: gaps between successive text-carrying chunks, pooled over all requests.
- TPOT: per request (E2EL - TTFT) / (output tokens - 1), then averaged over requests.
Output tokens per request come from the server's final `usage.completion_tokens`; when a server
sends no usage in the stream, text-carrying chunks are counted instead and the report says so.
Each request's token count is checked against --output-len, from usage and from the chunk count.

Datasets: `random` (random common English words, about --input-len tokens, a different prompt per
request) and `chat` (scripts/bench_prompts.py's conversations; with --input-len each user message
is padded with shuffled background sentences to about that many prompt tokens). With --tokenizer
(anything `fastdeploy.input.tokenizer.load_tokenizer` opens, e.g. the served GGUF) lengths are
fitted with the real tokenizer and chat template; otherwise one word is taken as one token.
Prompt-token totals always come from the server's usage when it reports them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prompts import chat_prompts  # noqa: E402

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education foot boy age policy music market sense nation plan college "
    "interest death experience effect class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship town road "
    "arm difference value building action model season society tax director position player record "
    "paper space ground form event official matter center couple site project activity star table need "
    "court oil situation cost industry figure street image phone data picture practice piece land "
    "product doctor wall patient worker news test movie north love support technology step baby "
    "computer type attention film tree source organization hair window evidence population site garden"
).split()

FILLER = [
    "The reader is a curious student who likes short paragraphs.",
    "Please keep the tone friendly and avoid jargon where possible.",
    "Examples from everyday life are welcome in the answer.",
    "The answer may be read aloud, so plain sentences work best.",
    "Assume the reader has no special background in the subject.",
    "If a term is technical, explain it in one simple sentence.",
    "A short summary at the end would help the reader remember.",
    "The reader lives in a small town near the coast.",
    "They asked the same question last week but forgot the answer.",
    "Numbers are fine, but round them so they are easy to remember.",
    "Lists are helpful when there are more than three points.",
    "The reader prefers practical advice over theory.",
    "It is raining outside and the reader has an hour to spare.",
    "They will share the answer with two friends at dinner.",
    "A comparison with something familiar often makes ideas click.",
    "Please do not mention any brand names in the answer.",
    "The reader enjoys history and likes to know where ideas came from.",
    "Mistakes are common here, so point out the usual ones.",
    "Keep each sentence under twenty words if you can.",
    "The reader writes notes by hand and likes clear headings.",
    "They are preparing for a short presentation at work.",
    "Safety matters to them, so mention any risks plainly.",
    "They have a small budget and limited time each day.",
    "A gentle sense of humour is welcome but not required.",
]


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

Prompt = str | list[dict[str, str]]


def load_counter(tokenizer_path: str | None) -> Callable[[Prompt], int]:
    """Prompt-length counter: the real tokenizer (+ chat template) if given, else one word = one token."""
    if not tokenizer_path:
        return lambda p: len((p if isinstance(p, str) else " ".join(m["content"] for m in p)).split())
    from fastdeploy.input.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)

    def count(prompt: Prompt) -> int:
        text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt)
        return len(tok.encode(text, add_special_tokens=True))

    return count


def fit_words(build: Callable[[int], Prompt], count: Callable[[Prompt], int], target: int, most: int) -> Prompt:
    """build(n) with the largest n in [0, most] whose prompt has at most `target` tokens (binary search)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


def random_prompts(num: int, input_len: int, endpoint: str, count: Callable[[Prompt], int],
                   seed: int) -> list[Prompt]:
    out: list[Prompt] = []
    for i in range(num):
        rng = random.Random(seed * 1_000_003 + i)
        words = [rng.choice(WORDS) for _ in range(2 * input_len + 8)]

        def build(n: int, words: list[str] = words) -> Prompt:
            text = " ".join(words[:n])
            return text if endpoint == "completions" else [{"role": "user", "content": text}]

        out.append(fit_words(build, count, input_len, len(words)))
    return out


def chat_dataset(num: int, input_len: int, endpoint: str, count: Callable[[Prompt], int],
                 seed: int) -> list[Prompt]:
    out: list[Prompt] = []
    for i, conv in enumerate(chat_prompts(num)):
        question = conv[0]["content"]
        rng = random.Random(seed * 1_000_003 + i)
        words: list[str] = []
        while len(words) < 2 * input_len + 8:
            words += " ".join(rng.sample(FILLER, len(FILLER))).split()

        def build(n: int, question: str = question, words: list[str] = words) -> Prompt:
            text = question if n == 0 else f"{question}\n\nBackground: {' '.join(words[:n])}"
            return text if endpoint == "completions" else [{"role": "user", "content": text}]

        out.append(fit_words(build, count, input_len, len(words)) if input_len > 0 else build(0))
    return out


def build_payload(prompt: Prompt, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if args.model:
        body["model"] = args.model
    if args.min_tokens:
        body["min_tokens"] = args.output_len
    body["prompt" if args.endpoint == "completions" else "messages"] = prompt
    body.update(args.extra_body or {})
    return body


# ---------------------------------------------------------------------------------------------
# One streamed request
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """What one request measured; times are time.perf_counter() seconds."""

    ok: bool
    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)  # arrivals of text-carrying chunks
    completion_tokens: int | None = None  # the server's usage, if it sent one
    prompt_tokens: int | None = None
    error: str = ""


def chunk_text(choice: dict[str, Any]) -> str:
    """Text a streamed choice carries (chat delta content / reasoning, or completion text)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def handle_event(data: str, result: RequestResult, now: float) -> bool:
    """Apply one SSE `data:` payload to result; True when the stream is finished."""
    if data == "[DONE]":
        return True
    obj = json.loads(data)
    if "error" in obj:
        err = obj["error"]
        result.ok, result.error = False, str(err.get("message", err) if isinstance(err, dict) else err)
        return True
    if any(chunk_text(c) for c in obj.get("choices") or []):
        result.chunk_times.append(now)
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            result.prompt_tokens = int(usage["prompt_tokens"])
    return False


async def send_request(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> RequestResult:
    result = RequestResult(ok=True, start=time.perf_counter(), end=0.0)
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                result.ok, result.error = False, f"HTTP {resp.status}: {(await resp.text())[:300]}"
            else:
                async for raw in resp.content:
                    line = raw.decode("utf-8").strip()
                    if line.startswith("data:") and handle_event(line[5:].strip(), result, time.perf_counter()):
                        break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        result.ok, result.error = False, f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    if result.ok and not result.chunk_times:
        result.ok, result.error = False, "stream ended without any text"
    return result


# ---------------------------------------------------------------------------------------------
# Load generation
# ---------------------------------------------------------------------------------------------


def arrival_delays(num: int, rate: float, seed: int) -> Iterator[float]:
    """Gaps between request starts: 0 for rate=inf, else exponential (a Poisson process)."""
    rng = random.Random(seed)
    for _ in range(num):
        yield 0.0 if math.isinf(rate) else rng.expovariate(rate)


async def run_load(url: str, payloads: list[dict[str, Any]], rate: float, max_concurrency: int | None,
                   seed: int, timeout: float) -> tuple[list[RequestResult], float]:
    """Send every payload; returns the results (in order) and the wall time of the whole run."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # A fresh connection per request, as separate clients would open. Reused keep-alive
    # connections raced llama-server closing them: 2-12 of 64 requests at concurrency 32 failed
    # with "Can not write request body" before it ever read them.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(payload: dict[str, Any]) -> RequestResult:
            if limit is None:
                return await send_request(session, url, payload)
            async with limit:
                return await send_request(session, url, payload)

        start = time.perf_counter()
        tasks = []
        for payload, delay in zip(payloads, arrival_delays(len(payloads), rate, seed)):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(payload)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Metrics (pure functions of the results)
# ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values_s: list[float]) -> dict[str, float | None]:
    """mean / median / p99 of second-valued samples, in milliseconds (None without samples)."""
    if not values_s:
        return {"mean": None, "median": None, "p99": None}
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms), "median": percentile(ms, 50), "p99": percentile(ms, 99)}


def output_tokens(r: RequestResult) -> int:
    return r.completion_tokens if r.completion_tokens is not None else len(r.chunk_times)


def token_check(done: list[RequestResult], expected: int) -> dict[str, Any]:
    """Compare each request's token count to the expected output length (usage and chunk count)."""
    with_usage = [r for r in done if r.completion_tokens is not None]
    return {
        "expected_output_tokens": expected,
        "token_count_source": "usage" if len(with_usage) == len(done) and done else
                              ("chunks" if not with_usage else "usage+chunks"),
        "requests_without_usage": len(done) - len(with_usage),
        "usage_mismatches": sum(1 for r in with_usage if r.completion_tokens != expected),
        "chunk_mismatches": sum(1 for r in done if len(r.chunk_times) != expected),
        "output_token_mismatches": sum(1 for r in done if output_tokens(r) != expected),
    }


def compute_metrics(results: list[RequestResult], duration: float, expected_output: int) -> dict[str, Any]:
    """The vLLM-style report for one run: counts, throughputs and latency summaries (ms)."""
    done = [r for r in results if r.ok]
    ttfts = [r.chunk_times[0] - r.start for r in done]
    e2els = [r.end - r.start for r in done]
    tpots = [(r.end - r.chunk_times[0]) / (output_tokens(r) - 1) for r in done if output_tokens(r) > 1]
    itls = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out_tokens = sum(output_tokens(r) for r in done)
    prompt_known = all(r.prompt_tokens is not None for r in done) and bool(done)
    in_tokens = sum(r.prompt_tokens or 0 for r in done) if prompt_known else None
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "total_token_throughput": (in_tokens + out_tokens) / duration if in_tokens is not None and duration > 0
        else None,
        "ttft_ms": summarize(ttfts), "tpot_ms": summarize(tpots),
        "itl_ms": summarize(itls), "e2el_ms": summarize(e2els),
        "token_check": token_check(done, expected_output),
    }


def format_report(m: dict[str, Any], title: str) -> str:
    """Human-readable table in the layout of `vllm bench serve`."""
    def row(name: str, value: Any) -> str:
        text = "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        return f"{name:<40}{text:>14}"

    lines = [f"{' ' + title + ' ':=^54}", row("Successful requests:", m["completed"]),
             row("Failed requests:", m["failed"]), row("Benchmark duration (s):", m["duration_s"]),
             row("Total input tokens:", m["total_input_tokens"]), row("Total generated tokens:", m["total_output_tokens"]),
             row("Request throughput (req/s):", m["request_throughput"]),
             row("Output token throughput (tok/s):", m["output_throughput"]),
             row("Total token throughput (tok/s):", m["total_token_throughput"])]
    for key, label in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        short = key.split("_")[0].upper()
        lines.append(f"{label:-^54}")
        lines += [row(f"{stat.capitalize()} {short} (ms):", m[key][stat]) for stat in ("mean", "median", "p99")]
    tc = m["token_check"]
    lines.append(f"{'Token counts':-^54}")
    lines += [row("Expected output tokens per request:", tc["expected_output_tokens"]),
              row("Counted from:", tc["token_count_source"]),
              row("Mismatches (usage.completion_tokens):", tc["usage_mismatches"]),
              row("Mismatches (streamed text chunks):", tc["chunk_mismatches"])]
    if tc["requests_without_usage"]:
        lines.append(f"note: {tc['requests_without_usage']} request(s) had no usage in the stream; "
                     "their tokens were counted as text chunks")
    for err in m["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines + ["=" * 54])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8188/v1")
    ap.add_argument("--model", default=None, help="the request's model field (omitted when unset)")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--dataset", choices=["random", "chat"], default="chat")
    ap.add_argument("--input-len", type=int, default=None,
                    help="prompt tokens (random: default 256; chat: pad to this many, default no padding)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default inf)")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--num-warmups", type=int, default=0, help="requests sent (one by one) before measuring")
    ap.add_argument("--tokenizer", default=None, help="model/tokenizer path to fit prompt lengths exactly")
    ap.add_argument("--min-tokens", action="store_true", help="also send min_tokens = --output-len")
    ap.add_argument("--extra-body", type=json.loads, default=None,
                    help="JSON object merged into every request body, e.g. a logit_bias")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, seconds")
    ap.add_argument("--label", default=None, help="title of the printed report")
    ap.add_argument("--json-out", type=Path, default=None)
    return ap.parse_args(argv)


def make_prompts(args: argparse.Namespace, num: int) -> list[Prompt]:
    count = load_counter(args.tokenizer)
    if args.dataset == "random":
        return random_prompts(num, args.input_len or 256, args.endpoint, count, args.seed)
    return chat_dataset(num, args.input_len or 0, args.endpoint, count, args.seed)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    url = args.base_url.rstrip("/") + ("/chat/completions" if args.endpoint == "chat" else "/completions")
    # Warm-up prompts come after the measured ones, so no measured prompt is already cached.
    payloads = [build_payload(p, args) for p in make_prompts(args, args.num_prompts + args.num_warmups)]
    payloads, warmups = payloads[:args.num_prompts], payloads[args.num_prompts:]
    if warmups:
        warm, _ = await run_load(url, warmups, float("inf"), 1, args.seed, args.timeout)
        if not all(r.ok for r in warm):
            raise SystemExit(f"warm-up failed: {[r.error for r in warm if not r.ok]}")
    results, duration = await run_load(url, payloads, args.request_rate, args.max_concurrency, args.seed,
                                       args.timeout)
    metrics = compute_metrics(results, duration, args.output_len)
    config = {k: getattr(args, k) for k in ("base_url", "model", "endpoint", "dataset", "input_len", "output_len",
                                             "num_prompts", "max_concurrency", "num_warmups", "seed", "extra_body")}
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return {"config": config, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(bench(args))
    title = args.label or f"Serving Benchmark ({args.dataset}, c={args.max_concurrency or 'inf'})"
    print(format_report(report["metrics"], title))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
