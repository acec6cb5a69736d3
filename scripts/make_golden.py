#!/usr/bin/env python3
"""Produce the golden reference data that fastdeploy's model is tested against (dev-only).

The reference comes from Hugging Face transformers + torch on the CPU, in fp32, loaded from the very
same GGUF file fastdeploy serves by default (SmolLM2-135M-Instruct, Q4_1; transformers dequantizes
every tensor to fp32). For each of a set of varied chat conversations it records the rendered chat
prompt, its token ids, the first-step logits (top-20 ids with their values), a greedy continuation
of up to ``--new-tokens`` tokens and, for every generated step, the gap between the two largest
logits, so a test can tell a real mismatch from a near-tie that fp32 rounding may flip.

Tokenization (a deliberate choice, read this before regenerating):
    The GGUF stores ``tokenizer.ggml.model = "gpt2"`` and ``tokenizer.ggml.pre = "smollm"``.
    transformers' GGUF converter has no entry for ``"smollm"`` in its pre-tokenizer table, so it
    keeps GPT2Tokenizer's default pre-tokenizer: a bare ``ByteLevel(add_prefix_space=False,
    use_regex=True)``. The real SmolLM2 ``tokenizer.json`` (and llama.cpp's ``smollm`` pre-type,
    which isolates every ``\\p{N}`` before applying the GPT-2 regex) runs
    ``Digits(individual_digits=True)`` first. "12345" alone still comes out as five single-digit
    tokens either way, because the vocabulary has no merge that involves a digit; but the digit
    split also cuts the whitespace run in front of a digit into its own pre-token, and there the
    two disagree: "  1" is ``Ġ Ġ 1`` with the stock GGUF tokenizer but ``ĠĠ 1`` with the real one,
    "\\n\\n1" is ``Ċ Ċ 1`` versus ``ĊĊ 1``, "\\t\\t42" is ``ĉ ĉ 4 2`` versus ``ĉĉ 4 2``. So this script
    replaces the backend pre-tokenizer with
    ``Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)])``
    -- exactly the real SmolLM2 one -- and the recorded ``prompt_ids`` are the true SmolLM2
    tokenization. Each case also records ``stock_prompt_ids_differ``: whether transformers' unpatched
    GGUF tokenizer would have produced other ids for that prompt.

Prompts are rendered with the chat template stored in the GGUF
(``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``) and encoded with
``add_special_tokens=False`` (the template already writes ``<|im_start|>``; the file says
``add_bos_token = False``).

Generation is a plain greedy loop over the raw logits (argmax, no logits processors) with the KV
cache, ``torch.manual_seed(0)`` and ``torch.set_num_threads(2)``. It stops after ``--new-tokens``
tokens or right after the model emits EOS (id 2, ``<|im_end|>``); a produced EOS is kept in
``output_ids``. ``output_text`` is the byte-level decode of ``output_ids`` without that final EOS.
Logit values are rounded to 5 decimals.

Needs the dev-only venv ``.venv-ref`` (torch, transformers, gguf, tokenizers); never run it with the
project's own ``.venv``. Hugging Face Hub access is switched off: the model is read from the local
GGUF file only. Typical use, from the repository root::

    .venv-ref/bin/python scripts/make_golden.py --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
EOS_ID = 2
TOP_K = 20
ROUND = 5

Message = dict[str, str]


def _default_path_function() -> Optional[Callable[[], str]]:
    """fastdeploy's ``default_model_path`` if it can be imported here, else None.

    The package ``__init__`` imports msgspec, which the reference venv may lack; ``model_store``
    itself only needs the standard library, so fall back to loading that one file directly.
    """
    try:
        from fastdeploy.model_store import default_model_path

        return default_model_path
    except Exception:
        pass
    source = REPO_ROOT / "fastdeploy" / "model_store.py"
    try:
        spec = importlib.util.spec_from_file_location("_fd_model_store", source)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.default_model_path
    except Exception:
        return None


def _long_passage() -> str:
    """A deterministic ~750-word passage (a made-up town chronicle) for the summarization case."""
    towns = ["Alderbrook", "Westmere", "Kestrel Point", "Oakhaven"]
    trades = ["wool", "timber", "salt", "copper", "barley", "glass"]
    people = ["Maria Voss", "Tomas Reed", "Elena Park", "Jonah Hale", "Priya Nair", "Oskar Lind"]
    paragraphs = []
    for i in range(8):
        year = 1820 + 7 * i
        town = towns[i % len(towns)]
        trade = trades[i % len(trades)]
        person = people[(3 * i) % len(people)]
        other = towns[(i + 1) % len(towns)]
        paragraphs.append(
            f"In {year}, the town of {town} depended mostly on the {trade} trade. "
            f"That year {person} became head of the merchants' guild and argued that the road to "
            f"{other} should be widened before winter. The council debated the plan for {3 + i % 4} "
            f"weeks; some members feared the cost, which was estimated at {120 + 15 * i} silver crowns, "
            f"while others pointed out that carts were losing whole days in the mud each spring. "
            f"In the end the work was approved, and by autumn the new road carried about "
            f"{40 + 5 * i} wagons a week, which changed daily life in both towns."
        )
    return "\n\n".join(paragraphs)


def build_cases() -> list[dict[str, Any]]:
    """The conversations the reference covers, each a name plus OpenAI-style messages."""

    def user(text: str) -> list[Message]:
        return [{"role": "user", "content": text}]

    return [
        {"name": "plain_english", "messages": user("Why is the sky blue? Answer in two sentences.")},
        {"name": "python_code", "messages": user(
            "Write a Python function that checks whether a string is a palindrome.")},
        {"name": "chinese", "messages": user("请用一句话介绍一下长城。")},
        {"name": "emoji", "messages": user(
            "Describe a perfect beach day with emoji 🏖️☀️🍦 and one short sentence. 😀👍")},
        {"name": "system_prompt", "messages": [
            {"role": "system", "content": "You are a pirate. Always answer like a pirate, in one sentence."},
            {"role": "user", "content": "How do I boil an egg?"},
        ]},
        {"name": "multi_turn", "messages": [
            {"role": "user", "content": "My name is Alice and I like cats."},
            {"role": "assistant", "content": "Nice to meet you, Alice! Cats are wonderful companions."},
            {"role": "user", "content": "What is my name, and which animal do I like?"},
        ]},
        {"name": "long_summary", "messages": user(
            "Summarize the following chronicle in three sentences.\n\n" + _long_passage())},
        {"name": "numbers", "messages": user("What is 12345 + 67890?")},
        {"name": "whitespace_punct", "messages": user(
            "Clean up this list:\n\n1.\tapples   (x  3)\n2.\t\tbananas!!\n\n\n  3.  cherries ...   \n"
            "\t- total:\t\t42 items;  price:  $7.50\n\nReturn it as a tidy bulleted list.")},
        {"name": "accented", "messages": user(
            "Traduis en anglais : « L'été dernier, nous sommes allés à Zürich et à São Paulo ; "
            "c'était très agréable. » Danke schön, señor Muñoz — Øresund, Łódź, Ærøskøbing.")},
        {"name": "very_short", "messages": user("Hi")},
        {"name": "math_reasoning", "messages": user(
            "A train travels at 60 miles per hour for 2.5 hours, then at 40 miles per hour for "
            "1.5 hours. How far does it travel in total? Think step by step.")},
        {"name": "code_explain", "messages": user(
            "Explain what this code does:\n```python\ndef f(xs):\n    return [x * x for x in xs if x % 2 == 0]\n```")},
        {"name": "json_request", "messages": user(
            'Give me a JSON object with the keys "name" and "age" for a 30-year-old named Bob.')},
    ]


def smollm2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of the real SmolLM2 tokenizer.json: isolate digits, then byte-level GPT-2 regex."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def show_tokenization(stock: Tokenizer, fixed: Tokenizer) -> None:
    """Print how tricky strings tokenize with transformers' stock GGUF tokenizer and with ours."""
    samples = ["12345", "What is 12345 + 67890?", "  1", "\n\n1", "x\n\n 2", "Total:\t\t42",
               "3.14159", "abc123def", "café naïve", "你好", "😀👍", "    return 0"]
    print("tokenization check (stock transformers GGUF tokenizer | SmolLM2 pre-tokenizer):")
    for text in samples:
        a = stock.encode(text, add_special_tokens=False)
        b = fixed.encode(text, add_special_tokens=False)
        mark = "same" if a.ids == b.ids else "DIFF"
        print(f"  {mark} {text!r}: {a.tokens} | {b.tokens}")


