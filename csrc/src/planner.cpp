// Prefetch planner (planner.h): static residency for cyclic scans, size-aware furthest-next-use
// (Belady with bypass) for general traces, and the simulated clock that measures a plan.
#include "infinity/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <stdexcept>
#include <tuple>
#include <unordered_set>

#include "infinity/arena.h"  // CapacityError
#include "infinity/scheduler.h"

namespace infinity {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

void validate(const PlanInput& in) {
  const auto n = static_cast<int64_t>(in.sizes.size());
  for (size_t i = 0; i < in.order.size(); ++i) {
    if (in.order[i] < 0 || in.order[i] >= n)
      throw std::invalid_argument("order[" + std::to_string(i) + "] = " +
                                  std::to_string(in.order[i]) + " is not a tensor id (there are " +
                                  std::to_string(n) + " sizes)");
  }
  if (in.repeats < 1) throw std::invalid_argument("repeats must be >= 1");
  const Bandwidths& b = in.bandwidths;
  for (double v : {b.disk_read, b.disk_write, b.h2d, b.d2h})
    if (!(v > 0) || !std::isfinite(v))
      throw std::invalid_argument("every bandwidth must be a positive number of bytes/s, got " +
                                  std::to_string(v));
  if (!in.compute_s.empty() && in.compute_s.size() != in.order.size())
    throw std::invalid_argument("compute_s has " + std::to_string(in.compute_s.size()) +
                                " entries; give one per position of order (" +
                                std::to_string(in.order.size()) + ") or none");
  for (double c : in.compute_s)
    if (!(c >= 0) || !std::isfinite(c))
      throw std::invalid_argument("compute_s entries must be >= 0 seconds");
  if (!in.writes.empty() && in.writes.size() != in.order.size())
    throw std::invalid_argument("writes has " + std::to_string(in.writes.size()) +
                                " entries; give one per position of order (" +
                                std::to_string(in.order.size()) + ") or none");
}

void check_fits(uint64_t budget, uint64_t largest, const char* what) {
  if (largest > budget)
    throw CapacityError(std::string("a tensor of ") + std::to_string(largest) +
                        " bytes does not fit the " + what + " budget of " +
                        std::to_string(budget) + " bytes; raise it to at least " +
                        std::to_string(largest));
}

// Tensors of `candidates` (in access order) to keep within `capacity`, spread evenly over the
// pass so that reads of the others interleave with hits (the disk never waits for a run of hits).
std::vector<int32_t> spread(const std::vector<int32_t>& candidates,
                            const std::vector<uint64_t>& sizes, uint64_t capacity) {
  long double total = 0;
  for (int32_t id : candidates) total += sizes[id];
  std::vector<int32_t> kept;
  if (total == 0 || capacity == 0) return kept;
  const long double frac = std::min<long double>(1, capacity / total);
  long double target = 0;
  uint64_t used = 0;
  std::vector<uint8_t> taken(candidates.size(), 0);
  for (size_t i = 0; i < candidates.size(); ++i) {
    const uint64_t s = sizes[candidates[i]];
    target += frac * s;
    if (used + s <= capacity && used + s <= target + 1e-9L * s + 0.5L) {
      used += s;
      taken[i] = 1;
    }
  }
  for (size_t i = 0; i < candidates.size(); ++i) {  // fill what rounding left
    const uint64_t s = sizes[candidates[i]];
    if (!taken[i] && used + s <= capacity) {
      used += s;
      taken[i] = 1;
    }
  }
  for (size_t i = 0; i < candidates.size(); ++i)
    if (taken[i]) kept.push_back(candidates[i]);
  return kept;
}

// Kept copies of dirtied tensors save the most (a read and a write per pass in pinned memory;
// also a copy each way on the GPU): they are chosen first, spread over the pass, then the clean
// ones in what room is left.
std::vector<int32_t> spread_dirty_first(const std::vector<int32_t>& candidates,
                                        const std::vector<uint8_t>& dirty,
                                        const std::vector<uint64_t>& sizes, uint64_t capacity) {
  std::vector<int32_t> first, rest;
  for (int32_t id : candidates) (dirty[id] ? first : rest).push_back(id);
  std::vector<int32_t> kept = spread(first, sizes, capacity);
  uint64_t used = 0;
  for (int32_t id : kept) used += sizes[id];
  for (int32_t id : spread(rest, sizes, capacity - used)) kept.push_back(id);
  std::unordered_set<int32_t> chosen(kept.begin(), kept.end());
  kept.clear();
  for (int32_t id : candidates)  // in access order
    if (chosen.count(id)) kept.push_back(id);
  return kept;
}

void plan_cyclic(Plan& p) {
  const PlanInput& in = p.input;
  const auto m = static_cast<int64_t>(in.order.size());
  std::vector<uint8_t> dirty(in.sizes.size(), 0);
  for (int64_t i = 0; i < m; ++i)
    if (p.writes_at(i)) dirty[in.order[i]] = 1;
  p.resident_gpu = spread_dirty_first(in.order, dirty, in.sizes, p.gpu_cache_bytes);
  std::unordered_set<int32_t> on_gpu(p.resident_gpu.begin(), p.resident_gpu.end());
  std::vector<int32_t> rest;
  for (int32_t id : in.order)
    if (!on_gpu.count(id)) rest.push_back(id);
  p.resident_pinned = spread_dirty_first(rest, dirty, in.sizes, p.pinned_cache_bytes);
  std::unordered_set<int32_t> pinned(p.resident_pinned.begin(), p.resident_pinned.end());
  for (int64_t t = 0; t < static_cast<int64_t>(p.trace.size()); ++t) {
    const int32_t x = p.trace[t];
    const bool first = t < m;
    if (on_gpu.count(x)) {
      p.source[t] = first ? kFromDisk : kFromGpu;
      p.keep_gpu[t] = first;
    } else if (pinned.count(x)) {
      p.source[t] = first ? kFromDisk : kFromPinned;
      p.keep_pinned[t] = first;
    } else {
      p.source[t] = kFromDisk;
    }
  }
}

// Furthest-next-use cache with bypass: admitting `x` evicts the entries with the highest
// priority while that frees room, unless `x` itself ranks higher than they. Priority is the
// distance to the next use (Belady), or that distance per byte (keeps large tensors, which cost
// more to read again, when small ones fill the room less well).
struct Cache {
  uint64_t capacity, used = 0;
  bool per_byte;
  std::vector<int64_t> next_of;  // -1: not cached
  std::vector<int32_t> members;
  std::vector<uint8_t> ever_evicted, ever_admitted;

