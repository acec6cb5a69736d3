"""The native kernels' worker pool (native/thread_pool.cc), seen through an op that takes a thread
count: fd_paged_attention. Every work item is computed by exactly one thread with the same
arithmetic, so any thread count, any number of concurrent callers, a forked child and the OpenMP
fallback must all give bit-identical outputs."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import paddle
import pytest

from fastdeploy.model_executor.ops import paged_attention as attn
from test_paged_attention import make_case

# Long enough contexts that the call goes parallel (the kernels stay on one thread for tiny work).
CONTEXT_LENS = (300, 517, 64, 700)
Q_LENS = (1, 9, 64, 1)


def run(case, num_threads: int, scalar: bool = False) -> np.ndarray:
    with paddle.no_grad():
        return attn.native_paged_attention(*case.tensors(), scalar=scalar, num_threads=num_threads).numpy()


@pytest.fixture(scope="module")
def case():
    return make_case(CONTEXT_LENS, Q_LENS, 9, 3, 64, block_size=16, seed=11)


def test_thread_counts_give_identical_results(native, case):
    # 5 starts four workers; the 2-thread calls after it must leave the extra ones out and still agree.
    for scalar in (False, True):
        expected = run(case, 1, scalar)
        for threads in (2, 5, 2, 3):
            np.testing.assert_array_equal(run(case, threads, scalar), expected)


def test_concurrent_callers(native, case):
    """Callers on several Python threads: one runs on the pool, the others run their items alone."""
    expected = run(case, 1)
    failures: list[str] = []

    def call_repeatedly() -> None:
        for _ in range(10):
            got = run(case, 2)
            if not np.array_equal(got, expected):
                failures.append(f"max diff {np.abs(got - expected).max()}")

    threads = [threading.Thread(target=call_repeatedly) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert failures == []


def _child(case, expected: np.ndarray, queue) -> None:
    queue.put(bool(np.array_equal(run(case, 2), expected)))


def test_forked_child_gets_its_own_workers(native, case):
    expected = run(case, 2)  # the pool and its worker exist in this process now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(case, expected, queue))
    child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a parallel kernel")
    assert child.exitcode == 0
    assert queue.get(timeout=10) is True


OPENMP_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_paged_attention import make_case
from test_thread_pool import CONTEXT_LENS, Q_LENS, run
case = make_case(CONTEXT_LENS, Q_LENS, 9, 3, 64, block_size=16, seed=11)
np.save({out!r}, np.stack([run(case, 2), run(case, 2, scalar=True)]))
"""


def test_openmp_fallback_matches(native, case, tmp_path):
    out = tmp_path / "openmp.npy"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FASTDEPLOY_THREAD_POOL="openmp")
    subprocess.run([sys.executable, "-c", OPENMP_SCRIPT.format(tests=tests, out=str(out))], env=env, check=True,
                   timeout=600, cwd=os.path.dirname(tests))
    got = np.load(out)
    np.testing.assert_array_equal(got[0], run(case, 1))
    np.testing.assert_array_equal(got[1], run(case, 1, scalar=True))
