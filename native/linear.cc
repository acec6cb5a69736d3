// Linear layers y = x @ W (+ bias) with pre-packed fp32, bf16 or weight-only 8-bit weights, as a
// Paddle custom operator (fd_linear) for CPUs with AVX-512, or AVX2 + FMA (linear_kernels.h has
// both sets of micro-kernels; the build's -march=native picks one).
//
// Packed weight layout (built once in Python, fastdeploy/model_executor/layers/linear.py): W [K, N]
// is cut into panels of kPanel = 32 output columns (the last one zero-padded). Each panel is one
// contiguous block running along K, so a kernel walking a panel streams memory linearly and every
// cache line it pulls holds only weights it needs:
//   fp32 : float  [K][32]
//   bf16 : uint16 [K/2][32][2]   k-pairs interleaved: the operand layout of vdpbf16ps, which a
//                                fp32 kernel widens with one shift or one mask per 16 weights.
//   u8   : per group of G rows along K: uint8 [G/4][32][4] (k-quads, the operand layout of
//          vpdpbusd), float scale[32], float zero[32]; w = u * scale + zero.
//   u4   : the same with codes 0..15, two k-quads per byte (linear_s8.h; AVX2 builds, G = 32).
//          Format 2 covers both code widths: the packed tensor's size tells which it holds, so
//          the layers of one kind in the fused decoder op may differ.
//
// A micro-kernel computes a tile of up to kMaxRows rows (12 with AVX-512, 4 for VNNI; 3 with
// AVX2, 6 for its many-row fp32 and its 16-bit-activation kernels) x 32 columns with its
// accumulators in registers over the K range it is given. Paths (bf16-dot needs AVX-512; on AVX2
// those requests compute in fp32):
//   - u8 with 16-bit activations (the default, the `vnni` attribute): activations quantized per
//     row and group to 16 bits, exact integer sums, about fp32's accuracy. With AVX512-VNNI at
//     every M through vpdpbusd: the multiply rate of vdpbf16ps, and at M = 1 three times fewer
//     instructions than dequantizing to fp32. With AVX2 through vpmaddwd, up to kAct16MaxRows
//     rows, where skipping the weights' int-to-float conversion pays (linear_kernels.h).
//   - u4 (AVX2 builds): up to kU4Act16MaxRows rows 16-bit activations (vpmaddwd) in tiles of
//     two rows that each stream the panel once, beyond that the many-row fp32 path below; or,
//     when the call asks for them (vnni = 2), from 2 rows on 8-bit activations with vpmaddubsw
//     (linear_s8.h): llama.cpp's Q8_1 arithmetic, 1.3-1.9x faster per layer but far less exact,
//     opt-in (the Python side's FASTDEPLOY_ACT8).
//   - few rows (decode), other formats: each panel is streamed once and widened or dequantized in
//     registers against fp32 activations; memory-bound anyway.
//   - many rows (prefill, big batches): rows are cut into blocks of 96 whose tiles all pass over
//     one panel slice while it sits in L2; quantized slices are dequantized once into a buffer,
//     and with bf16_dot the activations are rounded to bf16 once and multiplied with vdpbf16ps
//     at twice the fp32 FMA rate.
// Threads claim work items (an M block x a run of consecutive panels) one at a time.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "linear.h"
#include "linear_kernels.h"
#include "linear_s8.h"
#include "paddle/extension.h"
#include "thread_pool.h"

#if FD_LINEAR_SIMD