  Cache(uint64_t cap, size_t n, bool by_size)
      : capacity(cap), per_byte(by_size), next_of(n, -1), ever_evicted(n, 0), ever_admitted(n, 0) {}
  bool has(int32_t x) const { return next_of[x] >= 0; }
  void touch(int32_t x, int64_t next) { next_of[x] = next; }
  long double rank(int64_t next, int64_t now, uint64_t size) const {
    const long double distance = next == kNever ? 1e30L : (long double)(next - now);
    return per_byte ? distance / (long double)std::max<uint64_t>(size, 1) : distance;
  }
  bool admit(int32_t x, int64_t now, int64_t next, const std::vector<uint64_t>& sizes,
             std::vector<int32_t>& evicted) {
    const uint64_t size = sizes[x];
    if (next == kNever || size > capacity) return false;
    std::vector<std::pair<long double, int32_t>> ranked;
    if (used + size > capacity) {
      for (int32_t m : members) ranked.push_back({rank(next_of[m], now, sizes[m]), m});
      std::sort(ranked.rbegin(), ranked.rend());
    }
    const long double mine = rank(next, now, size);
    uint64_t freed = 0;
    size_t k = 0;
    while (used - freed + size > capacity) {
      if (k == ranked.size() || ranked[k].first < mine || (!per_byte && ranked[k].first == mine))
        return false;  // bypass
      freed += sizes[ranked[k++].second];
    }
    for (size_t i = 0; i < k; ++i) {
      const int32_t v = ranked[i].second;
      next_of[v] = -1;
      used -= sizes[v];
      ever_evicted[v] = 1;
      evicted.push_back(v);
      members.erase(std::find(members.begin(), members.end(), v));
    }
    next_of[x] = next;
    members.push_back(x);
    used += size;
    ever_admitted[x] = 1;
    return true;
  }
};

// pinned_first: a tensor goes to the GPU cache only when the pinned cache turns it away, so the
// GPU budget holds what would otherwise be read from disk again. exclusive (GPU first): a tensor
// the GPU cache takes is not also put in the pinned cache, where it could only evict a tensor
// that needs the room more.
void plan_belady(Plan& p, bool per_byte, bool pinned_first, bool exclusive) {
  const PlanInput& in = p.input;
  const auto steps = static_cast<int64_t>(p.trace.size());
  std::vector<int64_t> next_use(steps), last(in.sizes.size(), kNever);
  for (int64_t t = steps - 1; t >= 0; --t) {
    next_use[t] = last[p.trace[t]];
    last[p.trace[t]] = t;
  }
  Cache gpu(p.gpu_cache_bytes, in.sizes.size(), per_byte);
  Cache pinned(p.pinned_cache_bytes, in.sizes.size(), per_byte);
  std::vector<int32_t> evicted;
  for (int64_t t = 0; t < steps; ++t) {
    const int32_t x = p.trace[t];
    if (gpu.has(x)) {
      p.source[t] = kFromGpu;
      gpu.touch(x, next_use[t]);
      if (pinned.has(x)) pinned.touch(x, next_use[t]);
      continue;
    }
    p.source[t] = pinned.has(x) ? kFromPinned : kFromDisk;
    auto to_gpu = [&]() {
      evicted.clear();
      p.keep_gpu[t] = gpu.admit(x, t, next_use[t], in.sizes, evicted);
      for (int32_t v : evicted) p.evict_gpu.emplace_back(t, v);
    };
    if (pinned.has(x)) {  // inclusive: a GPU-cached tensor may keep its pinned copy too
      pinned.touch(x, next_use[t]);
      if (!pinned_first) to_gpu();
      continue;
    }
    if (!pinned_first) to_gpu();
    if (exclusive && p.keep_gpu[t]) continue;
    evicted.clear();
    p.keep_pinned[t] = pinned.admit(x, t, next_use[t], in.sizes, evicted);
    for (int32_t v : evicted) p.evict_pinned.emplace_back(t, v);
    if (pinned_first && !p.keep_pinned[t]) to_gpu();  // the GPU holds what pinned cannot
  }
  for (size_t i = 0; i < in.sizes.size(); ++i) {
    if (gpu.ever_admitted[i] && !gpu.ever_evicted[i]) p.resident_gpu.push_back(int32_t(i));
    if (pinned.ever_admitted[i] && !pinned.ever_evicted[i])
      p.resident_pinned.push_back(int32_t(i));
  }
}

uint64_t planned_disk_bytes(const Plan& p) {
  uint64_t total = 0;
  for (size_t t = 0; t < p.trace.size(); ++t)
    if (p.source[t] == kFromDisk) total += p.input.sizes[p.trace[t]];
  return total;
}

}  // namespace

