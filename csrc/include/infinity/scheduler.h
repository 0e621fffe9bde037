// Online prefetch and write-back scheduler: fed "step started" and "transfer done" events, it
// returns the next transfers and frees to issue. Plain C++17; cheap per event (no allocation in
// steady state beyond the returned actions).
//
// It executes a Plan (planner.h) but decides from the actual state of each tensor, so when the
// observed accesses diverge from the planned trace (another prompt length, MoE routing) it
// re-synchronises on the next planned occurrence of the tensor asked for, or fetches an unplanned
// tensor on demand, instead of switching prefetch off. Not thread-safe: one executor thread (or a
// lock) feeds it.
//
// Write-back: a step that writes its tensor (Plan input `writes`, or step(x, 1)) leaves the GPU
// copy dirty when it ends. A dirty GPU copy goes back to pinned memory (kCopyBack) as soon as
// the step has ended, except a GPU cache entry the plan keeps, which stays dirty on the GPU
// until it is evicted or flushed. A dirty pinned copy goes to disk (kWrite) at once, except a
// pinned cache entry the plan keeps, which stays dirty there until it is evicted or flushed (a
// write-back cache). The newest contents of a tensor are never read from disk while a copy of
// them is dirty or being written, and a dirty copy is never freed.
#pragma once

#include <cstdint>
#include <vector>

#include "infinity/planner.h"

namespace infinity {

enum ActionKind : uint8_t {
  kRead = 0,        // disk -> a pinned buffer of `nbytes` (allocate it first)
  kCopy = 1,        // pinned -> a GPU buffer of `nbytes` (allocate it first)
  kFreePinned = 2,  // the tensor's pinned buffer can be given back
  kFreeGpu = 3,     // the tensor's GPU buffer can be given back
  kReadToGpu = 4,   // disk -> a GPU buffer of `nbytes` directly (allocate it first)
  kCopyBack = 5,    // GPU -> the tensor's pinned buffer (allocate one of `nbytes` if it has none)
  kWrite = 6,       // the tensor's pinned buffer -> disk
};

struct Action {
  int64_t id;       // done(id) reports completion of a transfer (every kind but the frees)
  uint8_t kind;
  int32_t tensor;
  int64_t step;     // the step it serves, or that dirtied the data written (-1: unplanned)
  uint64_t nbytes;
  uint8_t cached;   // the pinned or GPU buffer is a cache entry (kept across steps)
};

struct SchedulerStats {
  uint64_t steps = 0, events = 0, divergences = 0, demand_fetches = 0;
  uint64_t reads = 0, copies = 0, gpu_hits = 0, pinned_hits = 0;
  uint64_t copy_backs = 0, writes = 0, dirty_steps = 0;
  uint64_t gpu_used = 0, pinned_used = 0, peak_gpu = 0, peak_pinned = 0;
};

class Scheduler {
 public:
  // past_end: steps past the trace repeat its last pass and are prefetched; false stops the
  // prefetch at the trace's end (simulate: the flush that follows waits for no wasted read).
  explicit Scheduler(const Plan& plan, bool past_end = true);  // keeps a copy of the plan

  std::vector<Action> start();  // the first reads and copies
  // A step needing `tensor` begins (and the previous one ends). write: 1 the step writes its
  // tensor, 0 it only reads it, -1 as the plan says at the matched position (an unplanned step
  // only reads).
  std::vector<Action> step(int32_t tensor, int write = -1);
  std::vector<Action> finish();  // the current step ends; no other begins
  // finish(), then write every dirty copy back to disk, cache entries included; flushed() says
  // when that is done. New steps may go on meanwhile.
  std::vector<Action> flush();
  std::vector<Action> done(int64_t action_id);  // a transfer finished
  // Its GPU copy has arrived and the current step may use it (a step that writes its tensor
  // also waits for a copy-back still reading it).
  bool on_gpu(int32_t tensor) const;
  bool flushed() const { return flush_pending_ == 0; }  // what flush() asked for is on disk
  int64_t position() const { return cursor_; }
  const SchedulerStats& stats() const { return stats_; }