namespace fd_linear {

enum Format : int { kFormatF32 = 0, kFormatBF16 = 1, kFormatU8 = 2, kFormatU4 = 3 };
enum class Kernel { kF32, kBF16Widen, kU8, kBF16Dot, kU8Vnni, kS8 };

// K block of the large-M path. A row tile walks the whole K block of its panel, so each output is
// written once; the panel slice (up to 256 KB) and the activations of one M block stay in the
// 1 MB L2 while all row tiles use them. Measured on Zen 5: blocking K down to L1-sized slices
// (256) was slower (each extra block re-reads and re-writes the output tile, and an M block of
// output rows spans ~100 pages), so only very long K is blocked. Multiples of every 8-bit group.
constexpr int64_t kKBlockF32 = 2048;
constexpr int64_t kKBlockBF16 = 4096;
// Rows per M block: its activations (kMBlock x K) stay in L2 next to the panel slice.
constexpr int64_t kMBlock = 96;
// Outputs at least this big are written with non-temporal stores (Problem::stream_output).
constexpr int64_t kStreamOutputBytes = int64_t{8} << 20;
// Below this many multiply-adds a second thread costs more (fork/join) than it saves.
constexpr int64_t kMinParallelMacs = 1 << 16;

struct Problem {
  const float* x = nullptr;        // [m, k] row-major
  const uint16_t* x_bf16 = nullptr;  // x rounded to bf16, only with bf16_dot
  const uint8_t* w = nullptr;      // packed panels
  const float* bias = nullptr;     // [n] or null
  float* y = nullptr;              // [m, n]
  int64_t m = 0, k = 0, n = 0;
  int64_t panel_bytes = 0;
  int format = kFormatF32;
  int group = 0;                   // 8-bit only: rows per (scale, zero)
  const float* xsum = nullptr;     // 8-bit with few rows: [m, k / group] sums of x per group
  bool bf16_dot = false;
  // 8-bit weights x 16-bit activations (TileU8Vnni): x as hi/lo bytes [m, k] (vpdpbusd) or as int16
  // in k-quad order [m, k] (AVX2's vpmaddwd) and, per row and group, the step and step * sum(q)
  // ([m, k / group] each).
  bool vnni = false;
  const int8_t* x_hi = nullptr;
  const int8_t* x_lo = nullptr;
  const int16_t* x_q16 = nullptr;
  const float* x_step = nullptr;
  const float* x_qsum = nullptr;
  // 4-bit codes x 8-bit activations (TileS8, AVX2, from kS8MinRows rows): x as int8 k-quads by pairs,
  // int32 [k / 8, m, 2], with x_step and x_qsum group-major ([k / group, m] each; linear_s8.h).
  bool s8 = false;
  const int32_t* x_q8 = nullptr;
  // Non-temporal stores for outputs too big to be read back from cache (e.g. the 49152-wide
  // lm_head at batch 64: 12.6 MB). Besides saving the read-for-ownership, this keeps the output
  // rows out of L2: their stride there is a multiple of 64 KB, so they all fall in one L2 set and
  // would evict the panel and activations the tiles are using (measured: -25% throughput).
  bool stream_output = false;
};

// Bytes that `rows` consecutive K rows of one packed panel take (a multiple of the group for 8-bit).
int64_t PanelRowBytes(int format, int64_t rows, int group) {
  switch (format) {
    case kFormatF32: return rows * kPanel * 4;
    case kFormatBF16: return rows * kPanel * 2;
#if FD_LINEAR_S8
    case kFormatU4: return (rows / group) * U4GroupBytes();
#endif
    default: return (rows / group) * U8GroupBytes(group);
  }
}

// Address of row k0 of a packed panel.
const uint8_t* PanelAt(const Problem& p, int64_t panel, int64_t k0) {
  return p.w + panel * p.panel_bytes + PanelRowBytes(p.format, k0, p.group);
}

struct Tile {
  int64_t row, k0, kc;
  const void* b;
  Prefetcher prefetch;  // this tile's share of the next panel's slice
  bool stream;
  float* c;
  const float* bias;
  int cols;  // of the panel that exist (the last panel may be narrower than kPanel)
  bool accumulate;
};

#if FD_LINEAR_ACT16
// A tile of the 16-bit-activation kernel, computed and stored. A function of its own, dispatched
// by RunPanel, not a case of RunTile: with it inside, the AVX2 build's RunTile compiled differently
// and its many-row fp32 tiles ran slower (batch-32 decode steps 5-15% slower, 7 of 7 A/B rounds).
template <int MR>
void Act16Tile(const Problem& p, const Tile& t) {
  TileAcc<MR> acc;
  Prefetcher pf = t.prefetch;
  const int64_t groups = p.k / p.group;
  const int64_t g0 = t.row * groups + t.k0 / p.group;
  const auto* b = static_cast<const uint8_t*>(t.b);
  const float* step = p.x_step + g0;
  const float* qsum = p.x_qsum + g0;
#ifdef __AVX512F__
  const int8_t* hi = p.x_hi + t.row * p.k + t.k0;
  const int8_t* lo = p.x_lo + t.row * p.k + t.k0;
  const auto tile = [&](auto group) {
    TileU8Vnni<MR, decltype(group)::value>(hi, lo, p.k, step, qsum, groups, b, t.kc, pf, acc);
  };
#else
  const int16_t* xq = p.x_q16 + t.row * p.k + t.k0;
#if FD_LINEAR_S8
  if constexpr (MR <= kU4Act16TileRows) {  // RunPanel cuts 4-bit panels' calls into such tiles
    if (p.format == kFormatU4) {
      TileVnniOnePass<MR, U4Group>(xq, p.k, step, qsum, groups, b, t.kc, pf, acc);
      StoreTile<MR>(acc, t.c, p.n, t.bias, t.cols, t.accumulate, t.stream);
      return;
    }
  }
#endif
  const auto tile = [&](auto group) {
    TileU8Vnni<MR, decltype(group)::value>(xq, p.k, step, qsum, groups, b, t.kc, pf, acc);
  };
#endif
  switch (p.group) {  // the sizes VnniGroupOk admits
    case 16: tile(std::integral_constant<int, 16>()); break;
    case 32: tile(std::integral_constant<int, 32>()); break;
    case 64: tile(std::integral_constant<int, 64>()); break;
    default: tile(std::integral_constant<int, 128>()); break;
  }
  StoreTile<MR>(acc, t.c, p.n, t.bias, t.cols, t.accumulate, t.stream);
}
#endif

#if FD_LINEAR_S8
// A tile of the 8-bit-activation kernel (linear_s8.h), a function of its own like Act16Tile.
template <int MR>
void S8Tile(const Problem& p, const Tile& t) {
  TileAcc<MR> acc;
  Prefetcher pf = t.prefetch;
  const int64_t g0 = t.k0 / kS8Group * p.m + t.row;
  TileS8<MR>(p.x_q8 + t.k0 / 8 * 2 * p.m + 2 * t.row, p.m, p.x_step + g0, p.x_qsum + g0,
             static_cast<const uint8_t*>(t.b), t.kc, pf, acc);
  StoreTile<MR>(acc, t.c, p.n, t.bias, t.cols, t.accumulate, t.stream);
}
#endif

template <int MR>
void RunTile(Kernel kernel, const Problem& p, const Tile& t) {
  TileAcc<MR> acc;
  const float* a = p.x + t.row * p.k + t.k0;
  Prefetcher pf = t.prefetch;
  switch (kernel) {
    case Kernel::kF32:
#ifndef __AVX512F__
      if constexpr (MR > kMaxRows) {  // only the many-row fp32 path has tiles this tall
        TileF32Halves<MR>(a, p.k, static_cast<const float*>(t.b), t.kc, pf, acc);
        break;
      }
#endif
      TileF32<MR>(a, p.k, static_cast<const float*>(t.b), t.kc, pf, acc);
      break;
    case Kernel::kBF16Widen:
      if constexpr (MR <= kMaxRows) TileBF16Widen<MR>(a, p.k, static_cast<const uint16_t*>(t.b), t.kc, pf, acc);
      break;
    case Kernel::kU8:
      if constexpr (MR <= kMaxRows) {
        TileU8<MR>(a, p.k, static_cast<const uint8_t*>(t.b), t.kc, p.group,
                   p.xsum + t.row * (p.k / p.group) + t.k0 / p.group, p.k / p.group, pf, acc);
      }
      break;
    case Kernel::kBF16Dot:
#ifdef __AVX512BF16__
      TileBF16Dot<MR>(p.x_bf16 + t.row * p.k + t.k0, p.k, static_cast<const uint16_t*>(t.b), t.kc, pf, acc);
#endif
      break;
    case Kernel::kU8Vnni:  // Act16Tile and S8Tile (RunPanel calls them)
    case Kernel::kS8:
      break;
  }
  StoreTile<MR>(acc, t.c, p.n, t.bias, t.cols, t.accumulate, t.stream);
}

using TileFn = void (*)(Kernel, const Problem&, const Tile&);

// Tallest tile of any kernel: kMaxRows, or kWideRows for the AVX2 many-row fp32 kernel.
constexpr int kMaxTileRows = std::max(kMaxRows, kWideRows);

template <size_t... R>
constexpr std::array<TileFn, kMaxTileRows + 1> MakeTileFns(std::index_sequence<R...>) {
  return {nullptr, RunTile<static_cast<int>(R) + 1>...};
}
// kTileFns[rows] runs a tile of that many rows (1..kMaxTileRows).
constexpr std::array<TileFn, kMaxTileRows + 1> kTileFns = MakeTileFns(std::make_index_sequence<kMaxTileRows>());

#if FD_LINEAR_ACT16
using Act16Fn = void (*)(const Problem&, const Tile&);
template <size_t... R>
constexpr std::array<Act16Fn, kMaxVnniRows + 1> MakeAct16Fns(std::index_sequence<R...>) {
  return {nullptr, Act16Tile<static_cast<int>(R) + 1>...};
}
// kAct16Fns[rows]: the same for the 16-bit-activation kernel (1..kMaxVnniRows).
constexpr std::array<Act16Fn, kMaxVnniRows + 1> kAct16Fns = MakeAct16Fns(std::make_index_sequence<kMaxVnniRows>());
#endif

#if FD_LINEAR_S8
template <size_t... R>
constexpr std::array<Act16Fn, kMaxS8Rows + 1> MakeS8Fns(std::index_sequence<R...>) {
  return {nullptr, S8Tile<static_cast<int>(R) + 1>...};
}
// kS8Fns[rows]: the same for the 8-bit-activation kernel (1..kMaxS8Rows).
constexpr std::array<Act16Fn, kMaxS8Rows + 1> kS8Fns = MakeS8Fns(std::make_index_sequence<kMaxS8Rows>());
#endif

// Per-thread slice buffers (256 KB each), reused across calls (the pool's workers live on).
struct Scratch {
  alignas(64) float f32[kKBlockF32 * kPanel];
  alignas(64) uint16_t bf16[kKBlockBF16 * kPanel];
};

Scratch& ThreadScratch() {
  static thread_local std::unique_ptr<Scratch> scratch(new Scratch);
  return *scratch;
}

// K block of at most max_block rows, split evenly (4608 = 3 x 1536 rather than 2048 + 2048 + 512:
// a short tail block would cost a full pass of reading and writing the output tile) and rounded up
// to `multiple` (the 8-bit group, or the bf16 pair). max_block is a multiple of every `multiple`,
// so the result never exceeds it and the scratch buffers hold it.
int64_t BalancedKBlock(int64_t k, int64_t max_block, int64_t multiple) {
  const int64_t blocks = (k + max_block - 1) / max_block;
  const int64_t size = (k + blocks - 1) / blocks;
  return std::min(max_block, (size + multiple - 1) / multiple * multiple);
}

// How one call walks its weights: the micro-kernel, the K block, and whether each panel slice
// is first dequantized into the thread's scratch buffer.
struct Plan {
  Kernel kernel;
  int64_t k_block;
  bool dequantize;
};

Plan MakePlan(const Problem& p) {
  const int64_t multiple = p.format >= kFormatU8 ? p.group : p.format == kFormatBF16 ? 2 : 1;
  if (p.s8) {  // reads the packed 4-bit codes as they are
    return {Kernel::kS8, BalancedKBlock(p.k, kKBlockBF16, multiple), false};
  }
  if (p.vnni) {  // reads the packed 8-bit panels as they are, at any M
    return {Kernel::kU8Vnni, BalancedKBlock(p.k, kKBlockBF16, multiple), false};
  }
  if (p.bf16_dot) {  // bf16 panels are read as they are; 8-bit ones are converted to bf16 pairs
    return {Kernel::kBF16Dot, BalancedKBlock(p.k, kKBlockBF16, multiple), p.format == kFormatU8};
  }
  // Decided on the whole call, not per M block: the few-row kernels need per-call data (the
  // 8-bit group sums) that only few-row calls prepare.
  if (p.m <= kMaxRows) {
    // Each weight is used by one row tile only: nothing to block or convert ahead for.
    const Kernel kernel =
        p.format == kFormatBF16 ? Kernel::kBF16Widen : p.format == kFormatU8 ? Kernel::kU8 : Kernel::kF32;
    return {kernel, p.k, false};
  }
  // Many rows: quantized weights are dequantized once per slice into an fp32 buffer.
  return {Kernel::kF32, BalancedKBlock(p.k, kKBlockF32, multiple), p.format != kFormatF32};
}

// The slice of `panel` at rows [k0, k0 + kc) in the form the plan's kernel reads.
const void* SliceFor(const Problem& p, const Plan& plan, int64_t panel, int64_t k0, int64_t kc) {
  const uint8_t* packed = PanelAt(p, panel, k0);
  if (!plan.dequantize) return packed;
  Scratch& scratch = ThreadScratch();
  if (plan.kernel == Kernel::kBF16Dot) {
#ifdef __AVX512BF16__
    DequantU8ToBF16Pairs(packed, kc, p.group, scratch.bf16);
#endif
    return scratch.bf16;
  }
  if (p.format == kFormatU8) {
    DequantU8ToF32(packed, kc, p.group, scratch.f32);
#if FD_LINEAR_S8
  } else if (p.format == kFormatU4) {
    DequantU4ToF32(packed, kc, scratch.f32);
#endif
  } else {
    WidenBF16ToF32(reinterpret_cast<const uint16_t*>(packed), kc, scratch.f32);
  }
  return scratch.f32;
}

// All row tiles of rows [mb, me) against one panel slice `b`; `next` (or null) is the slice of
// the panel that comes after, for the tiles to prefetch.
void RunPanel(const Problem& p, Kernel kernel, const void* b, const char* next, int64_t panel, int64_t mb,
              int64_t me, int64_t k0, int64_t kc) {
  const int64_t col = panel * kPanel;
  const int64_t cols = std::min<int64_t>(kPanel, p.n - col);
  const bool last_k = k0 + kc == p.k;
  Tile t;
  t.k0 = k0;
  t.kc = kc;
  t.b = b;
  t.bias = last_k && p.bias != nullptr ? p.bias + col : nullptr;
  t.cols = static_cast<int>(cols);
  t.accumulate = k0 > 0;
  t.stream = p.stream_output && last_k && cols == kPanel;
  // The row tiles share the prefetch of the next slice, so the requests are spread over the
  // whole panel instead of flooding the miss buffers during the first tile.
#if FD_LINEAR_ACT16
  const int64_t int_rows = kMaxVnniRows;
#else
  const int64_t int_rows = kMaxRows;
#endif
#if FD_LINEAR_S8
  const int64_t s8_rows = kMaxS8Rows;
  const int64_t u4_rows = kU4Act16TileRows;
#else
  const int64_t s8_rows = kMaxRows;
  const int64_t u4_rows = kMaxRows;  // no 4-bit panels in these builds
#endif
  const int64_t tile_rows = kernel == Kernel::kU8Vnni ? (p.format == kFormatU4 ? u4_rows : int_rows)
                            : kernel == Kernel::kS8   ? s8_rows
                            : kernel == Kernel::kF32  ? kWideRows
                                                      : kMaxRows;
  const int64_t tiles = (me - mb + tile_rows - 1) / tile_rows;
  const int64_t slice_bytes = PanelRowBytes(p.format, kc, p.group);
  const int64_t share = next != nullptr ? (slice_bytes + tiles * 64 - 1) / (tiles * 64) * 64 : 0;
  // Rows are dealt evenly over the tiles (16 = 8 + 8, not 12 + 4): a short tile has too few
  // accumulators to keep both FMA pipes busy.
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t row = mb + (me - mb) * tile / tiles;
    const int64_t rows = mb + (me - mb) * (tile + 1) / tiles - row;
    t.row = row;
    t.c = p.y + row * p.n + col;
    t.prefetch.next = next + tile * share;
    t.prefetch.end = t.prefetch.next + share;
#if FD_LINEAR_ACT16
    if (kernel == Kernel::kU8Vnni) {
      kAct16Fns[rows](p, t);
      continue;
    }
#endif
#if FD_LINEAR_S8
    if (kernel == Kernel::kS8) {
      kS8Fns[rows](p, t);
      continue;
    }
#endif
    kTileFns[rows](kernel, p, t);
  }
}

