// Write-back half of the online Scheduler (scheduler.h): the end of a step that dirtied its
// tensor, copy-backs (GPU -> pinned), writes (pinned -> disk) and flush. The prefetch half, and
// the bookkeeping both share, are in scheduler.cpp.
//
// Write-back goes first in every pump: a dirty GPU copy is copied back into the tensor's pinned
// buffer (a new write buffer if it has none), a dirty pinned copy is written to disk. Why it
// cannot deadlock: reads and cache admissions in pinned memory always leave the write reserve
// (plan.pinned_write_bytes, at least the largest dirtied tensor) free of everything but write
// buffers, so a copy-back finds room whenever no write buffer is held, and write buffers only
// wait for the disk. Dirty GPU copies therefore drain, and with them the GPU room that copies
// for the next steps wait for.
#include "infinity/scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace infinity {

void Scheduler::queue(int32_t tensor) {
  Tensor& t = tensors_[tensor];
  if (!t.queued) {
    t.queued = true;
    writeback_.push_back(tensor);
  }
}

// A write-back entry (a cache entry the plan keeps) stays dirty until evicted or flushed.
bool Scheduler::wants_write_back(int32_t tensor) const {
  const Tensor& t = tensors_[tensor];
  auto due = [&](const Copy& c) {
    return c.dirty && !c.busy && (c.owner != kCache || c.evicting || t.flush);
  };
  return due(t.gpu) || due(t.pinned);
}

// GPU -> pinned for a dirty GPU copy that is due, into the tensor's pinned buffer: a cache entry
// or a write buffer it already has (once nothing reads it), else a new write buffer. A stale
// read buffer (fetched before the write) is dropped first. True when issued.
bool Scheduler::copy_back(int32_t x, std::vector<Action>& out) {
  Tensor& t = tensors_[x];
  Copy &g = t.gpu, &p = t.pinned;
  if (!g.dirty || g.busy || g.state != kReady) return false;
  if (g.owner == kCache && !g.evicting && !t.flush) return false;  // write-back on the GPU
  if (x == current_ && current_writes_) return false;  // the step being computed changes it
  if (g.owner == kCache && g.evicting && !t.flush && last_use_gpu_[x] > finished_)
    return false;  // a planned step still reads (and may write) it: copy once, after that
  if (p.state != kNone) {
    if (p.state != kReady || p.busy || t.pinned_users > 0) return false;  // wait for its reader
    if (p.owner != kCache && p.owner != kWriteBack) {  // fetched before the write: stale
      const int64_t owner = p.owner;
      free_copy(x, false, out);
      if (owner > cursor_) {  // fetch it again later, from the newest contents
        read_cursor_ = std::min(read_cursor_, owner);
        copy_cursor_ = std::min(copy_cursor_, owner);
      }
    }
  }
  const uint64_t size = plan_.input.sizes[x];
  auto room = [&] {
    return used_[kPinnedCache] + used_[kPinnedStream] + used_[kPinnedWrite] + size <=
           plan_.input.pinned_bytes;
  };
  if (p.state == kNone) {
    // The write reserve makes room for any planned write once the write buffers drain. A
    // write the plan did not know of (step(x, 1)) may find none: then prefetched reads go,
    // then clean pinned cache entries (read again when next needed).
    if (!room() && used_[kPinnedWrite] > 0) return false;
    if (!room()) make_room(false, size, finished_, out, /*for_write=*/true);
    while (!room()) {
      int32_t victim = -1;
      for (size_t v = 0; v < tensors_.size() && victim < 0; ++v) {
        const Tensor& c = tensors_[v];
        if (c.pinned.state == kReady && c.pinned.owner == kCache && !c.pinned.dirty &&
            !c.pinned.busy && c.pinned_users == 0)
          victim = int32_t(v);
      }
      if (victim < 0) {  // write a dirty cache entry now, drop it once written
        for (size_t v = 0; v < tensors_.size(); ++v) {
          Tensor& c = tensors_[v];
          if (c.pinned.state == kReady && c.pinned.owner == kCache && c.pinned.dirty &&
              !c.pinned.busy && c.pinned_users == 0) {
            c.pinned.busy = true;
            emit(out, kWrite, int32_t(v), c.dirty_step, true);
            break;
          }
        }
        return false;  // the rest is in flight: wait for it
      }
      free_copy(victim, false, out);
    }
    alloc(x, false, kPinnedWrite, kWriteBack);
    last_use_pinned_[x] = -1;  // no step has claimed it yet
  }
  p.state = kLoading;
  g.busy = true;
  emit(out, kCopyBack, x, t.dirty_step, p.owner == kCache);
  return true;
}

// pinned -> disk for a dirty pinned copy that is due. True when issued.
bool Scheduler::write(int32_t x, std::vector<Action>& out) {
  Tensor& t = tensors_[x];
  Copy& p = t.pinned;
  if (!p.dirty || p.busy || p.state != kReady) return false;
  if (p.owner == kCache && !p.evicting && !t.flush) return false;  // write-back cache
  p.busy = true;
  emit(out, kWrite, x, t.dirty_step, p.owner == kCache);
  return true;
}

void Scheduler::write_back(std::vector<Action>& out) {
  for (size_t k = 0; k < writeback_.size();) {
    const int32_t x = writeback_[k];
    copy_back(x, out);
    write(x, out);  // (a copy-back just issued makes the pinned copy busy: nothing to write yet)
    if (!wants_write_back(x)) {
      tensors_[x].queued = false;
      writeback_[k] = writeback_.back();
      writeback_.pop_back();
      continue;
    }
    ++k;
  }
}

void Scheduler::settle_flush(int32_t x) {
  Tensor& t = tensors_[x];
  if (t.flush && !t.gpu.dirty && !t.gpu.busy && !t.pinned.dirty && !t.pinned.busy) {
    t.flush = false;
    --flush_pending_;
  }
}

// The step being computed is over: a step that wrote its tensor leaves its GPU copy dirty.
void Scheduler::end_step() {
  if (current_ >= 0 && current_writes_) {
    Tensor& t = tensors_[current_];
    if (t.gpu.state == kNone)
      throw std::invalid_argument("step " + std::to_string(current_step_) + " (tensor " +
                                  std::to_string(current_) +
                                  ") wrote its tensor but it never reached the GPU; wait for "
                                  "on_gpu(tensor) before computing");
    t.gpu.dirty = true;
    t.dirty_step = current_step_;
    ++stats_.dirty_steps;
    queue(current_);
  }
  current_ = -1;
  current_writes_ = false;
  current_step_ = -1;
}

std::vector<Action> Scheduler::finish() {
  ++stats_.events;
  std::vector<Action> out;
  end_step();
  demanded_ = -1;
  finished_ = cursor_;
  if (!plan_.trace.empty()) pump(out);
  return out;
}

std::vector<Action> Scheduler::flush() {
  std::vector<Action> out = finish();
  for (size_t x = 0; x < tensors_.size(); ++x) {
    Tensor& t = tensors_[x];
    if (!t.flush && (t.gpu.dirty || t.gpu.busy || t.pinned.dirty || t.pinned.busy)) {
      t.flush = true;
      ++flush_pending_;
      queue(int32_t(x));
    }
  }
  if (!plan_.trace.empty()) pump(out);
  return out;
}

}  // namespace infinity
