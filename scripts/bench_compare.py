"""Serving side-by-side (`make bench`): fastdeploy's api_server vs llama.cpp on the same GGUF.

    .venv/bin/python scripts/bench_compare.py [--concurrency 1,8,32] [--num-prompts 8,16,64]
        [--input-len 233] [--output-len 128] [--engines fastdeploy,llama-server,llama-cpp-python]
        [--bench-python .venv-bench/bin/python] [--llama-server PATH] [--no-write]

One server at a time, each on a free port of 127.0.0.1: start it, poll its readiness URL (with a
timeout, failing early if it exits), run scripts/bench_serving.py once per concurrency (chat
dataset padded to --input-len prompt tokens, exactly --output-len output tokens, one warm-up
request first), stop it, next engine. Peers:
- `llama-server` (llama.cpp), from PATH or next to --bench-python (`make bench-venv` builds it):
  `-np <max concurrency> -c <slots x (input+output, rounded up)> -t 2 -tb 2`, continuous batching.
- llama-cpp-python's server from .venv-bench: `--n_threads 2 --n_threads_batch 2
  --interrupt_requests False`. It serves one request at a time (the others wait), has no
  `ignore_eos` and sends no usage while streaming, so EOS is banned through `logit_bias` and its
  tokens are counted as streamed chunks. It has no /health; readiness is polled on /v1/models.
Our engine uses every core it may (2 here), the same as `-t 2`.

Prints ratios us/peer per concurrency (output tok/s: higher is better for us; TTFT and TPOT
medians: lower is better for us), replaces the "## Serving vs llama.cpp (issue 6)" section of
docs/benchmarks.md and draws docs/bench_serving.png (skip both with --no-write).
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_SERVING = ROOT / "scripts" / "bench_serving.py"
SECTION = "## Serving vs llama.cpp (issue 6)"
SERVED_NAME = "bench"
ENGINES = ("fastdeploy", "llama-server", "llama-cpp-python")
LABELS = {"fastdeploy": "fastdeploy", "llama-server": "llama.cpp llama-server",
          "llama-cpp-python": "llama-cpp-python server"}


@dataclass
class EngineSpec:
    """How to start one engine and tell that it is ready."""

    name: str
    argv: list[str]
    ready_path: str
    ban_eos: bool = False  # no ignore_eos on this server: ban EOS through logit_bias instead


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slot_ctx(args: argparse.Namespace) -> int:
    """Context per llama.cpp slot: prompt + output + chat-template slack, rounded up to 256."""
    need = args.input_len + args.output_len + 64
    return (need + 255) // 256 * 256


def find_llama_server(args: argparse.Namespace) -> str | None:
    if args.llama_server:
        return args.llama_server
    beside = Path(args.bench_python).parent / "llama-server"
    return shutil.which("llama-server") or (str(beside) if beside.exists() else None)


@functools.lru_cache(maxsize=None)
def eos_bias(model: str) -> dict[str, float]:
    """logit_bias keys banning the end-of-generation tokens of the model (for servers without ignore_eos)."""
    from fastdeploy.input.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    ids = {tok.eos_token_id} | {tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")}
    return {str(i): -1e9 for i in sorted(i for i in ids if i is not None)}


def engine_specs(args: argparse.Namespace, port: int) -> dict[str, EngineSpec | str]:
    """Every engine's spec, or why it is unavailable."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    slots = max(args.concurrency)
    out: dict[str, EngineSpec | str] = {
        "fastdeploy": EngineSpec("fastdeploy", [sys.executable, "-m", "fastdeploy.entrypoints.openai.api_server",
                                                "--model", args.model, "--served-model-name", SERVED_NAME, *host,
                                                "--max-num-seqs", str(max(64, slots)),
                                                *shlex.split(args.fd_args)], "/health")}
    server = find_llama_server(args)
    out["llama-server"] = EngineSpec("llama-server", [server, "-m", args.model, *host, "--alias", SERVED_NAME,
                                                      "-np", str(slots), "-c", str(slots * slot_ctx(args)),
                                                      "-t", str(args.threads), "-tb", str(args.threads),
                                                      *shlex.split(args.llama_server_args)],
                                     "/health") if server else "llama-server not on PATH nor beside --bench-python"
    py = Path(args.bench_python)
    out["llama-cpp-python"] = EngineSpec(
        "llama-cpp-python", [str(py), "-m", "llama_cpp.server", "--model", args.model, *host,
                             "--model_alias", SERVED_NAME, "--n_ctx", str(slot_ctx(args) * 2),
                             "--interrupt_requests", "False",  # queue concurrent requests, don't cut them off
                             "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)],
        "/v1/models", ban_eos=True) if py.exists() else f"{py} not found"
    return out


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> float:
    """Poll url until it answers 200; raise if the process exits or the timeout passes. Returns seconds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before ready; log tail:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)  # poll interval
    raise RuntimeError(f"{url} not ready within {timeout:.0f} s; log tail:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (its own session), then SIGKILL the session if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its process group, if any
    except ProcessLookupError:
        pass


def run_bench_serving(args: argparse.Namespace, spec: EngineSpec, port: int, conc: int, prompts: int,
                      out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_SERVING), "--base-url", f"http://127.0.0.1:{port}/v1", "--model", SERVED_NAME,
           "--endpoint", "chat", "--dataset", "chat", "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--num-prompts", str(prompts), "--max-concurrency", str(conc),
           "--num-warmups", "1", "--tokenizer", args.model, "--label", f"{spec.name}, c={conc}",
           "--json-out", str(out)]
    if spec.ban_eos:
        cmd += ["--extra-body", json.dumps({"logit_bias": eos_bias(args.model)})]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())["metrics"]


def measure_engine(args: argparse.Namespace, name: str, workdir: Path) -> dict[str, Any]:
    """Start one engine, run every concurrency against it, stop it."""
    port = free_port()
    spec = engine_specs(args, port)[name]
    assert isinstance(spec, EngineSpec)
    log = workdir / f"{name}.log"
    print(f"\n### {name}: {shlex.join(spec.argv)}", flush=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(spec.argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        startup = wait_ready(proc, f"http://127.0.0.1:{port}{spec.ready_path}", args.startup_timeout, log)
        print(f"{name} ready after {startup:.1f} s", flush=True)
        runs = {}
        for conc, prompts in zip(args.concurrency, args.num_prompts):
            load = os.getloadavg()[0]
            runs[str(conc)] = run_bench_serving(args, spec, port, conc, prompts, workdir / f"{name}-c{conc}.json")
            runs[str(conc)]["loadavg_1m_before"] = load
    finally:
        stop(proc)
    return {"argv": spec.argv, "startup_s": startup, "runs": runs}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def key_figures(m: dict[str, Any]) -> dict[str, Any]:
    """The figures the tables and plot use, from one bench_serving report."""
    tc = m["token_check"]
    return {"req_s": m["request_throughput"], "out_tok_s": m["output_throughput"],
            "ttft_p50": m["ttft_ms"]["median"], "tpot_p50": m["tpot_ms"]["median"], "itl_p50": m["itl_ms"]["median"],
            "e2el_p50": m["e2el_ms"]["median"], "failed": m["failed"], "completed": m["completed"],
            "mismatches": tc["output_token_mismatches"], "count_source": tc["token_count_source"],
            "mean_input": (m["total_input_tokens"] / m["completed"]) if m["total_input_tokens"] and m["completed"]
            else None}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """us/peer per peer and concurrency: output tok/s, TTFT p50, TPOT p50."""
    ours = results.get("fastdeploy")
    rows = []
    for peer, data in results.items():
        if peer == "fastdeploy" or ours is None:
            continue
        for conc, m in data["runs"].items():
            if conc not in ours["runs"]:
                continue
            us, them = key_figures(ours["runs"][conc]), key_figures(m)
            rows.append({"peer": peer, "concurrency": int(conc), "out_tok_s": ratio(us["out_tok_s"], them["out_tok_s"]),
                         "ttft_p50": ratio(us["ttft_p50"], them["ttft_p50"]),
                         "tpot_p50": ratio(us["tpot_p50"], them["tpot_p50"])})
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def figures_table(results: dict[str, Any], nums: dict[int, int]) -> list[str]:
    lines = ["| engine | concurrency | prompts | mean prompt tokens | req/s | output tok/s | TTFT p50 ms | "
             "TPOT p50 ms | ITL p50 ms | E2EL p50 ms | failed | token-count mismatches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, data in results.items():
        for conc, m in data["runs"].items():
            f = key_figures(m)
            mism = f"{f['mismatches']}" + ("" if f["count_source"] == "usage" else f" ({f['count_source']})")
            lines.append(f"| {LABELS[name]} | {conc} | {nums[int(conc)]} | {fmt(f['mean_input'])} | {fmt(f['req_s'], 2)} "
                         f"| {fmt(f['out_tok_s'])} | {fmt(f['ttft_p50'], 0)} | {fmt(f['tpot_p50'])} | "
                         f"{fmt(f['itl_p50'])} | {fmt(f['e2el_p50'], 0)} | {f['failed']} | {mism} |")
    return lines


def ratios_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| peer | concurrency | output tok/s us/peer (↑) | TTFT p50 us/peer (↓) | TPOT p50 us/peer (↓) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS[r['peer']]} | {r['concurrency']} | **{fmt(r['out_tok_s'], 2)}×** | "
                     f"{fmt(r['ttft_p50'], 2)}× | {fmt(r['tpot_p50'], 2)}× |")
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    return f"{cpu} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores, {mem / 2**20:.0f} GiB"


def versions(args: argparse.Namespace, engines: list[str]) -> str:
    parts = [f"fastdeploy {metadata.version('fastdeploy')} (paddlepaddle {metadata.version('paddlepaddle')})"]
    if "llama-server" in engines:
        proc = subprocess.run([find_llama_server(args) or "llama-server", "--version"], capture_output=True, text=True)
        line = next((ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("version")), "?")
        parts.append(f"llama.cpp llama-server {line.split(':', 1)[-1].strip()}")
    if "llama-cpp-python" in engines:
        proc = subprocess.run([args.bench_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True)
        parts.append(f"llama-cpp-python {proc.stdout.strip() or '?'}")
    return ", ".join(parts)


def shown_argv(argv: list[str], model: str) -> str:
    """A server command line with the run's port and model path made generic."""
    out = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        out.append("$PORT" if prev == "--port" else "$GGUF" if arg == model else
                   Path(arg).name if i == 0 else arg)
    return " ".join(out)


def section_text(args: argparse.Namespace, results: dict[str, Any], meta: dict[str, Any]) -> str:
    nums = dict(zip(args.concurrency, args.num_prompts))
    lines = [SECTION, "",
             f"Streamed chat completions against each server in turn on the same GGUF ({Path(args.model).name}), "
             f"one server at a time: `scripts/bench_serving.py` (TTFT, TPOT, ITL, E2EL as `vllm bench serve` "
             f"defines them; TTFT ends at the first chunk with text) driven by `scripts/bench_compare.py`. "
             f"Chat prompts from `scripts/bench_prompts.py` padded to ~{args.input_len} prompt tokens (our "
             f"tokenizer and chat template), exactly {args.output_len} output tokens (EOS ignored), greedy, "
             f"one warm-up request before each run; every request is checked to have produced "
             f"{args.output_len} tokens (server usage, or streamed chunks where a server sends no usage).", "",
             f"Command: `{meta['command']}` ({meta['date']}; `make bench` runs this script with its defaults)  ",
             f"Machine: {meta['machine']}; 1-min load average before the runs: {meta['load']}  ",
             f"Versions: {meta['versions']}", "", f"Servers (threads: ours uses every core it may, llama.cpp `-t {args.threads} -tb {args.threads}`):", ""]
    lines += [f"- {LABELS[n]}: `{shown_argv(d['argv'], args.model)}`" for n, d in results.items()]
    lines += ["", *figures_table(results, nums), ""]
    rows = ratio_rows(results)
    if rows:
        lines += ["Ratios us/peer, same run:", "", *ratios_table(rows), ""]
    lines += ["![output throughput and TTFT p50 against concurrency](bench_serving.png)", ""]
    return "\n".join(lines)


def replace_section(doc: Path, text: str) -> None:
    """Replace the SECTION heading and its body (up to the next `## ` heading) in doc."""
    lines = doc.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = "".join(lines).rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    doc.write_text(new)


def plot(results: dict[str, Any], path: Path, output_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, data in results.items():
        concs = sorted(int(c) for c in data["runs"])
        figs = [key_figures(data["runs"][str(c)]) for c in concs]
        ax1.plot(concs, [f["out_tok_s"] for f in figs], marker="o", label=LABELS[name])
        ax2.plot(concs, [f["ttft_p50"] for f in figs], marker="o", label=LABELS[name])
    ticks = sorted({int(c) for data in results.values() for c in data["runs"]})
    for ax, title, unit in ((ax1, "Output throughput", "tokens/s"), (ax2, "TTFT p50", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylim(bottom=0)
    ax2.set_yscale("log")
    fig.suptitle(f"Serving on the same GGUF: streamed chat, {output_len} output tokens per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: fastdeploy's default model)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list; unavailable peers are skipped")
    ap.add_argument("--concurrency", type=int_list, default=[1, 8, 32])
    ap.add_argument("--num-prompts", type=int_list, default=[8, 16, 64], help="one per concurrency")
    ap.add_argument("--input-len", type=int, default=233)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp -t / -tb")
    ap.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                    help="python of the venv with llama-cpp-python[server] (make bench-venv)")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: PATH, then beside --bench-python)")
    ap.add_argument("--fd-args", default="", help="extra flags for our api_server, e.g. '--quantization wint8'")
    ap.add_argument("--llama-server-args", default="",
                    help="extra flags for llama-server, e.g. '-fa on -ctk q8_0 -ctv q8_0' beside --fd-args "
                         "'--kv-cache-dtype int8'")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--work-dir", type=Path, default=None, help="server logs and raw JSON (default: a temp dir)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench_serving.png")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the doc and plot alone")
    args = ap.parse_args(argv)
    if len(args.num_prompts) != len(args.concurrency):
        ap.error("--num-prompts needs one value per --concurrency value")
    if args.model is None:
        from fastdeploy.model_store import default_model_path

        args.model = default_model_path()
    return args


def pick_engines(args: argparse.Namespace) -> list[str]:
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(wanted) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engine(s): {sorted(unknown)}; choose from {ENGINES}")
    specs = engine_specs(args, 0)
    chosen = []
    for name in wanted:
        if isinstance(specs[name], str):
            print(f"skipping {name}: {specs[name]}", file=sys.stderr)
        else:
            chosen.append(name)
    return chosen


def print_summary(results: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n" + "\n".join(figures_table(results, dict(zip(args.concurrency, args.num_prompts)))))
    rows = ratio_rows(results)
    if rows:
        print("\nus/peer (output tok/s: higher is better for us; TTFT, TPOT: lower is better for us)")
        print(f"{'peer':<26}{'conc':>6}{'out tok/s':>12}{'TTFT p50':>11}{'TPOT p50':>11}")
        for r in rows:
            print(f"{LABELS[r['peer']]:<26}{r['concurrency']:>6}{fmt(r['out_tok_s'], 2):>12}"
                  f"{fmt(r['ttft_p50'], 2):>11}{fmt(r['tpot_p50'], 2):>11}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = pick_engines(args)
    workdir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = {"command": shlex.join([".venv/bin/python", "scripts/bench_compare.py", *(argv or sys.argv[1:])]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "versions": versions(args, engines)}
    loads = [os.getloadavg()[0]]
    results: dict[str, Any] = {}
    for name in engines:
        results[name] = measure_engine(args, name, workdir)
        loads += [r["loadavg_1m_before"] for r in results[name]["runs"].values()]
    meta["load"] = f"{min(loads):.2f}–{max(loads):.2f}"
    (workdir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print_summary(results, args)
    if not args.no_write:
        replace_section(args.doc, section_text(args, results, meta))
        plot(results, args.plot, args.output_len)
        print(f"\nwrote {args.doc} ({SECTION!r}) and {args.plot}")
    print(f"raw results and server logs: {workdir}; took {time.monotonic() - started:.0f} s")
    failed = sum(r["failed"] for d in results.values() for r in d["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
