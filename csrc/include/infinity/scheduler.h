// Online prefetch scheduler: fed "step started" and "transfer done" events, it returns the next
// transfers and frees to issue. Plain C++17; cheap per event (no allocation in steady state
// beyond the returned actions).
//
// It executes a Plan (planner.h) but decides from the actual state of each tensor, so when the
// observed accesses diverge from the planned trace (another prompt length, MoE routing) it
// re-synchronises on the next planned occurrence of the tensor asked for, or fetches an unplanned
// tensor on demand, instead of switching prefetch off. Not thread-safe: one executor thread (or a
// lock) feeds it.
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
};

struct Action {
  int64_t id;       // done(id) reports completion of a kRead / kCopy / kReadToGpu
  uint8_t kind;
  int32_t tensor;
  int64_t step;     // the step it serves (-1: unplanned demand)
  uint64_t nbytes;
  uint8_t cached;   // the buffer is a cache entry (kept across steps)
};

struct SchedulerStats {
  uint64_t steps = 0, events = 0, divergences = 0, demand_fetches = 0;
  uint64_t reads = 0, copies = 0, gpu_hits = 0, pinned_hits = 0;
  uint64_t gpu_used = 0, pinned_used = 0, peak_gpu = 0, peak_pinned = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const Plan& plan);  // keeps a copy of the plan

  std::vector<Action> start();                 // the first reads and copies
  std::vector<Action> step(int32_t tensor);    // a step needing `tensor` begins
  std::vector<Action> done(int64_t action_id); // a kRead or kCopy finished
  bool on_gpu(int32_t tensor) const;           // its GPU copy has arrived
  int64_t position() const { return cursor_; }
  const SchedulerStats& stats() const { return stats_; }

 private:
  enum State : uint8_t { kNone = 0, kLoading = 1, kReady = 2 };
  static constexpr int64_t kCache = -1, kDemand = -2;
  struct Copy {
    uint8_t state = kNone;
    int64_t owner = kCache;  // kCache, kDemand or the step it was fetched for
    bool evicting = false;   // dropped from the cache; free when its last user is done
  };
  struct Tensor {
    Copy gpu, pinned;
    int32_t pinned_users = 0;  // copies reading the pinned buffer
  };
  struct Pending {
    uint8_t kind;
    int32_t tensor;
  };

  int64_t index(int64_t step) const;  // steps past the trace repeat its last pass
  bool usable(int32_t tensor, bool gpu, int64_t step) const;
  bool releasable(int32_t tensor, bool gpu) const;
  void pump(std::vector<Action>& out);
  bool issue_read(int64_t step, std::vector<Action>& out);
  bool issue_copy(int64_t step, std::vector<Action>& out);
  bool read_to_gpu(int64_t step, std::vector<Action>& out);
  enum Room { kNoCacheRoom = 0, kCacheRoom = 1, kWaitForRoom = 2 };
  int cache_room(bool gpu, int64_t i, uint64_t size) const;
  bool stream_fits(bool gpu, uint64_t size) const;
  bool tier_fits(bool gpu, uint64_t size) const;
  void apply_evictions(bool gpu, int64_t step, std::vector<Action>& out);
  bool demand(int32_t tensor, std::vector<Action>& out);  // true once its copy is issued
  void make_room(bool gpu, uint64_t nbytes, std::vector<Action>& out);
  void evict(int32_t tensor, bool gpu);
  void free_copy(int32_t tensor, bool gpu, std::vector<Action>& out);
  void collect(std::vector<Action>& out);  // give back every copy nothing needs any more
  void emit(std::vector<Action>& out, uint8_t kind, int32_t tensor, int64_t step, bool cached);

  Plan plan_;
  std::vector<Tensor> tensors_;
  std::vector<std::vector<int32_t>> evict_gpu_at_, evict_pinned_at_;  // by trace index
  std::vector<Pending> pending_;  // by action id
  uint64_t gpu_cache_used_ = 0, gpu_stream_used_ = 0;
  uint64_t pinned_cache_used_ = 0, pinned_stream_used_ = 0;
  uint64_t gpu_evicting_ = 0, pinned_evicting_ = 0;  // cache bytes waiting for their last user
  int64_t cursor_ = -1, read_cursor_ = 0, copy_cursor_ = 0;
  int64_t finished_ = -1;  // steps up to this one are over (their GPU buffers can go)
  int64_t next_id_ = 0;
  int32_t demanded_ = -1;
  int64_t evicted_gpu_step_ = -1, evicted_pinned_step_ = -1;
  std::vector<int64_t> last_use_gpu_, last_use_pinned_;  // last step planned to read the copy
  std::vector<int32_t> live_;  // tensors holding a copy that is not a settled cache entry
  SchedulerStats stats_;
};

}  // namespace infinity
