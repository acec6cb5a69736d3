"""EngineMetrics: request/token counters, latency histograms and cache gauges for one engine."""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fastdeploy.engine.protocol import EngineStats, StepOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


@dataclass
class _Timing:
    arrival: float
    first_token: float = 0.0
    num_output: int = 0


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("fastdeploy:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("fastdeploy:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("fastdeploy:gpu_cache_usage_perc", "KV cache usage (0..1) on any device", registry=r)
        self.num_blocks = Gauge("fastdeploy:available_gpu_block_num", "KV blocks in the pool", registry=r)
        self.free_blocks = Gauge("fastdeploy:free_gpu_block_num", "Free KV blocks", registry=r)
        self.hit_token_rate = Gauge("fastdeploy:hit_token_rate", "Prefix cache token hit rate", registry=r)
        self.gpu_hit_token_rate = Gauge("fastdeploy:gpu_hit_token_rate", "Prefix cache token hit rate (device)",
                                        registry=r)
        self.hit_req_rate = Gauge("fastdeploy:hit_req_rate", "Share of requests with a prefix cache hit", registry=r)
        self.ttft = Histogram("fastdeploy:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("fastdeploy:time_per_output_token_seconds", "Time per output token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("fastdeploy:e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.req_prompt = Histogram("fastdeploy:request_prompt_tokens", "Prompt tokens per request", registry=r,
                                    buckets=_TOKEN_BUCKETS)
        self.req_generation = Histogram("fastdeploy:request_generation_tokens", "Generated tokens per request",
                                        registry=r, buckets=_TOKEN_BUCKETS)
        self.prompt_tokens = Counter("fastdeploy:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("fastdeploy:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("fastdeploy:request_success", "Requests finished by stop or length", registry=r)
        self.preemptions = Gauge("fastdeploy:num_preemptions", "Preemptions since start", registry=r)
        self._timings: dict[str, _Timing] = {}
        self._requests_seen = 0
        self._requests_hit = 0

    def on_request(self, request_id: str, arrival_time: float) -> None:
        self._timings[request_id] = _Timing(arrival=arrival_time or time.time())

    def on_step(self, out: StepOutput) -> None:
        now = out.step_time or time.time()
        generated = 0
        for i, rid in enumerate(out.request_ids):
            new = len(out.new_token_ids[i])
            generated += new
            t = self._timings.get(rid)
            if t is None:
                continue
            if new and not t.first_token:
                t.first_token = now
                self.ttft.observe(max(0.0, now - t.arrival))
            t.num_output += new
            reason = out.finish_reasons[i]
            if reason is not None:
                self._finish(rid, t, reason, out.num_prompt_tokens[i], out.num_cached_tokens[i], now)
        if generated:
            self.generation_tokens.inc(generated)

    def _finish(self, rid: str, t: _Timing, reason: str, num_prompt: int, num_cached: int, now: float) -> None:
        del self._timings[rid]
        self.e2e.observe(max(0.0, now - t.arrival))
        self.req_prompt.observe(num_prompt)
        self.req_generation.observe(t.num_output)
        self.prompt_tokens.inc(num_prompt)
        if t.num_output > 1 and t.first_token:
            self.tpot.observe(max(0.0, (now - t.first_token) / (t.num_output - 1)))
        if reason in ("stop", "length"):
            self.success.inc()
        self._requests_seen += 1
        self._requests_hit += num_cached > 0
        self.hit_req_rate.set(self._requests_hit / self._requests_seen)

    def on_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.num_blocks.set(stats.num_blocks)
        self.free_blocks.set(stats.num_free_blocks)
        self.preemptions.set(stats.num_preemptions)
        # prefix_cache_queries/hits count prompt tokens looked up / found in the cache.
        rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        self.hit_token_rate.set(rate)
        self.gpu_hit_token_rate.set(rate)

    def render(self) -> bytes:
        return generate_latest(self.registry)