 private:
  enum State : uint8_t { kNone = 0, kLoading = 1, kReady = 2 };
  // Budgets a buffer is charged to.
  enum Pool : uint8_t { kGpuCache, kGpuStream, kPinnedCache, kPinnedStream, kPinnedWrite };
  static constexpr int64_t kCache = -1, kDemand = -2, kWriteBack = -3;
  struct Copy {
    uint8_t state = kNone;   // kLoading: a read, copy or copy-back into it is in flight
    uint8_t pool = kGpuCache;
    int64_t owner = kCache;  // kCache, kDemand, kWriteBack (pinned) or the step fetched for
    bool evicting = false;   // dropped from the cache; free when its last user is done
    bool dirty = false;      // newer than the tier below it (and the disk)
    bool busy = false;       // GPU: a copy-back reads it; pinned: a write reads it
  };
  struct Tensor {
    Copy gpu, pinned;
    int32_t pinned_users = 0;  // copies reading the pinned buffer
    int64_t dirty_step = -1;   // the last step that wrote it
    bool flush = false;        // flush() asked for it to reach the disk
    bool queued = false;       // in writeback_
  };
  struct Pending {
    uint8_t kind;
    int32_t tensor;
  };

  int64_t index(int64_t step) const;  // steps past the trace repeat its last pass
  int64_t prev_writer(int64_t step) const;  // the last planned step before it writing its tensor
  bool writer_pending(int32_t tensor, int64_t step) const;
  bool usable(int32_t tensor, bool gpu, int64_t step) const;
  bool releasable(int32_t tensor, bool gpu) const;
  void pump(std::vector<Action>& out);
  bool issue_read(int64_t step, std::vector<Action>& out);
  bool issue_copy(int64_t step, std::vector<Action>& out);
  bool read_to_gpu(int64_t step, std::vector<Action>& out);
  enum Room { kNoCacheRoom = 0, kCacheRoom = 1, kWaitForRoom = 2 };
  int cache_room(bool gpu, int64_t step, uint64_t size) const;
  bool fits(bool gpu, uint64_t size) const;  // a read, copy or cache admission
  uint64_t write_headroom() const;
  void apply_evictions(bool gpu, int64_t step, std::vector<Action>& out);
  bool demand(int32_t tensor, std::vector<Action>& out);  // true once its copy is issued
  void make_room(bool gpu, uint64_t nbytes, int64_t after, std::vector<Action>& out,
                 bool for_write = false);
  void evict(int32_t tensor, bool gpu);
  void alloc(int32_t tensor, bool gpu, Pool pool, int64_t owner);
  void free_copy(int32_t tensor, bool gpu, std::vector<Action>& out);
  void collect(std::vector<Action>& out);  // give back every copy nothing needs any more
  void end_step();                         // the current step is over: mark its writes
  void queue(int32_t tensor);
  void write_back(std::vector<Action>& out);  // copy-backs and writes due now (first in pump)
  bool copy_back(int32_t tensor, std::vector<Action>& out);
  bool write(int32_t tensor, std::vector<Action>& out);
  bool wants_write_back(int32_t tensor) const;
  void settle_flush(int32_t tensor);
  void emit(std::vector<Action>& out, uint8_t kind, int32_t tensor, int64_t step, bool cached);

  Plan plan_;
  bool past_end_;
  std::vector<Tensor> tensors_;
  std::vector<std::vector<int32_t>> evict_gpu_at_, evict_pinned_at_;  // by trace index
  std::vector<uint8_t> writes_;        // by trace index
  std::vector<int64_t> prev_write_;    // by trace index: the last earlier index writing it, -1
  std::vector<int64_t> last_writer_;   // by tensor: its last writing index in the last pass
  std::vector<Pending> pending_;       // by action id
  uint64_t used_[5] = {0, 0, 0, 0, 0};  // bytes by Pool
  uint64_t gpu_evicting_ = 0, pinned_evicting_ = 0;  // cache bytes waiting for their last user
  int64_t cursor_ = -1, read_cursor_ = 0, copy_cursor_ = 0;
  int64_t read_high_ = 0, copy_high_ = 0;  // the furthest each cursor has been
  int64_t finished_ = -1;  // steps up to this one are over (their GPU buffers can go)
  int64_t next_id_ = 0;
  int32_t demanded_ = -1;
  int32_t current_ = -1;       // the tensor of the step being computed (-1: none)
  bool current_writes_ = false;
  int64_t current_step_ = -1;  // its planned step (-1: unplanned)
  int64_t flush_pending_ = 0;  // tensors flush() asked for that are not on disk yet
  int64_t evicted_gpu_step_ = -1, evicted_pinned_step_ = -1;
  std::vector<int64_t> last_use_gpu_, last_use_pinned_;  // last step planned to read the copy
  std::vector<int32_t> live_;       // tensors holding a copy that is not a settled cache entry
  std::vector<int32_t> writeback_;  // tensors with a copy-back or write to issue
  SchedulerStats stats_;
};

}  // namespace infinity
