// fd_threads: the pool behind RunItems (see thread_pool.h for why it is not an OpenMP team).
//
// One job at a time. Its state is one 64-bit word, so a claim is a single compare-and-swap that
// can only succeed on the current job:
//   generation (16 bits) | workers allowed (8) | items (20) | next unclaimed item (20)
// A successful claim pins the job: the caller does not publish the next one before every claimed
// item has been counted done, so the job's function and context stay valid while a worker reads
// them. A worker that held an old view of the word just fails its compare-and-swap.
//
// Idle workers spin for a short while (the gaps between the kernels of one model step are
// microseconds) and then sleep on a condition variable, so between steps they leave both cores
// to the tokenizer and detokenizer processes. FASTDEPLOY_SPIN_US sets the spin (default 200).
// FASTDEPLOY_THREAD_POOL=openmp runs the same items in OpenMP parallel regions instead, for
// comparison.

#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fd_threads {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

constexpr int kItemBits = 20;
constexpr uint64_t kItemMask = (uint64_t{1} << kItemBits) - 1;
constexpr int64_t kMaxItemsPerJob = static_cast<int64_t>(kItemMask);
constexpr int kMaxWorkers = 255;

struct State {
  uint64_t word;
  uint32_t generation() const { return static_cast<uint32_t>(word >> 48); }
  int workers() const { return static_cast<int>((word >> 40) & 0xff); }
  int64_t items() const { return static_cast<int64_t>((word >> kItemBits) & kItemMask); }
  int64_t next() const { return static_cast<int64_t>(word & kItemMask); }
  static uint64_t Pack(uint32_t generation, int workers, int64_t items) {
    return (uint64_t{generation & 0xffff} << 48) | (uint64_t(workers & 0xff) << 40) |
           (uint64_t(items) << kItemBits);
  }
};

int64_t SpinMicros() {
  const char* v = std::getenv("FASTDEPLOY_SPIN_US");
  if (v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long us = std::strtol(v, &end, 10);
    if (end != v && us >= 0) return us;
  }
  return 200;
}

bool UseOpenMP() {
  const char* v = std::getenv("FASTDEPLOY_THREAD_POOL");
  return v != nullptr && std::strcmp(v, "openmp") == 0;
}

class Pool {
 public:
  void Run(int64_t items, int threads, ItemFn fn, void* ctx) {
    std::unique_lock<std::mutex> job_lock(job_mu_, std::try_to_lock);
    if (!job_lock.owns_lock()) {  // nested, or another thread's job is running
      for (int64_t i = 0; i < items; ++i) fn(ctx, i);
      return;
    }
    const int workers = std::min(threads - 1, kMaxWorkers);
    EnsureWorkers(workers);
    for (int64_t base = 0; base < items; base += kMaxItemsPerJob) {
      RunJob(std::min(items - base, kMaxItemsPerJob), workers, fn, ctx, base);
    }
  }

 private:
  void RunJob(int64_t items, int workers, ItemFn fn, void* ctx, int64_t base) {
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    base_.store(base, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & 0xffff;
    // seq_cst with the load of sleepers_ below and the sleeper's increment in Wait: either the
    // sleeper sees the new job or this thread sees the sleeper and wakes it.
    state_.store(State::Pack(generation_, workers, items), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    const int64_t mine = Drain(generation_);
    // Wait for the items other threads claimed, not for the threads themselves.
    while (done_.load(std::memory_order_acquire) != items - mine) CpuRelax();
  }

  // Claims and runs items of the current job until none is left; returns how many it ran.
  // Workers count theirs in done_ (release: their outputs become visible to the caller).
  int64_t Drain(uint32_t generation, bool worker = false) {
    int64_t ran = 0;
    State s{state_.load(std::memory_order_acquire)};
    while (s.generation() == generation && s.next() < s.items()) {
      if (!state_.compare_exchange_weak(s.word, s.word + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        continue;  // s now holds the current word
      }
      fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed),
                                          base_.load(std::memory_order_relaxed) + s.next());
      if (worker) {
        done_.fetch_add(1, std::memory_order_release);
      } else {
        ++ran;
      }
      s.word = state_.load(std::memory_order_acquire);
    }
    return ran;
  }

  void EnsureWorkers(int count) {
    while (started_ < count) {
      const int index = started_++;
      // Detached and never joined: the pool lives for the whole process (see Instance).
      std::thread([this, index] { WorkerLoop(index); }).detach();
    }
  }

  void WorkerLoop(int index) {
    uint32_t seen = State{state_.load(std::memory_order_acquire)}.generation();
    for (;;) {
      const State s = WaitForJob(seen);
      seen = s.generation();
      if (index < s.workers()) Drain(seen, /*worker=*/true);
    }
  }

  State WaitForJob(uint32_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    for (int spins = 0;; ++spins) {
      const State s{state_.load(std::memory_order_acquire)};
      if (s.generation() != seen) return s;
      CpuRelax();
      if ((spins & 255) == 255 && std::chrono::steady_clock::now() >= deadline) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mu_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    State s{state_.load(std::memory_order_seq_cst)};
    while (s.generation() == seen) {
      wake_.wait(lock);
      s.word = state_.load(std::memory_order_seq_cst);
    }
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return s;
  }

  const int64_t spin_us_ = SpinMicros();
  std::mutex job_mu_;  // one job at a time
  uint32_t generation_ = 0;  // under job_mu_
  int started_ = 0;          // under job_mu_
  std::atomic<uint64_t> state_{0};
  std::atomic<ItemFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> base_{0};
  std::atomic<int64_t> done_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

// Never destroyed: detached workers may still be waiting on it while the process exits. A forked
// child has none of the parent's threads, so it starts a pool of its own.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& Instance() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); });
  });
  Pool* pool = g_pool.load(std::memory_order_acquire);
  if (pool == nullptr) {
    Pool* fresh = new Pool;
    if (g_pool.compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) {
      pool = fresh;
    } else {
      delete fresh;  // another thread installed one first; `pool` holds it
    }
  }
  return *pool;
}

void RunOpenMP(int64_t items, int threads, ItemFn fn, void* ctx) {
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
       i = next.fetch_add(1, std::memory_order_relaxed)) {
    fn(ctx, i);
  }
}

}  // namespace

void RunItems(int64_t items, int threads, ItemFn fn, void* ctx) {
  if (items <= 0) return;
  if (threads <= 1 || items == 1) {
    for (int64_t i = 0; i < items; ++i) fn(ctx, i);
    return;
  }
  static const bool openmp = UseOpenMP();
  if (openmp) {
    RunOpenMP(items, threads, fn, ctx);
  } else {
    Instance().Run(items, threads, fn, ctx);
  }
}

}  // namespace fd_threads