namespace {
Plan plan_residency(Plan p) {
  if (p.cyclic) {
    plan_cyclic(p);
    return p;
  }
  // Six variants (ranking x GPU first, pinned first, or GPU first and exclusive); keep the one
  // that reads the fewest bytes from disk, the first one on a tie (GPU first also saves
  // host->GPU copies).
  Plan best;
  uint64_t best_bytes = 0;
  for (int variant = 0; variant < 6; ++variant) {
    Plan candidate = p;
    plan_belady(candidate, variant & 1, (variant >> 1) == 1, (variant >> 1) == 2);
    const uint64_t bytes = planned_disk_bytes(candidate);
    if (variant == 0 || bytes < best_bytes) {
      best = std::move(candidate);
      best_bytes = bytes;
    }
  }
  return best;
}
}  // namespace

double Plan::compute_at(int64_t step) const {
  if (input.compute_s.empty()) return 0;
  return input.compute_s[step % input.compute_s.size()];
}

bool Plan::writes_at(int64_t step) const {
  return !input.writes.empty() && input.writes[step % input.writes.size()];
}

Plan make_plan(const PlanInput& in) {
  validate(in);
  Plan p;
  p.input = in;
  for (uint32_t r = 0; r < in.repeats; ++r)
    p.trace.insert(p.trace.end(), in.order.begin(), in.order.end());
  const size_t steps = p.trace.size();
  p.source.assign(steps, kFromDisk);
  p.keep_gpu.assign(steps, 0);
  p.keep_pinned.assign(steps, 0);
  uint64_t largest = 0, largest_dirty = 0;
  for (size_t i = 0; i < in.order.size(); ++i) {
    largest = std::max(largest, in.sizes[in.order[i]]);
    if (p.writes_at(int64_t(i))) largest_dirty = std::max(largest_dirty, in.sizes[in.order[i]]);
  }
  if (in.order.empty()) return p;
  check_fits(in.gpu_bytes, largest, "GPU");
  if (largest_dirty > in.pinned_bytes)
    throw CapacityError("a dirtied tensor of " + std::to_string(largest_dirty) +
                        " bytes does not fit the pinned budget of " +
                        std::to_string(in.pinned_bytes) +
                        " bytes (its write-back goes through pinned memory); raise it to at "
                        "least " + std::to_string(largest_dirty));
  std::unordered_set<int32_t> distinct(in.order.begin(), in.order.end());
  p.cyclic = distinct.size() == in.order.size();
  // Stream reserves of two buffers of the largest tensor (one in use, the next arriving) or one
  // (a tensor more in the cache, less overlap), or none in pinned memory (reads go straight to
  // the GPU): every choice the budgets allow is planned and simulated, and the fastest is kept
  // (the first on a tie). With writes, pinned memory also keeps a write reserve of one buffer
  // of the largest dirtied tensor (what makes write-back always progress, scheduler.cpp).
  p.pinned_write_bytes = largest_dirty;
  Plan best;
  double best_s = 0;
  bool have = false;
  for (uint64_t gpu_buffers : {2, 1}) {
    for (uint64_t pinned_buffers : {2, 1, 0}) {  // 0: disk -> GPU directly, no staging
      if (gpu_buffers * largest > in.gpu_bytes ||
          pinned_buffers * largest + p.pinned_write_bytes > in.pinned_bytes)
        continue;
      if ((in.gpu_stream_buffers >= 0 && uint64_t(in.gpu_stream_buffers) != gpu_buffers) ||
          (in.pinned_stream_buffers >= 0 && uint64_t(in.pinned_stream_buffers) != pinned_buffers))
        continue;
      Plan c = p;
      c.gpu_stream_bytes = gpu_buffers * largest;
      c.pinned_stream_bytes = pinned_buffers * largest;
      c.gpu_cache_bytes = in.gpu_bytes - c.gpu_stream_bytes;
      c.pinned_cache_bytes = in.pinned_bytes - c.pinned_stream_bytes - c.pinned_write_bytes;
      c = plan_residency(std::move(c));
      const double time_s = simulate(c).time_s;
      if (!have || time_s < best_s) {
        best = std::move(c);
        best_s = time_s;
        have = true;
      }
    }
  }
  if (!have)
    throw CapacityError("no stream buffers fit: GPU " + std::to_string(in.gpu_stream_buffers) +
                        " and pinned " + std::to_string(in.pinned_stream_buffers) +
                        " buffers of " + std::to_string(largest) + " bytes asked, budgets GPU " +
                        std::to_string(in.gpu_bytes) + " and pinned " +
                        std::to_string(in.pinned_bytes) + " bytes (of which " +
                        std::to_string(p.pinned_write_bytes) + " the write-back reserve)");
  return best;
}

