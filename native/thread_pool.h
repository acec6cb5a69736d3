// The worker threads every parallel kernel of the extension runs on.
//
// Why not OpenMP: an `omp parallel` region ends in a barrier that waits for every thread of the
// team, including one that has not even started yet. On a small machine the serving pipeline's
// other processes (tokenizer, detokenizer, api workers) wake once per generated token and take a
// core for a moment; when that core held our second thread, the first one finishes all the work
// handed out through the queue and then sits at the barrier until the preempted thread is
// scheduled again only to find nothing left. Here the caller waits for the *items* to be done, not
// for the threads: a worker that wakes late finds the job drained and goes back to waiting, and
// the caller has already returned.
//
// Work is a count of items claimed one at a time from a shared counter, so a thread that is
// preempted mid-job only delays the item it holds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fd_threads {

using ItemFn = void (*)(void* ctx, int64_t item);

// Calls fn(ctx, i) for every i in [0, items) on up to `threads` threads, the caller included, and
// returns when all calls have returned. Items must be independent. A call from inside an item (or
// while another thread runs a job) runs its items on the calling thread alone.
void RunItems(int64_t items, int threads, ItemFn fn, void* ctx);

// body(i) for i in [0, items).
template <typename Body>
void ParallelFor(int64_t items, int threads, Body&& body) {
  if (threads <= 1 || items <= 1) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  using B = std::remove_reference_t<Body>;
  RunItems(items, threads, [](void* ctx, int64_t i) { (*static_cast<B*>(ctx))(i); }, &body);
}

// Items per thread for loops over many equal rows: enough to rebalance when one thread is held up,
// few enough that claiming stays negligible.
constexpr int64_t kChunksPerThread = 4;

// body(begin, end) over contiguous chunks that cover [0, n).
template <typename Body>
void ParallelChunks(int64_t n, int threads, Body&& body) {
  if (threads <= 1 || n <= 1) {
    if (n > 0) body(int64_t{0}, n);
    return;
  }
  const int64_t chunks = std::min<int64_t>(n, threads * kChunksPerThread);
  ParallelFor(chunks, threads, [&](int64_t c) { body(n * c / chunks, n * (c + 1) / chunks); });
}

}  // namespace fd_threads
