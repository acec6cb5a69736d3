"""scripts/bench_serving.py: its metric arithmetic on synthetic timestamps, its SSE parsing and
datasets, and two tiny real runs against a real server (JSON report keys, token counts vs usage)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_serving as bs  # noqa: E402

SERVER_ARGS = ["--workers", "1"]


def result(start: float, chunks: list[float], end: float, usage: int | None, prompt: int | None = 10) -> bs.RequestResult:
    return bs.RequestResult(ok=True, start=start, end=end, chunk_times=chunks, completion_tokens=usage,
                            prompt_tokens=prompt if usage is not None else None)


def test_percentile_interpolates_like_numpy() -> None:
    assert bs.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bs.percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert bs.percentile([7.0], 99) == 7.0
    assert math.isnan(bs.percentile([], 50))


def test_metrics_from_synthetic_timestamps() -> None:
    results = [
        result(0.0, [0.1, 0.2, 0.3, 0.4], 0.5, usage=4),  # TTFT 100 ms, TPOT (0.5-0.1)/3
        result(1.0, [1.3, 1.5, 1.7, 1.9], 2.0, usage=4),  # TTFT 300 ms, TPOT (2.0-1.3)/3
        bs.RequestResult(ok=False, start=0.0, end=0.2, error="HTTP 500: boom"),
    ]
    m = bs.compute_metrics(results, duration=2.0, expected_output=4)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, ["HTTP 500: boom"])
    assert m["total_output_tokens"] == 8 and m["total_input_tokens"] == 20
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(14.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p99"] == pytest.approx(100.0 + 200.0 * 0.99)
    assert m["tpot_ms"]["mean"] == pytest.approx((400 / 3 + 700 / 3) / 2)
    # ITL pools the gaps: three of 100 ms and three of 200 ms.
    assert m["itl_ms"]["mean"] == pytest.approx(150.0)
    assert m["itl_ms"]["median"] == pytest.approx(150.0)
    assert m["e2el_ms"]["mean"] == pytest.approx(750.0)
    tc = m["token_check"]
    assert tc["token_count_source"] == "usage"
    assert (tc["usage_mismatches"], tc["chunk_mismatches"], tc["requests_without_usage"]) == (0, 0, 0)


def test_token_check_falls_back_to_chunks_and_flags_mismatches() -> None:
    results = [result(0.0, [0.1, 0.2, 0.3], 0.4, usage=None),  # no usage: 3 chunks counted
               result(0.0, [0.1, 0.2], 0.3, usage=4)]          # usage 4, but 2 chunks (merged text)
    m = bs.compute_metrics(results, duration=1.0, expected_output=4)
    tc = m["token_check"]
    assert tc["token_count_source"] == "usage+chunks" and tc["requests_without_usage"] == 1
    assert (tc["usage_mismatches"], tc["chunk_mismatches"], tc["output_token_mismatches"]) == (0, 2, 1)
    assert m["total_output_tokens"] == 7 and m["total_input_tokens"] is None
    assert m["total_token_throughput"] is None
    only_chunks = bs.compute_metrics(results[:1], 1.0, 3)["token_check"]
    assert only_chunks["token_count_source"] == "chunks" and only_chunks["output_token_mismatches"] == 0
    empty = bs.compute_metrics([bs.RequestResult(ok=False, start=0, end=1, error="x")], 1.0, 3)
    assert empty["ttft_ms"]["mean"] is None and empty["completed"] == 0
    assert "Failed requests:" in bs.format_report(empty, "t")


def test_sse_events() -> None:
    r = bs.RequestResult(ok=True, start=0.0, end=0.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert not bs.handle_event(json.dumps(role), r, 0.1) and r.chunk_times == []
    assert not bs.handle_event(json.dumps({"choices": [{"delta": {"content": "Hi"}}]}), r, 0.2)
    assert not bs.handle_event(json.dumps({"choices": [{"text": " there", "index": 0}]}), r, 0.3)
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    assert not bs.handle_event(json.dumps(usage), r, 0.4)
    assert bs.handle_event("[DONE]", r, 0.5)
    assert (r.chunk_times, r.completion_tokens, r.prompt_tokens, r.ok) == ([0.2, 0.3], 2, 5, True)
    assert bs.handle_event(json.dumps({"error": {"message": "engine died"}}), r, 0.6)
    assert (r.ok, r.error) == (False, "engine died")


def test_datasets_fit_the_requested_length() -> None:
    words = bs.load_counter(None)
    chat = bs.chat_dataset(20, 60, "chat", words, seed=1)
    assert len(chat) == 20 and all(58 <= words(p) <= 60 for p in chat)
    assert chat[0][0]["content"].startswith(bs.chat_prompts(1)[0][0]["content"])
    assert len({p[0]["content"] for p in chat}) == 20
    assert bs.chat_dataset(2, 0, "completions", words, seed=1) == [c[0]["content"] for c in bs.chat_prompts(2)]
    rnd = bs.random_prompts(3, 32, "completions", words, seed=0)
    assert all(isinstance(p, str) and words(p) == 32 for p in rnd) and len(set(rnd)) == 3
    assert list(bs.arrival_delays(3, math.inf, 0)) == [0.0, 0.0, 0.0]
    assert all(d > 0 for d in bs.arrival_delays(5, 2.0, 0))


def run_cli(server, tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_serving.py"), "--base-url",
                           server.url + "/v1", "--json-out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Output token throughput (tok/s):" in proc.stdout
    return json.loads(out.read_text())


def test_real_run_chat_counts_match_usage(server, tmp_path, default_model_path) -> None:
    report = run_cli(server, tmp_path, "chat", "--dataset", "chat", "--endpoint", "chat", "--num-prompts", "2",
                     "--output-len", "8", "--max-concurrency", "2",
                     "--input-len", "64", "--tokenizer", default_model_path, "--model", "smollm2-135m-instruct")
    m = report["metrics"]
    assert set(m) >= {"duration_s", "completed", "failed", "total_input_tokens", "total_output_tokens",
                      "request_throughput", "output_throughput", "total_token_throughput",
                      "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "token_check"}
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(m[key]) == {"mean", "median", "p99"} and m[key]["median"] > 0
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (2, 0, 16)
    assert 2 * 56 <= m["total_input_tokens"] <= 2 * 64  # padded with the server's own tokenizer
    tc = m["token_check"]
    assert tc["token_count_source"] == "usage" and tc["usage_mismatches"] == 0 and tc["requests_without_usage"] == 0
    assert report["config"]["output_len"] == 8 and report["config"]["max_concurrency"] == 2


def test_real_run_completions_poisson(server, tmp_path) -> None:
    report = run_cli(server, tmp_path, "completions", "--dataset", "random", "--endpoint", "completions",
                     "--num-prompts", "2", "--input-len", "16", "--output-len", "4", "--request-rate", "50")
    m = report["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (2, 0, 8)
    assert m["token_check"]["usage_mismatches"] == 0 and report["config"]["request_rate"] == 50.0


def test_compare_ratios_and_doc_section(tmp_path) -> None:
    import bench_compare as bc

    def run(out_tok_s: float, ttft: float, tpot: float) -> dict:
        m = bs.compute_metrics([result(0.0, [0.1, 0.2], 0.3, usage=2)], 1.0, 2)
        m.update(output_throughput=out_tok_s)
        m["ttft_ms"]["median"], m["tpot_ms"]["median"] = ttft, tpot
        return m

    results = {"fastdeploy": {"argv": ["python"], "runs": {"1": run(100.0, 50.0, 10.0)}},
               "llama-server": {"argv": ["llama-server"], "runs": {"1": run(50.0, 100.0, 5.0)}}}
    rows = bc.ratio_rows(results)
    assert rows == [{"peer": "llama-server", "concurrency": 1, "out_tok_s": 2.0, "ttft_p50": 0.5, "tpot_p50": 2.0}]
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n## Other\n\nkeep\n\n## Serving vs llama.cpp (issue 6)\n\nold text\n\n## Later\n\nkeep too\n")
    bc.replace_section(doc, "## Serving vs llama.cpp (issue 6)\n\nnew figures\n")
    assert doc.read_text() == ("# B\n\n## Other\n\nkeep\n\n## Serving vs llama.cpp (issue 6)\n\nnew figures\n"
                               "\n## Later\n\nkeep too\n")
