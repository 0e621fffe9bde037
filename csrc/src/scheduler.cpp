// Online prefetch scheduler (scheduler.h).
//
// Two cursors run ahead of the step being computed: the read cursor issues disk reads into
// pinned buffers, the copy cursor issues host->GPU copies, each in step order and each as far
// as its budget (cache or stream reserve) allows. A stream buffer belongs to one step and is
// freed when that step is over (GPU) or its copy is done (pinned); a cache entry stays until
// the plan evicts it and its last user is done.
#include "infinity/scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "infinity/arena.h"  // CapacityError

namespace infinity {

Scheduler::Scheduler(const Plan& plan)
    : plan_(plan),
      tensors_(plan.input.sizes.size()),
      evict_gpu_at_(plan.trace.size()),
      evict_pinned_at_(plan.trace.size()) {
  for (const auto& [step, id] : plan_.evict_gpu) evict_gpu_at_[step].push_back(id);
  for (const auto& [step, id] : plan_.evict_pinned) evict_pinned_at_[step].push_back(id);
  last_use_gpu_.assign(tensors_.size(), -1);
  last_use_pinned_.assign(tensors_.size(), -1);
}

int64_t Scheduler::index(int64_t step) const {
  const auto steps = static_cast<int64_t>(plan_.trace.size());
  if (step < steps) return step;
  const auto m = static_cast<int64_t>(plan_.input.order.size());
  return steps - m + (step - (steps - m)) % m;
}

// A copy serves `step` if it was fetched for it or for a later step (it stays until that one),
// or is a cache entry that is not being dropped (or is, but only after `step`, which was planned
// to read it before).
bool Scheduler::usable(int32_t tensor, bool gpu, int64_t step) const {
  const Copy& c = gpu ? tensors_[tensor].gpu : tensors_[tensor].pinned;
  if (c.state == kNone) return false;
  if (c.owner >= step) return true;
  if (c.owner != kCache) return false;
  return !c.evicting || step <= (gpu ? last_use_gpu_ : last_use_pinned_)[tensor];
}

void Scheduler::emit(std::vector<Action>& out, uint8_t kind, int32_t tensor, int64_t step,
                     bool cached) {
  const uint64_t nbytes = plan_.input.sizes[tensor];
  Action a{-1, kind, tensor, step, nbytes, uint8_t(cached)};
  const bool transfer = kind == kRead || kind == kCopy || kind == kReadToGpu;
  if (transfer) {
    a.id = next_id_++;
    pending_.push_back({kind, tensor});
  }
  const bool gpu = kind == kCopy || kind == kFreeGpu || kind == kReadToGpu;
  uint64_t& pool = gpu ? (cached ? gpu_cache_used_ : gpu_stream_used_)
                       : (cached ? pinned_cache_used_ : pinned_stream_used_);
  if (transfer) {
    pool += nbytes;
  } else {
    pool -= nbytes;
  }
  stats_.gpu_used = gpu_cache_used_ + gpu_stream_used_;
  stats_.pinned_used = pinned_cache_used_ + pinned_stream_used_;
  stats_.peak_gpu = std::max(stats_.peak_gpu, stats_.gpu_used);
  stats_.peak_pinned = std::max(stats_.peak_pinned, stats_.pinned_used);
  if (kind == kRead || kind == kReadToGpu) ++stats_.reads;
  if (kind == kCopy) ++stats_.copies;
  out.push_back(a);
}

void Scheduler::free_copy(int32_t tensor, bool gpu, std::vector<Action>& out) {
  Copy& c = gpu ? tensors_[tensor].gpu : tensors_[tensor].pinned;
  emit(out, gpu ? kFreeGpu : kFreePinned, tensor, c.owner, c.owner == kCache);
  if (c.evicting) (gpu ? gpu_evicting_ : pinned_evicting_) -= plan_.input.sizes[tensor];
  c = Copy{};
  live_.erase(std::remove(live_.begin(), live_.end(), tensor), live_.end());
  if (tensors_[tensor].gpu.state != kNone || tensors_[tensor].pinned.state != kNone)
    live_.push_back(tensor);
}

// A copy may be given back once nothing planned or in flight still reads it.
bool Scheduler::releasable(int32_t tensor, bool gpu) const {
  const Tensor& t = tensors_[tensor];
  const Copy& c = gpu ? t.gpu : t.pinned;
  if (c.state != kReady) return false;
  if (gpu) {
    if (c.owner == kCache) return c.evicting && last_use_gpu_[tensor] <= finished_;
    if (c.owner == kDemand) return demanded_ != tensor;
    return c.owner <= finished_;
  }
  if (t.pinned_users > 0) return false;
  if (c.owner == kCache) return c.evicting && last_use_pinned_[tensor] < copy_cursor_;
  if (c.owner == kDemand) return t.gpu.state == kReady || demanded_ != tensor;
  return c.owner < copy_cursor_ || t.gpu.owner == c.owner;  // its copy was issued
}

void Scheduler::collect(std::vector<Action>& out) {
  auto settled = [](const Copy& c) {
    return c.state == kNone || (c.state == kReady && c.owner == kCache && !c.evicting);
  };
  for (size_t i = 0; i < live_.size();) {
    const int32_t x = live_[i];
    if (releasable(x, true)) free_copy(x, true, out);
    if (releasable(x, false)) free_copy(x, false, out);
    const Tensor& t = tensors_[x];
    auto at = std::find(live_.begin(), live_.end(), x);
    if (at != live_.end() && settled(t.gpu) && settled(t.pinned) && t.pinned_users == 0) {
      live_.erase(at);  // nothing left to watch until an eviction
      continue;
    }
    if (i < live_.size() && live_[i] == x) ++i;
  }
}

void Scheduler::evict(int32_t tensor, bool gpu) {
  Copy& c = gpu ? tensors_[tensor].gpu : tensors_[tensor].pinned;
  if (c.state == kNone || c.owner != kCache || c.evicting) return;
  c.evicting = true;
  (gpu ? gpu_evicting_ : pinned_evicting_) += plan_.input.sizes[tensor];
  if (std::find(live_.begin(), live_.end(), tensor) == live_.end()) live_.push_back(tensor);
}

// The plan's evictions at `step` for one tier, once however often the cursor retries it. A copy
// whose last reader is already done is given back at once: no later event may come to do it
// (after a jump nothing need be in flight).
void Scheduler::apply_evictions(bool gpu, int64_t step, std::vector<Action>& out) {
  int64_t& done_step = gpu ? evicted_gpu_step_ : evicted_pinned_step_;
  if (done_step == step) return;
  const auto& victims = (gpu ? evict_gpu_at_ : evict_pinned_at_)[index(step)];
  for (int32_t v : victims) evict(v, gpu);
  done_step = step;
  if (!victims.empty()) collect(out);
}

// A stream buffer fits the tier's stream reserve, or borrows cache space that nothing holds yet
// (in the first pass the caches fill only as the plan reaches their tensors), so that a stall
// in compute does not stop the disk; the tier's total stays within its budget and a cache
// admission waits until the borrowed bytes are back (cache_room).
bool Scheduler::stream_fits(bool gpu, uint64_t size) const {
  const uint64_t streaming = gpu ? gpu_stream_used_ : pinned_stream_used_;
  const uint64_t reserve = gpu ? plan_.gpu_stream_bytes : plan_.pinned_stream_bytes;
  return streaming + size <= reserve || tier_fits(gpu, size);
}

// `size` more bytes fit the tier's whole budget (cache + stream reserve, whoever holds them).
bool Scheduler::tier_fits(bool gpu, uint64_t size) const {
  const uint64_t used = gpu ? gpu_cache_used_ + gpu_stream_used_
                            : pinned_cache_used_ + pinned_stream_used_;
  const uint64_t budget = gpu ? plan_.gpu_cache_bytes + plan_.gpu_stream_bytes
                              : plan_.pinned_cache_bytes + plan_.pinned_stream_bytes;
  return used + size <= budget;
}

// Whether a fetch for trace index `i` goes into the tier's cache: kCacheRoom when the plan
// keeps it and it fits; kWaitForRoom when it will fit once the planned evictions' last readers
// are done; kNoCacheRoom otherwise (the caller streams it).
int Scheduler::cache_room(bool gpu, int64_t i, uint64_t size) const {
  if (!(gpu ? plan_.keep_gpu : plan_.keep_pinned)[i]) return kNoCacheRoom;
  const uint64_t used = gpu ? gpu_cache_used_ : pinned_cache_used_;
  const uint64_t cap = gpu ? plan_.gpu_cache_bytes : plan_.pinned_cache_bytes;
  if (used + size <= cap)  // and what streams borrowed from the cache is back
    return tier_fits(gpu, size) ? kCacheRoom : kWaitForRoom;
  return used - (gpu ? gpu_evicting_ : pinned_evicting_) + size <= cap ? kWaitForRoom
                                                                      : kNoCacheRoom;
}

bool Scheduler::issue_read(int64_t step, std::vector<Action>& out) {
  const int64_t i = index(step);
  const int32_t x = plan_.trace[i];
  Tensor& t = tensors_[x];
  apply_evictions(false, step, out);
  if (plan_.source[i] == kFromGpu && usable(x, true, step)) return true;
  if (usable(x, true, step) && t.gpu.owner == step) return true;  // already fetched for it
  if (usable(x, false, step)) {
    last_use_pinned_[x] = std::max(last_use_pinned_[x], step);
    return true;
  }
  if (t.pinned.state != kNone) return false;  // another step's copy: wait until it is freed
  const uint64_t size = plan_.input.sizes[x];
  const int room = cache_room(false, i, size);
  if (room == kWaitForRoom) return false;
  const bool cache = room == kCacheRoom;
  if (!cache && plan_.pinned_stream_bytes == 0) {
    // GPU buffers go to steps in order: a later step must not take the one an earlier copy needs
    return copy_cursor_ == step && read_to_gpu(step, out);
  }
  if (!cache && !stream_fits(false, size)) return false;
  t.pinned = Copy{kLoading, cache ? kCache : step, false};
  if (cache) last_use_pinned_[x] = step;
  live_.push_back(x);
  emit(out, kRead, x, step, cache);
  return true;
}

// No pinned stream buffers (plan.pinned_stream_bytes == 0): a tensor not kept in pinned memory
// is read from disk straight into its GPU buffer (the aio engine's small bounce buffers do it).
bool Scheduler::read_to_gpu(int64_t step, std::vector<Action>& out) {
  const int64_t i = index(step);
  const int32_t x = plan_.trace[i];
  Tensor& t = tensors_[x];
  if (t.gpu.state != kNone) return false;  // another step's copy: wait until it is freed
  apply_evictions(true, step, out);
  const uint64_t size = plan_.input.sizes[x];
  const int room = cache_room(true, i, size);
  if (room == kWaitForRoom) return false;
  const bool cache = room == kCacheRoom;
  if (!cache && !stream_fits(true, size)) return false;
  t.gpu = Copy{kLoading, cache ? kCache : step, false};
  last_use_gpu_[x] = std::max(last_use_gpu_[x], step);
  if (std::find(live_.begin(), live_.end(), x) == live_.end()) live_.push_back(x);
  emit(out, kReadToGpu, x, step, cache);
  return true;
}

bool Scheduler::issue_copy(int64_t step, std::vector<Action>& out) {
  const int64_t i = index(step);
  const int32_t x = plan_.trace[i];
  Tensor& t = tensors_[x];
  apply_evictions(true, step, out);
  if (usable(x, true, step)) {
    last_use_gpu_[x] = std::max(last_use_gpu_[x], step);
    return true;
  }
  if (!usable(x, false, step)) {
    if (t.pinned.state == kNone && read_cursor_ > step) read_cursor_ = step;  // lost: re-read
    return false;
  }
  if (t.pinned.state != kReady || t.gpu.state != kNone) return false;
  const uint64_t size = plan_.input.sizes[x];
  const int room = cache_room(true, i, size);
  if (room == kWaitForRoom) return false;
  const bool cache = room == kCacheRoom;
  if (!cache && !stream_fits(true, size)) return false;
  t.gpu = Copy{kLoading, cache ? kCache : step, false};
  last_use_gpu_[x] = std::max(last_use_gpu_[x], step);
  ++t.pinned_users;
  if (std::find(live_.begin(), live_.end(), x) == live_.end()) live_.push_back(x);
  emit(out, kCopy, x, step, cache);
  return true;
}

void Scheduler::pump(std::vector<Action>& out) {
  const int64_t horizon = cursor_ + 1 + int64_t(plan_.trace.size());  // at most one trace ahead
  size_t before;
  do {  // until nothing more can be issued (a free can make room for a waiting transfer)
    before = out.size();
    collect(out);
    if (demanded_ >= 0 && !demand(demanded_, out)) return;  // the demand goes first
    while (copy_cursor_ < read_cursor_ && issue_copy(copy_cursor_, out)) ++copy_cursor_;
    while (read_cursor_ < horizon && issue_read(read_cursor_, out)) {
      ++read_cursor_;
      while (copy_cursor_ < read_cursor_ && issue_copy(copy_cursor_, out)) ++copy_cursor_;
    }
  } while (out.size() != before);
}

// Frees prefetched stream copies of future steps (furthest first) until `nbytes` fit, and moves
// the cursors back so that they are fetched again later.
void Scheduler::make_room(bool gpu, uint64_t nbytes, std::vector<Action>& out) {
  while (!stream_fits(gpu, nbytes)) {
    int32_t victim = -1;
    for (int32_t x : live_) {
      const Tensor& t = tensors_[x];
      const Copy& c = gpu ? t.gpu : t.pinned;
      if (c.state == kReady && c.owner > cursor_ && (gpu || t.pinned_users == 0) &&
          (victim < 0 || c.owner > (gpu ? tensors_[victim].gpu : tensors_[victim].pinned).owner))
        victim = x;
    }
    if (victim < 0) return;  // the rest is in flight: wait for it
    const int64_t owner = (gpu ? tensors_[victim].gpu : tensors_[victim].pinned).owner;
    free_copy(victim, gpu, out);
    copy_cursor_ = std::min(copy_cursor_, owner);
    if (!gpu) read_cursor_ = std::min(read_cursor_, owner);
  }
}

bool Scheduler::demand(int32_t x, std::vector<Action>& out) {
  Tensor& t = tensors_[x];
  if (t.gpu.state != kNone) return true;  // on its way or there
  const uint64_t size = plan_.input.sizes[x];
  const bool direct = plan_.pinned_stream_bytes == 0;
  if (size > plan_.gpu_stream_bytes || (!direct && size > plan_.pinned_stream_bytes)) {
    demanded_ = -1;
    throw CapacityError("tensor " + std::to_string(x) + " (" + std::to_string(size) +
                        " bytes, not in the plan's order) exceeds the stream buffers (GPU " +
                        std::to_string(plan_.gpu_stream_bytes) + ", pinned " +
                        std::to_string(plan_.pinned_stream_bytes) +
                        " bytes); include it in the order given to plan()");
  }
  if (t.pinned.state == kNone && direct) {
    make_room(true, size, out);
    if (!stream_fits(true, size)) return false;
    t.gpu = Copy{kLoading, kDemand, false};
    live_.push_back(x);
    emit(out, kReadToGpu, x, -1, false);
    return true;
  }
  if (t.pinned.state == kNone) {
    make_room(false, size, out);
    if (!stream_fits(false, size)) return false;
    t.pinned = Copy{kLoading, kDemand, false};
    live_.push_back(x);
    emit(out, kRead, x, -1, false);
    return false;
  }
  if (t.pinned.state != kReady) return false;
  make_room(true, size, out);
  if (!stream_fits(true, size)) return false;
  t.gpu = Copy{kLoading, kDemand, false};
  ++t.pinned_users;
  emit(out, kCopy, x, -1, false);
  return true;
}

std::vector<Action> Scheduler::start() {
  std::vector<Action> out;
  if (!plan_.trace.empty()) pump(out);
  return out;
}

std::vector<Action> Scheduler::step(int32_t tensor) {
  if (tensor < 0 || size_t(tensor) >= tensors_.size())
    throw std::invalid_argument("step(" + std::to_string(tensor) +
                                "): not a tensor id (there are " +
                                std::to_string(tensors_.size()) + ")");
  ++stats_.events;
  ++stats_.steps;
  std::vector<Action> out;
  if (plan_.trace.empty()) return out;
  const int64_t expected = cursor_ + 1;
  int64_t found = -1;
  const auto m = static_cast<int64_t>(plan_.input.order.size());
  for (int64_t s = expected; s < expected + m; ++s) {
    if (plan_.trace[index(s)] == tensor) {
      found = s;
      break;
    }
  }
  if (found != expected) ++stats_.divergences;
  demanded_ = -1;
  finished_ = cursor_;  // the step before this one is over (a demand keeps the position)
  if (found < 0) {  // not in the plan: fetch it now, keep the plan's position
    ++stats_.demand_fetches;
    demanded_ = tensor;
  } else {
    cursor_ = found;
    finished_ = found - 1;  // and so is every step skipped on the way
    read_cursor_ = std::max(read_cursor_, cursor_);
    copy_cursor_ = std::max(copy_cursor_, cursor_);
    const Tensor& t = tensors_[tensor];
    if (t.gpu.state == kReady && t.gpu.owner == kCache) ++stats_.gpu_hits;
    if (t.pinned.owner == kCache && t.pinned.state == kReady && t.gpu.owner != kCache)
      ++stats_.pinned_hits;
  }
  pump(out);
  return out;
}

std::vector<Action> Scheduler::done(int64_t action_id) {
  if (action_id < 0 || action_id >= next_id_ || pending_[action_id].kind == 255)
    throw std::invalid_argument("done(" + std::to_string(action_id) +
                                "): no such transfer in flight");
  ++stats_.events;
  Pending& p = pending_[action_id];
  Tensor& t = tensors_[p.tensor];
  if (p.kind == kRead) {
    t.pinned.state = kReady;
  } else if (p.kind == kReadToGpu) {
    t.gpu.state = kReady;
  } else {
    t.gpu.state = kReady;
    --t.pinned_users;
  }
  p.kind = 255;
  std::vector<Action> out;
  pump(out);
  return out;
}

bool Scheduler::on_gpu(int32_t tensor) const {
  return tensor >= 0 && size_t(tensor) < tensors_.size() && tensors_[tensor].gpu.state == kReady;
}

}  // namespace infinity