double bound_seconds(const PlanInput& in) {
  // planner.h gives the formula and why it is a lower bound.
  std::unordered_set<int32_t> distinct(in.order.begin(), in.order.end()), dirtied;
  for (size_t i = 0; i < in.writes.size(); ++i)
    if (in.writes[i]) dirtied.insert(in.order[i]);
  long double w = 0, d = 0, compute = 0;
  for (int32_t id : distinct) w += in.sizes[id];
  for (int32_t id : dirtied) d += in.sizes[id];
  for (double c : in.compute_s) compute += c;
  const long double later = in.repeats - 1;
  const long double gpu = in.gpu_bytes, memory = gpu + (long double)in.pinned_bytes;
  auto beyond = [](long double bytes, long double kept) {
    return std::max<long double>(0, bytes - kept);
  };
  const long double reads = w + later * beyond(w, memory);
  const long double writes = d + later * beyond(d, memory);
  const long double h2d = w + later * beyond(w, gpu);
  const long double d2h = d + later * beyond(d, gpu);
  const Bandwidths& bw = in.bandwidths;
  return double(std::max({reads / bw.disk_read + writes / bw.disk_write, h2d / bw.h2d,
                          d2h / bw.d2h, compute * in.repeats}));
}

SimResult simulate(const Plan& plan) {
  const Bandwidths& bw = plan.input.bandwidths;
  SimResult r;
  r.bound_s = bound_seconds(plan.input);
  Scheduler sched(plan, /*past_end=*/false);
  // (time, action id, and for a direct read's first event: its bytes and when its disk half
  // ends). A direct read streams through the aio engine's bounce buffers, chunk by chunk, so its
  // bytes cross the host->GPU link while the disk reads them: it takes n / h2d of the link
  // (served in arrival order), from n / h2d before its disk half ends (or from the start, when
  // the link is the slower), and ends when both halves have.
  using Event = std::tuple<double, int64_t, uint64_t, double>;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events;
  double disk_free = 0, h2d_free = 0, d2h_free = 0;
  // One device or link, serving in issue order: returns when this transfer ends.
  auto serve = [](double now, double& free, double seconds, double& busy) {
    free = std::max(now, free) + seconds;
    busy += seconds;
    return free;
  };
  auto dispatch = [&](const std::vector<Action>& actions, double now) {
    for (const Action& a : actions) {
      const double n = double(a.nbytes);
      if (a.id >= 0) ++r.transfers;
      if (a.kind == kRead || a.kind == kReadToGpu) {
        const double disk_end = serve(now, disk_free, n / bw.disk_read, r.disk_busy_s);
        if (a.kind == kReadToGpu) {
          const double link_from = std::max(disk_end - n / bw.disk_read, disk_end - n / bw.h2d);
          events.push({link_from, a.id, a.nbytes, disk_end});
        } else {
          events.push({disk_end, a.id, 0, 0});
        }
        r.disk_read_bytes += a.nbytes;
      } else if (a.kind == kWrite) {
        events.push({serve(now, disk_free, n / bw.disk_write, r.disk_busy_s), a.id, 0, 0});
        r.disk_write_bytes += a.nbytes;
      } else if (a.kind == kCopy) {
        events.push({serve(now, h2d_free, n / bw.h2d, r.h2d_busy_s), a.id, 0, 0});
        r.h2d_bytes += a.nbytes;
      } else if (a.kind == kCopyBack) {
        events.push({serve(now, d2h_free, n / bw.d2h, r.d2h_busy_s), a.id, 0, 0});
        r.d2h_bytes += a.nbytes;
      }
    }
  };
  auto next_event = [&]() {
    const auto [when, id, to_gpu, disk_end] = events.top();
    events.pop();
    if (to_gpu > 0) {  // a direct read's link half joins the link's queue
      const double link_end = serve(when, h2d_free, double(to_gpu) / bw.h2d, r.h2d_busy_s);
      events.push({std::max(disk_end, link_end), id, 0, 0});
      r.h2d_bytes += to_gpu;
      return when;
    }
    dispatch(sched.done(id), when);
    return when;
  };
  dispatch(sched.start(), 0);
  double compute_free = 0;
  r.step_end_s.resize(plan.trace.size());
  for (size_t t = 0; t < plan.trace.size(); ++t) {
    const int32_t x = plan.trace[t];
    while (!events.empty() && std::get<0>(events.top()) <= compute_free) next_event();
    dispatch(sched.step(x), compute_free);
    double now = compute_free;
    while (!sched.on_gpu(x)) {
      if (events.empty())
        throw std::logic_error("scheduler stalled at step " + std::to_string(t) + " (tensor " +
                               std::to_string(x) + " never reaches the GPU)");
      now = std::max(now, next_event());
    }
    r.stall_s += now - compute_free;
    const double c = plan.compute_at(int64_t(t));
    r.compute_s += c;
    compute_free = now + c;
    r.step_end_s[t] = compute_free;
  }
  // The final flush: every dirty byte reaches the disk.
  while (!events.empty() && std::get<0>(events.top()) <= compute_free) next_event();
  dispatch(sched.flush(), compute_free);
  double end = compute_free;
  while (!sched.flushed()) {
    if (events.empty())
      throw std::logic_error("scheduler stalled in the final flush (dirty data never written)");
    end = std::max(end, next_event());
  }
  r.time_s = end;
  r.peak_gpu_bytes = sched.stats().peak_gpu;
  r.peak_pinned_bytes = sched.stats().peak_pinned;
  return r;
}

}  // namespace infinity
