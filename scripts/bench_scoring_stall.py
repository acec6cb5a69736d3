"""How long other streams wait while a long prompt is scored (SamplingParams(prompt_logprobs=k)).

    .venv/bin/python scripts/bench_scoring_stall.py [--streams 8] [--prompt-len 1800] [--rounds 2]

--streams greedy requests decode; once they run, one request asks for the logprobs of a
--prompt-len-token prompt. Every engine step is timed; the longest step is the longest gap
between two tokens of the decoding streams. Runs alternate between the scheduler's default
cap on prompt tokens scored per step (SchedulerConfig.max_prompt_scoring_tokens) and no cap
(the whole step budget), in the same process, and print each run's longest step and total time.
"""
from __future__ import annotations

import argparse
import time

from fastdeploy import LLM, SamplingParams
from fastdeploy.config import SchedulerConfig
from fastdeploy.engine.protocol import EngineRequest


def run(llm: LLM, cap: int, streams: int, prompt_len: int, tag: str) -> tuple[float, float]:
    engine = llm.engine
    engine.scheduler.config.max_prompt_scoring_tokens = cap
    short = llm.tokenizer.encode("Tell me a story about a cat.")
    long_ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (prompt_len // 8))[:prompt_len]
    decode = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    for i in range(streams):
        engine.add_request(EngineRequest(request_id=f"{tag}-d{i}", prompt_token_ids=short, sampling_params=decode))
    for _ in range(4):  # the streams are decoding
        engine.step()
    engine.add_request(EngineRequest(request_id=f"{tag}-score", prompt_token_ids=long_ids,
                                     sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=1)))
    longest, start = 0.0, time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        longest = max(longest, time.perf_counter() - t)
    return longest, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1800)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(model="smollm2-135m-instruct", max_model_len=2048)
    budget = llm.engine.scheduler.config.max_num_batched_tokens
    settings = [("uncapped", budget), ("capped", SchedulerConfig.max_prompt_scoring_tokens)]
    for r in range(args.rounds):
        for name, cap in settings:
            longest, total = run(llm, cap, args.streams, args.prompt_len, f"{name}{r}")
            print(f"round {r} {name:9s} (cap {cap:4d}): longest step {longest * 1e3:6.0f} ms, all steps {total:5.2f} s")


if __name__ == "__main__":
    main()
