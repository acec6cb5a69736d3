"""What this machine's cores can do, on 1 thread and on all of them: the ceilings the kernels run into.

    .venv/bin/python scripts/bench_machine.py [--threads 2]

Compiles a small C program with gcc (-O2 -march=native -fopenmp) and prints, per thread count:
  - fp32 FMA: 8-lane `vfmadd231ps` with 10 independent chains (GMAC/s = GFLOP/s / 2);
  - int8 dot: `vpmaddubsw` (u8 x s8, pairs summed into int16) + `vpaddw`, 12 chains: the AVX2
    instruction pair of 8-bit-activation kernels (llama.cpp's Q4 x Q8 dot product);
  - int16 dot: `vpmaddwd` (s16 x s16, pairs summed into int32) + `vpaddd`, 12 chains: the pair of
    this project's AVX2 16-bit-activation kernel;
  - memory read: 512 MB streamed once per pass with 32-byte loads.
Multiply-accumulates are counted per element product. The ratios between the lines (same run) are
what carries over between runs; on a shared VM the absolute figures drift from run to run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ITERS 100000000L

static double fma_gmacs(void) {
  double t0 = omp_get_wtime(), sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
    __m256 a[10];
    for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps(i * 0.001f);
    const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(0.0001f);
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 10
      for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
    }
    for (int i = 1; i < 10; i++) a[0] = _mm256_add_ps(a[0], a[i]);
    sink += _mm256_cvtss_f32(a[0]);
  }
  if (sink == 12345.) puts("");
  return omp_get_max_threads() * ITERS * 10.0 * 8 / (omp_get_wtime() - t0) / 1e9;
}

/* acc += madd(w, acc): each chain feeds its own accumulator back in, so no two multiplies are
   the same expression and the compiler keeps all of them. */
static double maddubs_gmacs(void) {
  double t0 = omp_get_wtime();
  long sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
    __m256i acc[12];
    for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_epi16(i);
    __m256i w = _mm256_set1_epi8(7);
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; i++) acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(w, acc[i]));
      __asm__ volatile("" : "+x"(w));
    }
    for (int i = 1; i < 12; i++) acc[0] = _mm256_add_epi16(acc[0], acc[i]);
    sink += _mm256_extract_epi16(acc[0], 0);
  }
  if (sink == 12345) puts("");
  return omp_get_max_threads() * ITERS * 12.0 * 32 / (omp_get_wtime() - t0) / 1e9;
}

static double maddwd_gmacs(void) {
  double t0 = omp_get_wtime();
  long sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
    __m256i acc[12];
    for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_epi32(i);
    __m256i w = _mm256_set1_epi16(7);
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; i++) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(w, acc[i]));
      __asm__ volatile("" : "+x"(w));
    }
    for (int i = 1; i < 12; i++) acc[0] = _mm256_add_epi32(acc[0], acc[i]);
    sink += _mm256_extract_epi32(acc[0], 0);
  }
  if (sink == 12345) puts("");
  return omp_get_max_threads() * ITERS * 12.0 * 16 / (omp_get_wtime() - t0) / 1e9;
}

static double read_gbs(void) {
  const size_t n = (size_t)512 << 20;
  char* buf = aligned_alloc(64, n);
#pragma omp parallel for
  for (size_t i = 0; i < n; i += 4096) memset(buf + i, (int)(i >> 12), 4096);
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = omp_get_wtime();
    long sink = 0;
#pragma omp parallel for reduction(+ : sink)
    for (size_t i = 0; i < n; i += 128) {
      __m256i a = _mm256_load_si256((const __m256i*)(buf + i));
      __m256i b = _mm256_load_si256((const __m256i*)(buf + i + 32));
      __m256i c = _mm256_load_si256((const __m256i*)(buf + i + 64));
      __m256i d = _mm256_load_si256((const __m256i*)(buf + i + 96));
      a = _mm256_add_epi8(_mm256_add_epi8(a, b), _mm256_add_epi8(c, d));
      sink += _mm256_extract_epi8(a, 3);
    }
    double gbs = n / (omp_get_wtime() - t0) / 1e9;
    if (gbs > best) best = gbs;
    if (sink == 12345) puts("");
  }
  free(buf);
  return best;
}

int main(void) {
  printf("%.1f %.1f %.1f %.1f\n", fma_gmacs(), maddubs_gmacs(), maddwd_gmacs(), read_gbs());
  return 0;
}
"""


def build(workdir: Path) -> Path:
    src = workdir / "peaks.c"
    exe = workdir / "peaks"
    src.write_text(SOURCE)
    subprocess.run(["gcc", "-O2", "-march=native", "-fopenmp", str(src), "-o", str(exe)], check=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the 'all threads' count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        rows = {}
        for threads in sorted({1, args.threads}):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="true")
            out = subprocess.run([str(exe)], env=env, check=True, capture_output=True, text=True).stdout
            rows[threads] = [float(v) for v in out.split()]
    print("| threads | fp32 FMA GMAC/s | u8xs8 vpmaddubsw+vpaddw GMAC/s | s16 vpmaddwd+vpaddd GMAC/s "
          "| memory read GB/s |")
    print("|---|---|---|---|---|")
    for threads, (fma, ubs, wd, bw) in rows.items():
        print(f"| {threads} | {fma:.1f} | {ubs:.1f} ({ubs / fma:.2f}x FMA) | {wd:.1f} ({wd / fma:.2f}x FMA) | {bw:.1f} |")
    if len(rows) == 2:
        one, many = rows[1], rows[args.threads]
        print(f"\n{args.threads} threads / 1 thread: FMA {many[0] / one[0]:.2f}x, u8xs8 {many[1] / one[1]:.2f}x, "
              f"s16 {many[2] / one[2]:.2f}x, memory {many[3] / one[3]:.2f}x")


if __name__ == "__main__":
    main()
