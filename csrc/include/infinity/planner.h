// Prefetch planner: which tensors stay resident in which tier, and where each access is served
// from. Plain C++17, no Python or torch headers.
//
// The model: tensors live on disk; an access needs its tensor on the GPU. A tensor comes to the
// GPU from the pinned tier (one host->GPU copy) or from disk (a read into pinned memory, then a
// copy). Each tier's budget is split into a cache (copies kept between accesses) and a stream
// reserve (buffers that hold a copy only for the access that fetched it, which is what lets
// reads run ahead of compute). The planner decides, for every access of the trace (the order
// repeated `repeats` times), where it is served from and whether the fetched copy is kept.
//
// Write-back: an access may dirty its tensor (`writes`): after that step its GPU copy holds new
// contents that must reach pinned memory (a GPU -> pinned copy-back) and the disk (a write). A
// dirty tensor kept in the pinned cache stays dirty there between passes (a write-back cache)
// and one kept on the GPU stays dirty on the GPU, until evicted or flushed; the others are
// written at once through a pinned write buffer (the planner reserves one of the largest
// dirtied tensor, so that a write-back can always progress).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace infinity {

struct Bandwidths {  // bytes per second
  double disk_read = 1.6e9;
  double disk_write = 2.3e9;
  double h2d = 55e9;
  double d2h = 40e9;
};

enum Source : uint8_t { kFromGpu = 0, kFromPinned = 1, kFromDisk = 2 };

struct PlanInput {
  std::vector<uint64_t> sizes;    // bytes of tensor i
  std::vector<int32_t> order;     // tensor ids in access order (one pass)
  uint32_t repeats = 1;
  uint64_t gpu_bytes = 0;
  uint64_t pinned_bytes = 0;
  Bandwidths bandwidths;
  std::vector<double> compute_s;  // seconds of compute per position of `order`; empty = 0
  // Stream buffers of the largest tensor per tier (GPU: 1 or 2; pinned: 0, 1 or 2, where 0
  // reads straight to the GPU); -1: the planner simulates every choice and keeps the fastest.
  int gpu_stream_buffers = -1, pinned_stream_buffers = -1;
  std::vector<uint8_t> writes;    // per position of `order`: the access dirties its tensor;
                                  // empty = read-only
};

struct Plan {
  PlanInput input;
  std::vector<int32_t> trace;        // order repeated `repeats` times
  std::vector<uint8_t> source;       // per step: where the planner expects the tensor to be
  std::vector<uint8_t> keep_gpu;     // per step: the GPU copy fetched here is kept (cache)
  std::vector<uint8_t> keep_pinned;  // per step: the disk read here goes into the pinned cache
  // (step, tensor): drop that cached copy before the fetch of `step` is admitted
  std::vector<std::pair<int64_t, int32_t>> evict_gpu, evict_pinned;
  std::vector<int32_t> resident_gpu, resident_pinned;  // cached once and never dropped
  uint64_t gpu_stream_bytes = 0, pinned_stream_bytes = 0;
  uint64_t gpu_cache_bytes = 0, pinned_cache_bytes = 0;
  uint64_t pinned_write_bytes = 0;  // pinned reserve kept free for write-back (0: read-only)
  bool cyclic = false;  // the order visits each tensor once: static residency was used
  double compute_at(int64_t step) const;
  bool writes_at(int64_t step) const;  // the access at trace index `step` dirties its tensor
};

// Throws std::invalid_argument (bad ids, sizes, bandwidths) or CapacityError (a tensor larger
// than a tier's budget allows), with the numbers.
Plan make_plan(const PlanInput& in);

struct SimResult {
  double time_s = 0, bound_s = 0;
  uint64_t disk_read_bytes = 0, h2d_bytes = 0;
  uint64_t peak_gpu_bytes = 0, peak_pinned_bytes = 0;
  double disk_busy_s = 0, h2d_busy_s = 0, compute_s = 0, stall_s = 0;
  std::vector<double> step_end_s;  // when each step's compute ended
  uint64_t disk_write_bytes = 0, d2h_bytes = 0;
  double d2h_busy_s = 0;
  uint64_t transfers = 0;  // transfer actions issued (each one done() event)
};

// The lower bound for the plan's trace from the empty state, with the final flush. W: bytes of
// the distinct tensors of a pass, D: of those it dirties, G, P: the GPU and pinned budgets,
// R: repeats, M = G + P.
//   reads  >= W + (R-1) max(0, W - M)     h2d >= W + (R-1) max(0, W - G)
//   writes >= D + (R-1) max(0, D - M)     d2h >= D + (R-1) max(0, D - G)
//   time   >= max(reads/disk_read + writes/disk_write (one disk), h2d/h2d, d2h/d2h, compute)
// Why: between a tensor's last access in a pass and its first in the next, it either stays in
// memory (GPU or pinned, at most M bytes of tensors at the pass boundary) or is read again, and
// if it was dirtied, also written in that window; GPU alone: G bytes, else a copy each way.
// Keeping dirty tensors saves the most, so the minimum over what is kept is the sum above. The
// last pass's dirty data all reaches the disk at the flush (D written, D copied back).
double bound_seconds(const PlanInput& in);

// Runs the online Scheduler (scheduler.h) on this plan against a simulated clock: one disk
// serving reads and writes in issue order (at disk_read and disk_write), one host->GPU and one
// GPU->host link, compute per step; then flushes the dirty data and counts that in the time.
SimResult simulate(const Plan& plan);

}  // namespace infinity
