"""Peer for bench_offline.py: HF transformers fp32 on the CPU, same GGUF, same prompts (dev-only).

Runs in the torch venv (.venv-ref). Prints one JSON line: output tokens, seconds, tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench_prompts import chat_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    path = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in chat_prompts(args.num_prompts)]
    produced = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), args.batch_size):
            enc = tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            produced += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    seconds = time.perf_counter() - start
    print(json.dumps({"output_tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}))


if __name__ == "__main__":
    main()