// Rows [m0, m1) x panels [p0, p1) on the calling thread.
void RunBlock(const Problem& p, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m0 >= m1 || p0 >= p1) return;
  const Plan plan = MakePlan(p);
  for (int64_t mb = m0; mb < m1; mb += kMBlock) {
    const int64_t me = std::min(mb + kMBlock, m1);
    for (int64_t k0 = 0; k0 < p.k; k0 += plan.k_block) {
      const int64_t kc = std::min(plan.k_block, p.k - k0);
      for (int64_t panel = p0; panel < p1; ++panel) {
        const char* next = panel + 1 < p1 ? reinterpret_cast<const char*>(PanelAt(p, panel + 1, k0)) : nullptr;
        RunPanel(p, plan.kernel, SliceFor(p, plan, panel, k0, kc), next, panel, mb, me, k0, kc);
      }
    }
  }
  // Non-temporal stores are weakly ordered: make them visible before the op returns.
  if (p.stream_output) _mm_sfence();
}

// Threads claim work items one at a time (thread_pool.h) instead of taking a fixed half each. On
// two cores shared with the server's other processes, one thread is often preempted for a while;
// a static split would leave the whole call waiting for its half, claiming lets the other thread
// take over the remaining items.
// An item is one M block x one run of consecutive panels: a run streams its weights linearly,
// and there are about kItemsPerThread items per thread to balance with.
constexpr int64_t kItemsPerThread = 8;

