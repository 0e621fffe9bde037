// Online prefetch and write-back scheduler (scheduler.h).
//
// Two cursors run ahead of the step being computed: the read cursor issues disk reads into
// pinned buffers, the copy cursor issues host->GPU copies, each in step order and each as far
// as its budget (cache or stream reserve) allows. A stream buffer belongs to one step and is
// freed when that step is over (GPU) or its copy is done (pinned); a cache entry stays until
// the plan evicts it and its last user is done.
//
// Write-back (copy-backs, writes, flush): scheduler_writeback.cpp.
#include "infinity/scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "infinity/arena.h"  // CapacityError

namespace infinity {

Scheduler::Scheduler(const Plan& plan, bool past_end)
    : plan_(plan),
      past_end_(past_end),
      tensors_(plan.input.sizes.size()),
      evict_gpu_at_(plan.trace.size()),
      evict_pinned_at_(plan.trace.size()) {
  for (const auto& [step, id] : plan_.evict_gpu) evict_gpu_at_[step].push_back(id);
  for (const auto& [step, id] : plan_.evict_pinned) evict_pinned_at_[step].push_back(id);
  last_use_gpu_.assign(tensors_.size(), -1);
  last_use_pinned_.assign(tensors_.size(), -1);
  const auto steps = static_cast<int64_t>(plan_.trace.size());
  const auto m = static_cast<int64_t>(plan_.input.order.size());
  writes_.assign(steps, 0);
  prev_write_.assign(steps, -1);
  last_writer_.assign(tensors_.size(), -1);
  std::vector<int64_t> last(tensors_.size(), -1);
  for (int64_t i = 0; i < steps; ++i) {
    const int32_t x = plan_.trace[i];
    writes_[i] = plan_.writes_at(i);
    prev_write_[i] = last[x];
    if (writes_[i]) {
      last[x] = i;
      if (i >= steps - m) last_writer_[x] = i;
    }
  }
}

int64_t Scheduler::index(int64_t step) const {
  const auto steps = static_cast<int64_t>(plan_.trace.size());
  if (step < steps) return step;
  const auto m = static_cast<int64_t>(plan_.input.order.size());
  return steps - m + (step - (steps - m)) % m;
}

int64_t Scheduler::prev_writer(int64_t step) const {
  const int64_t i = index(step), shift = step - i;
  const int64_t w = prev_write_[i];
  if (shift == 0) return w;
  const auto m = static_cast<int64_t>(plan_.input.order.size());
  if (w >= static_cast<int64_t>(plan_.trace.size()) - m) return w + shift;  // same repetition
  const int64_t last = last_writer_[plan_.trace[i]];  // the repetition before
  return last >= 0 ? last + shift - m : w;
}

// A step before `step` that writes `tensor` is not over: the planned writers, and the current
// step when it writes (as planned or not).
bool Scheduler::writer_pending(int32_t tensor, int64_t step) const {
  return prev_writer(step) > finished_ || (tensor == current_ && current_writes_ && step > cursor_);
}

// A copy serves `step` if it was fetched for it or for a later step (it stays until that one),
// or is a cache entry that is not being dropped (or is, but only after `step`, which was planned
// to read it before), or is a write buffer (the newest contents, until it is given back).
bool Scheduler::usable(int32_t tensor, bool gpu, int64_t step) const {
  const Copy& c = gpu ? tensors_[tensor].gpu : tensors_[tensor].pinned;
  if (c.state == kNone) return false;
  if (c.owner >= step || c.owner == kWriteBack) return true;
  if (c.owner != kCache) return false;
  return !c.evicting || step <= (gpu ? last_use_gpu_ : last_use_pinned_)[tensor];
}

void Scheduler::emit(std::vector<Action>& out, uint8_t kind, int32_t tensor, int64_t step,
                     bool cached) {
  Action a{-1, kind, tensor, step, plan_.input.sizes[tensor], uint8_t(cached)};
  if (kind != kFreePinned && kind != kFreeGpu) {
    a.id = next_id_++;
    pending_.push_back({kind, tensor});
  }
  if (kind == kRead || kind == kReadToGpu) ++stats_.reads;
  if (kind == kCopy) ++stats_.copies;
  if (kind == kCopyBack) ++stats_.copy_backs;
  if (kind == kWrite) ++stats_.writes;
  out.push_back(a);
}

void Scheduler::alloc(int32_t tensor, bool gpu, Pool pool, int64_t owner) {
  Copy& c = gpu ? tensors_[tensor].gpu : tensors_[tensor].pinned;
  c = Copy{kLoading, uint8_t(pool), owner, false, false, false};
  used_[pool] += plan_.input.sizes[tensor];
  stats_.gpu_used = used_[kGpuCache] + used_[kGpuStream];
  stats_.pinned_used = used_[kPinnedCache] + used_[kPinnedStream] + used_[kPinnedWrite];
  stats_.peak_gpu = std::max(stats_.peak_gpu, stats_.gpu_used);
  stats_.peak_pinned = std::max(stats_.peak_pinned, stats_.pinned_used);
  if (std::find(live_.begin(), live_.end(), tensor) == live_.end()) live_.push_back(tensor);
}

void Scheduler::free_copy(int32_t tensor, bool gpu, std::vector<Action>& out) {
  Copy& c = gpu ? tensors_[tensor].gpu : tensors_[tensor].pinned;
  emit(out, gpu ? kFreeGpu : kFreePinned, tensor, c.owner, c.owner == kCache);
  const uint64_t size = plan_.input.sizes[tensor];
  if (c.evicting) (gpu ? gpu_evicting_ : pinned_evicting_) -= size;
  used_[c.pool] -= size;
  stats_.gpu_used = used_[kGpuCache] + used_[kGpuStream];
  stats_.pinned_used = used_[kPinnedCache] + used_[kPinnedStream] + used_[kPinnedWrite];
  c = Copy{};
  live_.erase(std::remove(live_.begin(), live_.end(), tensor), live_.end());
  if (tensors_[tensor].gpu.state != kNone || tensors_[tensor].pinned.state != kNone)
    live_.push_back(tensor);
}

// A copy may be given back once nothing planned or in flight still reads it and it holds no
// contents that are not also further down (dirty).
bool Scheduler::releasable(int32_t tensor, bool gpu) const {
  const Tensor& t = tensors_[tensor];
  const Copy& c = gpu ? t.gpu : t.pinned;
  if (c.state != kReady || c.dirty || c.busy) return false;
  if (gpu) {
    if (c.owner == kCache) return c.evicting && last_use_gpu_[tensor] <= finished_;
    if (c.owner == kDemand) return demanded_ != tensor;
    return c.owner <= finished_;
  }
  if (t.pinned_users > 0) return false;
  if (c.owner == kWriteBack) return true;  // written: the disk has it
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
  if (c.dirty) queue(tensor);  // a write-back entry leaving the cache: write it back now
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

// Pinned bytes that reads and cache admissions leave free: what of the write reserve the write
// buffers do not hold yet.
uint64_t Scheduler::write_headroom() const {
  return plan_.pinned_write_bytes > used_[kPinnedWrite]
             ? plan_.pinned_write_bytes - used_[kPinnedWrite]
             : 0;
}

// `size` more bytes of a read, copy or cache admission fit the tier's whole budget (cache +
// stream reserve, whoever holds them: a stream buffer may borrow cache space that nothing holds
// yet, and a cache admission then waits until it is back), leaving the write headroom.
bool Scheduler::fits(bool gpu, uint64_t size) const {
  if (gpu) return used_[kGpuCache] + used_[kGpuStream] + size <= plan_.input.gpu_bytes;
  return used_[kPinnedCache] + used_[kPinnedStream] + used_[kPinnedWrite] + size +
             write_headroom() <=
         plan_.input.pinned_bytes;
}

// Whether a fetch for trace index `i` goes into the tier's cache: kCacheRoom when the plan
// keeps it and it fits; kWaitForRoom when it will fit once the planned evictions' last readers
// are done; kNoCacheRoom otherwise (the caller streams it).
int Scheduler::cache_room(bool gpu, int64_t step, uint64_t size) const {
  if (!(gpu ? plan_.keep_gpu : plan_.keep_pinned)[index(step)]) return kNoCacheRoom;
  // A fetch again for a step the cursor had passed (its copy was lost) cannot count on the room
  // the plan meant: fetches for later steps may hold it until after this one. It streams.
  const bool again = step < (gpu ? copy_high_ : read_high_);
  const uint64_t used = used_[gpu ? kGpuCache : kPinnedCache];
  const uint64_t cap = gpu ? plan_.gpu_cache_bytes : plan_.pinned_cache_bytes;
  if (used + size <= cap)  // and what streams borrowed from the cache is back
    return fits(gpu, size) ? kCacheRoom : again ? kNoCacheRoom : kWaitForRoom;
  return !again && used - (gpu ? gpu_evicting_ : pinned_evicting_) + size <= cap ? kWaitForRoom
                                                                                : kNoCacheRoom;
}

bool Scheduler::issue_read(int64_t step, std::vector<Action>& out) {
  const int64_t i = index(step);
  const int32_t x = plan_.trace[i];
  Tensor& t = tensors_[x];
  apply_evictions(false, step, out);
  // The disk copy is stale while a copy is dirty or a step before this one still writes it.
  const bool stale = t.gpu.dirty || t.gpu.busy || writer_pending(x, step);
  if (usable(x, true, step) &&
      (plan_.source[i] == kFromGpu || t.gpu.owner == step || step == cursor_ || stale))
    return true;  // (a GPU copy the step being computed uses, or that will be the newest)
  if (usable(x, false, step)) {  // (a write buffer: claimed, see done(kWrite))
    last_use_pinned_[x] = std::max(last_use_pinned_[x], step);
    return true;
  }
  if (t.pinned.state != kNone) return false;  // another step's copy: wait until it is freed
  if (stale) return false;                    // wait for the newest contents
  const uint64_t size = plan_.input.sizes[x];
  const int room = cache_room(false, step, size);
  if (room == kWaitForRoom) return false;
  const bool cache = room == kCacheRoom;
  if (!cache && plan_.pinned_stream_bytes == 0) {
    // GPU buffers go to steps in order: a later step must not take the one an earlier copy needs
    return copy_cursor_ == step && read_to_gpu(step, out);
  }
  if (!cache && !fits(false, size)) make_room(false, size, step, out);
  if (!cache && !fits(false, size)) return false;
  alloc(x, false, cache ? kPinnedCache : kPinnedStream, cache ? kCache : step);
  if (cache) last_use_pinned_[x] = step;
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
  const int room = cache_room(true, step, size);
  if (room == kWaitForRoom) return false;
  const bool cache = room == kCacheRoom;
  if (!cache && !fits(true, size)) make_room(true, size, step, out);
  if (!cache && !fits(true, size)) return false;
  alloc(x, true, cache ? kGpuCache : kGpuStream, cache ? kCache : step);
  last_use_gpu_[x] = std::max(last_use_gpu_[x], step);
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
  if (writer_pending(x, step)) return false;  // its writer has not run: wait for its data
  if (!usable(x, false, step)) {
    if (t.pinned.state == kNone && read_cursor_ > step) read_cursor_ = step;  // lost: re-read
    return false;
  }
  if (t.pinned.state != kReady || t.gpu.state != kNone) return false;
  const uint64_t size = plan_.input.sizes[x];
  const int room = cache_room(true, step, size);
  if (room == kWaitForRoom) return false;
  const bool cache = room == kCacheRoom;
  if (!cache && !fits(true, size)) make_room(true, size, step, out);
  if (!cache && !fits(true, size)) return false;
  alloc(x, true, cache ? kGpuCache : kGpuStream, cache ? kCache : step);
  last_use_gpu_[x] = std::max(last_use_gpu_[x], step);
  ++t.pinned_users;
  emit(out, kCopy, x, step, cache);
  return true;
}

void Scheduler::pump(std::vector<Action>& out) {
  const auto steps = static_cast<int64_t>(plan_.trace.size());
  const int64_t horizon =  // at most one trace ahead; or the trace's end
      past_end_ ? cursor_ + 1 + steps : std::max(steps, cursor_ + 1);
  size_t before;
  do {  // until nothing more can be issued (a free can make room for a waiting transfer)
    before = out.size();
    collect(out);
    write_back(out);  // write-back goes before reads: it is what frees GPU and pinned room
    if (demanded_ >= 0 && !demand(demanded_, out)) continue;  // the demand goes first
    auto copies = [&] {
      while (copy_cursor_ < read_cursor_ && issue_copy(copy_cursor_, out))
        copy_high_ = std::max(copy_high_, ++copy_cursor_);
    };
    copies();
    while (read_cursor_ < horizon && issue_read(read_cursor_, out)) {
      read_high_ = std::max(read_high_, ++read_cursor_);
      copies();
    }
  } while (out.size() != before);
}

// Frees prefetched stream copies of steps after `after` (furthest first) until `nbytes` fit, and
// moves the cursors back so that they are fetched again later. A demand takes them from any
// future step; a fetch for step s (moved back because its copy was lost) from steps after s,
// which would otherwise hold the room s waits for until s is served: buffers go to steps in
// order.
void Scheduler::make_room(bool gpu, uint64_t nbytes, int64_t after, std::vector<Action>& out,
                          bool for_write) {
  auto enough = [&] {
    if (!for_write) return fits(gpu, nbytes);
    return used_[kPinnedCache] + used_[kPinnedStream] + used_[kPinnedWrite] + nbytes <=
           plan_.input.pinned_bytes;
  };
  while (!enough()) {
    int32_t victim = -1;
    for (int32_t x : live_) {
      const Tensor& t = tensors_[x];
      const Copy& c = gpu ? t.gpu : t.pinned;
      if (c.state == kReady && c.owner > after && !c.dirty && !c.busy &&
          (gpu || (t.pinned_users == 0 && t.gpu.owner != c.owner)) &&
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
  if (t.gpu.state != kNone) return true;  // on its way or there (a GPU copy is the newest)
  const uint64_t size = plan_.input.sizes[x];
  const bool direct = plan_.pinned_stream_bytes == 0;
  if (size > plan_.gpu_stream_bytes || (!direct && size > plan_.pinned_stream_bytes)) {
    demanded_ = current_ = -1;
    current_writes_ = false;
    throw CapacityError("tensor " + std::to_string(x) + " (" + std::to_string(size) +
                        " bytes, not in the plan's order) exceeds the stream buffers (GPU " +
                        std::to_string(plan_.gpu_stream_bytes) + ", pinned " +
                        std::to_string(plan_.pinned_stream_bytes) +
                        " bytes); include it in the order given to plan()");
  }
  // (no copy anywhere: nothing is dirty, the disk has the newest contents)
  if (t.pinned.state == kNone && direct) {
    make_room(true, size, cursor_, out);
    if (!fits(true, size)) return false;
    alloc(x, true, kGpuStream, kDemand);
    emit(out, kReadToGpu, x, -1, false);
    return true;
  }
  if (t.pinned.state == kNone) {
    make_room(false, size, cursor_, out);
    if (!fits(false, size)) return false;
    alloc(x, false, kPinnedStream, kDemand);
    emit(out, kRead, x, -1, false);
    return false;
  }
  if (t.pinned.state != kReady) return false;
  make_room(true, size, cursor_, out);
  if (!fits(true, size)) return false;
  alloc(x, true, kGpuStream, kDemand);
  ++t.pinned_users;
  emit(out, kCopy, x, -1, false);
  return true;
}

std::vector<Action> Scheduler::start() {
  std::vector<Action> out;
  if (!plan_.trace.empty()) pump(out);
  return out;
}

std::vector<Action> Scheduler::step(int32_t tensor, int write) {
  if (tensor < 0 || size_t(tensor) >= tensors_.size())
    throw std::invalid_argument("step(" + std::to_string(tensor) +
                                "): not a tensor id (there are " +
                                std::to_string(tensors_.size()) + ")");
  if (write > 0 && plan_.input.sizes[tensor] > plan_.input.pinned_bytes)
    throw CapacityError("step(" + std::to_string(tensor) + ", write): its " +
                        std::to_string(plan_.input.sizes[tensor]) +
                        " bytes cannot be written back through the pinned budget of " +
                        std::to_string(plan_.input.pinned_bytes) +
                        " bytes; raise pinned_bytes or mark the write in the plan");
  ++stats_.events;
  ++stats_.steps;
  std::vector<Action> out;
  end_step();
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
    read_high_ = std::max(read_high_, read_cursor_);
    copy_high_ = std::max(copy_high_, copy_cursor_);
    const Tensor& t = tensors_[tensor];
    if (t.gpu.state == kReady && t.gpu.owner == kCache) ++stats_.gpu_hits;
    if (t.pinned.owner == kCache && t.pinned.state == kReady && t.gpu.owner != kCache)
      ++stats_.pinned_hits;
  }
  // A dirty GPU copy (or one a copy-back reads) cannot be given back yet and holds the newest
  // contents: it serves this step, and stays until the step is over. (A clean one of a past
  // step is given back and fetched again, as the plan has it.)
  Copy& g = tensors_[tensor].gpu;
  if (g.state != kNone && (g.dirty || g.busy)) {
    const int64_t until = found >= 0 ? found : cursor_ + 1;
    if (g.owner == kCache)
      last_use_gpu_[tensor] = std::max(last_use_gpu_[tensor], until);
    else if (g.owner < until)
      g.owner = found >= 0 ? found : kDemand;
  }
  current_ = tensor;
  current_step_ = found;
  current_writes_ = write >= 0 ? write != 0 : found >= 0 && writes_[index(found)];
  pump(out);
  return out;
}

std::vector<Action> Scheduler::done(int64_t action_id) {
  if (action_id < 0 || action_id >= next_id_ || pending_[action_id].kind == 255)
    throw std::invalid_argument("done(" + std::to_string(action_id) +
                                "): no such transfer in flight");
  ++stats_.events;
  Pending& p = pending_[action_id];
  const int32_t x = p.tensor;
  Tensor& t = tensors_[x];
  switch (p.kind) {
    case kRead:
      t.pinned.state = kReady;
      break;
    case kReadToGpu:
      t.gpu.state = kReady;
      break;
    case kCopy:
      t.gpu.state = kReady;
      --t.pinned_users;
      break;
    case kCopyBack:  // the pinned copy now holds the newest contents
      t.gpu.busy = false;
      t.gpu.dirty = false;
      t.pinned.state = kReady;
      t.pinned.dirty = true;
      queue(x);
      break;
    case kWrite: {
      Copy& c = t.pinned;
      c.busy = false;
      c.dirty = false;
      settle_flush(x);
      // A write buffer that a later step claimed (its copy not issued yet) becomes that step's
      // read buffer, if the read room allows: else it is given back and read again.
      const int64_t claim = last_use_pinned_[x];
      const uint64_t size = plan_.input.sizes[x];
      if (c.owner == kWriteBack && c.state == kReady && claim >= copy_cursor_ &&
          used_[kPinnedCache] + used_[kPinnedStream] + size +
                  std::max(used_[kPinnedWrite] - size, plan_.pinned_write_bytes) <=
              plan_.input.pinned_bytes) {
        used_[kPinnedWrite] -= size;
        used_[kPinnedStream] += size;
        c.pool = kPinnedStream;
        c.owner = claim;
      }
      break;
    }
  }
  p.kind = 255;
  std::vector<Action> out;
  pump(out);
  return out;
}

bool Scheduler::on_gpu(int32_t tensor) const {
  if (tensor < 0 || size_t(tensor) >= tensors_.size()) return false;
  const Copy& g = tensors_[tensor].gpu;
  return g.state == kReady && !(g.busy && tensor == current_ && current_writes_);
}

}  // namespace infinity