def topk_pairs(logits: torch.Tensor, k: int) -> list[list[float]]:
    """[[id, value], ...] for the k largest logits, largest first."""
    values, ids = torch.topk(logits, k)
    return [[int(i), round(float(v), ROUND)] for i, v in zip(ids.tolist(), values.tolist())]


def top2_gap(logits: torch.Tensor) -> float:
    """Largest logit minus the second largest."""
    values = torch.topk(logits, 2).values
    return round(float(values[0] - values[1]), ROUND)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int
           ) -> tuple[list[int], bool, torch.Tensor, list[float]]:
    """Greedy decode on raw logits; returns (output ids, stopped at EOS, first-step logits, step gaps)."""
    out = model(torch.tensor([prompt_ids], dtype=torch.long), use_cache=True)
    logits = out.logits[0, -1].float()
    first = logits.clone()
    past = out.past_key_values
    output_ids: list[int] = []
    gaps: list[float] = []
    while True:
        token = int(torch.argmax(logits))
        output_ids.append(token)
        gaps.append(top2_gap(logits))
        if token == EOS_ID:
            return output_ids, True, first, gaps
        if len(output_ids) >= new_tokens:
            return output_ids, False, first, gaps
        out = model(torch.tensor([[token]], dtype=torch.long), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--gguf`` falls back to fastdeploy's default model when importable."""
    default_fn = _default_path_function()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, required=default_fn is None,
                        help="GGUF model file (default: fastdeploy.model_store.default_model_path())")
    parser.add_argument("--out", type=Path, default=Path("tests/data/golden_smollm2.json"),
                        help="output JSON (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per case (default: 48)")
    args = parser.parse_args(argv)
    if args.gguf is None:
        assert default_fn is not None
        args.gguf = Path(default_fn())
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Generate the reference and write it as JSON."""
    args = parse_args(argv)
    started = time.monotonic()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    gguf: Path = args.gguf.resolve()
    digest = sha256_of(gguf)
    print(f"model {gguf} sha256 {digest}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    stock = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    print(f"transformers' GGUF pre-tokenizer: {json.loads(stock.to_str())['pre_tokenizer']}")
    tok.backend_tokenizer.pre_tokenizer = smollm2_pre_tokenizer()
    fixed = tok.backend_tokenizer
    show_tokenization(stock, fixed)
    if tok.convert_ids_to_tokens(EOS_ID) != "<|im_end|>":
        raise SystemExit(f"unexpected token {EOS_ID}: {tok.convert_ids_to_tokens(EOS_ID)!r}")

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    print(f"model loaded in {time.monotonic() - started:.1f}s")

    cases_out: list[dict[str, Any]] = []
    for case in build_cases():
        t0 = time.monotonic()
        messages = case["messages"]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if fixed.decode(prompt_ids, skip_special_tokens=False) != prompt:
            raise SystemExit(f"{case['name']}: prompt ids do not decode back to the prompt")
        stock_ids = stock.encode(prompt, add_special_tokens=False).ids
        output_ids, at_eos, first, gaps = greedy(model, prompt_ids, args.new_tokens)
        text_ids = output_ids[:-1] if at_eos else output_ids
        cases_out.append({
            "name": case["name"],
            "messages": messages,
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "stock_prompt_ids_differ": stock_ids != prompt_ids,
            "output_ids": output_ids,
            "output_text": fixed.decode(text_ids, skip_special_tokens=False),
            "stopped_at_eos": at_eos,
            "first_logits_top": topk_pairs(first, TOP_K),
            "first_top2_gap": gaps[0],
            "step_gaps": gaps,
        })
        print(f"  {case['name']:<17} prompt {len(prompt_ids):>5}  out {len(output_ids):>3}  eos {at_eos!s:<5}  "
              f"min gap {min(gaps):.4f}  stock differs {stock_ids != prompt_ids!s:<5}  "
              f"{time.monotonic() - t0:.1f}s  {cases_out[-1]['output_text'][:60]!r}")

    doc = {
        "model": gguf.name,
        "sha256": digest,
        "generator": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "script": "scripts/make_golden.py", "dtype": "float32", "device": "cpu",
                      "threads": 2, "seed": 0},
        "tokenizer": {"gguf_pre": "smollm",
                      "pre_tokenizer": "Sequence([Digits(individual_digits=True), "
                                       "ByteLevel(add_prefix_space=False, use_regex=True)])",
                      "add_special_tokens": False},
        "eos_id": EOS_ID,
        "new_tokens": args.new_tokens,
        "cases": cases_out,
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases_out)} cases) "
          f"in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