void Run(const Problem& p, int num_threads) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  const int threads = p.m * p.n * p.k >= kMinParallelMacs ? std::max(num_threads, 1) : 1;
  if (threads == 1) {
    RunBlock(p, 0, p.m, 0, panels);
    return;
  }
  // Few rows form one M block (one tile per panel); many rows are cut into kMBlock blocks.
  const int64_t m_block = p.m <= kMaxRows ? p.m : kMBlock;
  const int64_t m_blocks = (p.m + m_block - 1) / m_block;
  const int64_t runs = std::clamp<int64_t>((threads * kItemsPerThread + m_blocks - 1) / m_blocks, 1, panels);
  const int64_t items = m_blocks * runs;
  fd_threads::ParallelFor(items, threads, [&](int64_t item) {
    // Consecutive items share an M block, so a thread's activations stay warm in L2.
    const int64_t mb = item / runs;
    const int64_t run = item % runs;
    RunBlock(p, mb * m_block, std::min(p.m, (mb + 1) * m_block), panels * run / runs, panels * (run + 1) / runs);
  });
}

// Per-call copies of the activations (bf16-rounded x, 16-bit x, per-group sums), kept per calling
// thread and only ever grown: a fresh allocation per call would be a fresh mmap of up to a few
// MB, page-faulted in on every call. kSlot tells apart buffers of one type used together.
template <typename T, int kSlot>
T* ScratchArray(int64_t elements) {
  static thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(static_cast<size_t>(elements));
  return buffer.data();
}

