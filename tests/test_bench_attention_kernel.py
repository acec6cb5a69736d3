"""scripts/bench_attention_kernel.cc builds against this checkout's native/ and runs.

The driver calls the attention kernels without Paddle, so a change to their Problem struct or to
RunTiled's signature would leave it broken with nothing else noticing. This builds it with the
command line its header gives (float16 and float32 caches) and runs a tiny decode and prefill."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import paddle
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["scripts/bench_attention_kernel.cc", "native/attention_tiled.cc", "native/thread_pool.cc"]
DECODE_LINE = re.compile(r"^(\d+) us per layer, (\d+\.\d) ns per key visit$")
PREFILL_LINE = re.compile(r"^(\d+) us per layer$")


def build(out: Path, float32: bool) -> Path:
    include = paddle.sysconfig.get_include()
    cmd = ["g++", "-O2", "-march=native", "-std=c++17", "-I" + str(ROOT / "native"), "-I" + include,
           "-I" + str(Path(include) / "third_party"), *(str(ROOT / s) for s in SOURCES), "-o", str(out),
           "-lpthread"]
    if float32:
        cmd.insert(1, "-DFD_BENCH_F32")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return out


def run(exe: Path, *args: str) -> str:
    done = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("float32", [False, True], ids=["float16", "float32"])
def test_driver_builds_and_times_decode_and_prefill(tmp_path: Path, float32: bool) -> None:
    exe = build(tmp_path / "attn_kernel", float32)
    decode = DECODE_LINE.match(run(exe, "3", "150", "2", "2", "2"))
    assert decode, "decode output line"
    assert float(decode.group(2)) > 0
    prefill = PREFILL_LINE.match(run(exe, "2", "70", "1", "2", "1", "prefill"))
    assert prefill, "prefill output line"
    short = subprocess.run([str(exe), "1", "64"], capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "usage:" in short.stderr