#ifdef __AVX512BF16__
void RoundToBF16(const float* x, int64_t m, int64_t k, uint16_t* out, int num_threads) {
  const int threads = m * k >= (1 << 15) ? std::max(num_threads, 1) : 1;
  fd_threads::ParallelFor(m, threads, [&](int64_t row) { RoundRowToBF16(x + row * k, k, out + row * k); });
}
#endif

}  // namespace fd_linear
#endif  // FD_LINEAR_SIMD

namespace {

// Some kernel set was built: AVX-512, or AVX2 + FMA (linear_kernels.h).
constexpr bool kHaveKernels = FD_LINEAR_SIMD != 0;
constexpr bool kHaveAvx512 =
#ifdef __AVX512F__
    true;
#else
    false;
#endif
constexpr bool kHaveBF16Dot =
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    true;
#else
    false;
#endif
// Rows up to which a u8 call with vnni set multiplies 16-bit activations (0: never).
constexpr int32_t kAct16Rows =
#if FD_LINEAR_ACT16
    static_cast<int32_t>(std::min<int64_t>(fd_linear::kAct16MaxRows, INT32_MAX));
#else
    0;
#endif

// The fewest rows a call on u4 panels multiplies 8-bit activations for (0: not built), and the
// most it multiplies 16-bit ones for when it does not.
#if FD_LINEAR_S8
constexpr int32_t kS8Rows = static_cast<int32_t>(fd_linear::kS8MinRows);
constexpr int32_t kU4Act16Rows = static_cast<int32_t>(fd_linear::kU4Act16MaxRows);
#else
constexpr int32_t kS8Rows = 0;
constexpr int32_t kU4Act16Rows = 0;
#endif

paddle::Tensor Contiguous(const paddle::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

void CheckInputs(const paddle::Tensor& x, const paddle::Tensor& packed_w, const paddle::Tensor& bias,
                 const fd_linear::LinearArgs& args) {
  PD_CHECK(kHaveKernels, "fd_linear needs a CPU with AVX-512 or AVX2 + FMA (built without both); use the "
           "reference path");
  PD_CHECK(x.is_cpu() && packed_w.is_cpu() && bias.is_cpu(), "fd_linear inputs must be CPU tensors");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "x must be float32");
  PD_CHECK(packed_w.dtype() == paddle::DataType::UINT8, "packed weights must be uint8 bytes");
  PD_CHECK(bias.dtype() == paddle::DataType::FLOAT32, "bias must be float32");
  PD_CHECK(x.shape().size() == 2, "x must be [M, K]");
  PD_CHECK(args.format >= 0 && args.format <= 2, "unknown weight format ", args.format);
  const int64_t k = x.shape()[1];
  PD_CHECK(args.n > 0 && k > 0, "empty weight");
  if (args.format == 1) PD_CHECK(k % 2 == 0, "bf16 weights need an even K, got ", k);
  if (args.format == 2) {
    PD_CHECK(args.group >= 2 && args.group % 2 == 0 && k % args.group == 0, "8-bit group ", args.group,
             " must be even and divide K ", k);
  }
  PD_CHECK(bias.numel() == 0 || bias.numel() == args.n, "bias must have N or 0 elements");
}

#if FD_LINEAR_SIMD
#if FD_LINEAR_S8
// 8-bit x for TileS8: 4-bit panels with at least kS8MinRows rows, in calls that ask for 8-bit
// activations (vnni = 2); the others take the 16-bit kernel.
bool PrepareS8(fd_linear::Problem& p, int vnni, int num_threads) {
  p.s8 = p.format == fd_linear::kFormatU4 && p.m >= fd_linear::kS8MinRows && vnni >= 2;
  if (!p.s8) return false;
  const int64_t groups = p.k / p.group;
  float* step = fd_linear::ScratchArray<float, 1>(p.m * groups);
  float* qsum = fd_linear::ScratchArray<float, 2>(p.m * groups);
  int32_t* xq = fd_linear::ScratchArray<int32_t, 0>(p.m * p.k / 4);
  const int threads = p.m * p.k >= (1 << 15) ? std::max(num_threads, 1) : 1;
  // Threads take blocks of 16 rows: in the [k / 8, m, 2] layout one cache line holds a k-quad pair
  // of 8 rows (and in [k / 32, m] a group of 16), so rows dealt one at a time would have both
  // threads writing the same lines.
  constexpr int64_t kRowsPerLine = 16;
  fd_threads::ParallelFor((p.m + kRowsPerLine - 1) / kRowsPerLine, threads, [&](int64_t block) {
    for (int64_t row = block * kRowsPerLine; row < std::min(p.m, (block + 1) * kRowsPerLine); ++row) {
      fd_linear::QuantizeRow8(p.x + row * p.k, p.k, p.m, xq + 2 * row, step + row, qsum + row);
    }
  });
  p.x_q8 = xq;
  p.x_step = step;
  p.x_qsum = qsum;
  return true;
}
#endif

// The per-call copies of the activations some paths read: 8-bit x for vpmaddubsw, 16-bit x for
// vpdpbusd or vpmaddwd, bf16-rounded x for vdpbf16ps, or the per-group sums of x for the zero
// points of the few-row 8-bit kernel.
void PrepareActivations(fd_linear::Problem& p, int bf16_dot_min_rows, int vnni, int num_threads) {
#if FD_LINEAR_S8
  if (PrepareS8(p, vnni, num_threads)) return;
#endif
#if FD_LINEAR_ACT16
  // 4-bit panels: the 16-bit kernel up to kU4Act16MaxRows rows (a single row whatever vnni says:
  // it is the only few-row kernel they have), the fp32 tiles on dequantized slices beyond.
#if FD_LINEAR_S8
  if (p.format == fd_linear::kFormatU4) {
    p.vnni = p.m <= fd_linear::kU4Act16MaxRows;
  } else
#endif
  {
    p.vnni = vnni != 0 && p.format == fd_linear::kFormatU8 && fd_linear::VnniGroupOk(p.group) &&
             p.m <= fd_linear::kAct16MaxRows;
  }
  if (p.vnni) {
    const int64_t groups = p.k / p.group;
    float* step = fd_linear::ScratchArray<float, 1>(p.m * groups);
    float* qsum = fd_linear::ScratchArray<float, 2>(p.m * groups);
    const int threads = p.m * p.k >= (1 << 15) ? std::max(num_threads, 1) : 1;
#ifdef __AVX512F__
    int8_t* hi = fd_linear::ScratchArray<int8_t, 0>(p.m * p.k);
    int8_t* lo = fd_linear::ScratchArray<int8_t, 1>(p.m * p.k);
    fd_threads::ParallelFor(p.m, threads, [&](int64_t row) {
      fd_linear::QuantizeRow16(p.x + row * p.k, p.k, p.group, hi + row * p.k, lo + row * p.k, step + row * groups,
                               qsum + row * groups);
    });
    p.x_hi = hi;
    p.x_lo = lo;
#else
    int16_t* xq = fd_linear::ScratchArray<int16_t, 0>(p.m * p.k);
    fd_threads::ParallelFor(p.m, threads, [&](int64_t row) {
      fd_linear::QuantizeRow16(p.x + row * p.k, p.k, p.group, xq + row * p.k, step + row * groups,
                               qsum + row * groups);
    });
    p.x_q16 = xq;
#endif
    p.x_step = step;
    p.x_qsum = qsum;
    return;
  }
#endif
  p.bf16_dot = kHaveBF16Dot && p.format != fd_linear::kFormatF32 && bf16_dot_min_rows > 0 &&
               p.m >= bf16_dot_min_rows;
#ifdef __AVX512BF16__
  if (p.bf16_dot) {
    uint16_t* x_bf16 = fd_linear::ScratchArray<uint16_t, 0>(p.m * p.k);
    fd_linear::RoundToBF16(p.x, p.m, p.k, x_bf16, num_threads);
    p.x_bf16 = x_bf16;
    return;
  }
#endif
  if (p.format == fd_linear::kFormatU8 && p.m <= fd_linear::kMaxRows) {
    const int64_t groups = p.k / p.group;
    float* xsum = fd_linear::ScratchArray<float, 0>(p.m * groups);
    for (int64_t row = 0; row < p.m; ++row) {
      for (int64_t g = 0; g < groups; ++g) {
        const float* x = p.x + row * p.k + g * p.group;
        float sum = 0.f;
        for (int64_t i = 0; i < p.group; ++i) sum += x[i];
        xsum[row * groups + g] = sum;
      }
    }
    p.xsum = xsum;
  }
}
#endif

}  // namespace

paddle::Tensor fd_linear::Forward(const paddle::Tensor& x, const paddle::Tensor& packed_w,
                                  const paddle::Tensor& bias, const LinearArgs& args) {
  CheckInputs(x, packed_w, bias, args);
  const int64_t m = x.shape()[0];
  const int64_t k = x.shape()[1];
  paddle::Tensor y = paddle::empty({m, args.n}, paddle::DataType::FLOAT32, x.place());
  if (m == 0) return y;
#if FD_LINEAR_SIMD
  Problem p;
  p.m = m;
  p.k = k;
  p.n = args.n;
  p.format = args.format;
  p.group = args.group;
  p.panel_bytes = PanelRowBytes(args.format, k, args.group);
  const int64_t panels = (args.n + kPanel - 1) / kPanel;
#if FD_LINEAR_S8
  // 8-bit-grid codes two to a byte: the size of 4-bit panels.
  if (args.format == kFormatU8 && args.group == kS8Group &&
      packed_w.numel() == panels * PanelRowBytes(kFormatU4, k, args.group)) {
    p.format = kFormatU4;
    p.panel_bytes = PanelRowBytes(kFormatU4, k, args.group);
  }
#endif
  PD_CHECK(packed_w.numel() == panels * p.panel_bytes, "packed weights hold ", packed_w.numel(),
           " bytes, expected ", panels * p.panel_bytes, " for K=", k, " N=", args.n,
           kS8Rows > 0 && args.format == kFormatU8 ? " (8-bit panels; 4-bit ones with group 32)" : "");
  const paddle::Tensor x_c = Contiguous(x);
  const paddle::Tensor w_c = Contiguous(packed_w);
  const paddle::Tensor b_c = Contiguous(bias);
  p.x = x_c.data<float>();
  p.w = w_c.data<uint8_t>();
  p.bias = bias.numel() > 0 ? b_c.data<float>() : nullptr;
  p.y = y.data<float>();
  PrepareActivations(p, args.bf16_dot_min_rows, args.vnni, args.num_threads);
  p.stream_output = m * args.n * 4 >= kStreamOutputBytes && args.n % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.y) % 64 == 0;
  Run(p, args.num_threads);
#endif
  return y;
}

namespace {

// fd_linear(x [M, K] fp32, packed_w uint8, bias fp32 [N] or [0]) -> y [M, N] fp32.
// format: 0 fp32, 1 bf16, 2 8-bit grid (group = rows per scale and zero): u8 panels, or in AVX2 builds
// with group 32 u4 ones, told apart by the size (16-bit activations; with vnni = 2, 8-bit ones from
// kS8MinRows rows on: linear_s8.h). vnni: 1 = u8 panels multiply 16-bit activations (when
// VnniGroupOk(group); vpdpbusd at any M with AVX512-VNNI, vpmaddwd up to kAct16MaxRows rows with
// AVX2).
// bf16_dot_min_rows: otherwise use vdpbf16ps with bf16-rounded activations when M >= this
// (0 = never; bf16 and u8 formats only).
std::vector<paddle::Tensor> LinearKernel(const paddle::Tensor& x, const paddle::Tensor& packed_w,
                                         const paddle::Tensor& bias, int64_t n, int format, int group,
                                         int bf16_dot_min_rows, int vnni, int num_threads) {
  return {fd_linear::Forward(x, packed_w, bias, {n, format, group, bf16_dot_min_rows, vnni, num_threads})};
}

std::vector<std::vector<int64_t>> LinearInferShape(const std::vector<int64_t>& x_shape,
                                                   const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                   const int64_t& n, const int&, const int&, const int&,
                                                   const int&, const int&) {
  return {{x_shape.empty() ? 0 : x_shape[0], n}};
}

std::vector<paddle::DataType> LinearInferDtype(const paddle::DataType&, const paddle::DataType&,
                                               const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

// fd_linear_caps(any) -> int32 [5]: {vector width in bits of the kernels built (512 for AVX-512,
// 256 for AVX2 + FMA, 0 = none: fd_linear would refuse), vdpbf16ps kernels built, the most rows a
// call with vnni set runs the 16-bit-activation kernels for (0 = not built; vpdpbusd with
// AVX512-VNNI: any M, vpmaddwd with AVX2: few rows), the fewest rows a call on 4-bit panels runs
// the 8-bit-activation kernel for (0 = 4-bit panels not built), the most rows such a call runs the
// 16-bit kernel for otherwise}.
std::vector<paddle::Tensor> LinearCapsKernel(const paddle::Tensor& probe) {
  paddle::Tensor caps = paddle::empty({5}, paddle::DataType::INT32, paddle::CPUPlace());
  caps.data<int32_t>()[0] = kHaveAvx512 ? 512 : kHaveKernels ? 256 : 0;
  caps.data<int32_t>()[1] = kHaveBF16Dot ? 1 : 0;
  caps.data<int32_t>()[2] = kAct16Rows;
  caps.data<int32_t>()[3] = kS8Rows;
  caps.data<int32_t>()[4] = kU4Act16Rows;
  return {caps};
}

}  // namespace

PD_BUILD_OP(fd_linear)
    .Inputs({"X", "PackedW", "Bias"})
    .Outputs({"Out"})
    .Attrs({"n: int64_t", "format: int", "group: int", "bf16_dot_min_rows: int", "vnni: int", "num_threads: int"})
    .SetKernelFn(PD_KERNEL(LinearKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LinearInferDtype));

PD_BUILD_OP(fd_linear_caps)
    .Inputs({"Probe"})
    .Outputs({"Caps"})
    .SetKernelFn(PD_KERNEL(LinearCapsKernel));
