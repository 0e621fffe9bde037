#include "infinity/arena.h"

#include <cstdio>
#include <iterator>

namespace infinity {

std::string format_bytes(uint64_t nbytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(nbytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char buf[64];
  if (unit == 0) {
    std::snprintf(buf, sizeof(buf), "%llu B", static_cast<unsigned long long>(nbytes));
  } else {
    std::snprintf(buf, sizeof(buf), "%.2f %s", value, units[unit]);
  }
  return buf;
}

Arena::Arena(uint64_t capacity_bytes, uint64_t alignment)
    : capacity_(capacity_bytes), alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    throw std::invalid_argument("Arena alignment must be a power of two, got " +
                                std::to_string(alignment));
  }
  if (capacity_bytes % alignment != 0) {
    throw std::invalid_argument("Arena capacity " + std::to_string(capacity_bytes) +
                                " is not a multiple of the alignment " +
                                std::to_string(alignment));
  }
  if (capacity_bytes > 0) insert_free_locked(0, capacity_bytes);
}

void Arena::insert_free_locked(uint64_t offset, uint64_t nbytes) {
  free_by_offset_.emplace(offset, nbytes);
  free_by_size_.emplace(nbytes, offset);
}

void Arena::erase_free_locked(std::map<uint64_t, uint64_t>::iterator it) {
  auto range = free_by_size_.equal_range(it->second);
  for (auto s = range.first; s != range.second; ++s) {
    if (s->second == it->first) {
      free_by_size_.erase(s);
      break;
    }
  }
  free_by_offset_.erase(it);
}

uint64_t Arena::alloc(uint64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t want = nbytes == 0 ? alignment_ : nbytes;
  if (want > capacity_) {
    throw CapacityError("arena cannot fit " + format_bytes(nbytes) + ": capacity is " +
                        format_bytes(capacity_) + "; raise the pool's capacity_bytes");
  }
  want = (want + alignment_ - 1) & ~(alignment_ - 1);
  auto best = free_by_size_.lower_bound(want);
  if (best == free_by_size_.end()) {
    uint64_t largest = free_by_size_.empty() ? 0 : std::prev(free_by_size_.end())->first;
    throw CapacityError("arena cannot fit " + format_bytes(nbytes) + ": " +
                        format_bytes(capacity_ - used_) + " free of " + format_bytes(capacity_) +
                        ", largest free block " + format_bytes(largest) + " (" +
                        std::to_string(free_by_offset_.size()) +
                        " free blocks); free buffers or raise the pool's capacity_bytes");
  }
  const uint64_t offset = best->second;
  const uint64_t block = best->first;
  erase_free_locked(free_by_offset_.find(offset));
  if (block > want) insert_free_locked(offset + want, block - want);
  live_.emplace(offset, want);
  used_ += want;
  return offset;
}

void Arena::reserve(uint64_t offset, uint64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t want = nbytes == 0 ? alignment_ : (nbytes + alignment_ - 1) & ~(alignment_ - 1);
  if (offset % alignment_ != 0) {
    throw std::invalid_argument("arena reserve: offset " + std::to_string(offset) +
                                " is not a multiple of the alignment " +
                                std::to_string(alignment_));
  }
  // the free block that starts at or before offset must cover the whole range
  auto it = free_by_offset_.upper_bound(offset);
  if (it == free_by_offset_.begin()) {
    throw std::invalid_argument("arena reserve: [" + std::to_string(offset) + ", " +
                                std::to_string(offset + want) + ") is not free");
  }
  --it;
  const uint64_t start = it->first;
  const uint64_t size = it->second;
  if (offset + want > start + size) {
    throw std::invalid_argument("arena reserve: [" + std::to_string(offset) + ", " +
                                std::to_string(offset + want) + ") is not free");
  }
  erase_free_locked(it);
  if (offset > start) insert_free_locked(start, offset - start);
  if (start + size > offset + want) insert_free_locked(offset + want, start + size - offset - want);
  live_.emplace(offset, want);
  used_ += want;
}

void Arena::free(uint64_t offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto live = live_.find(offset);
  if (live == live_.end()) {
    throw std::invalid_argument("arena free: offset " + std::to_string(offset) +
                                " is not a live allocation (double free or foreign offset)");
  }
  uint64_t start = offset;
  uint64_t nbytes = live->second;
  used_ -= nbytes;
  live_.erase(live);

  auto next = free_by_offset_.lower_bound(start);
  if (next != free_by_offset_.end() && next->first == start + nbytes) {
    nbytes += next->second;
    erase_free_locked(next);
  }
  auto after = free_by_offset_.lower_bound(start);
  if (after != free_by_offset_.begin()) {
    auto prev = std::prev(after);
    if (prev->first + prev->second == start) {
      start = prev->first;
      nbytes += prev->second;
      erase_free_locked(prev);
    }
  }
  insert_free_locked(start, nbytes);
}

uint64_t Arena::size_of(uint64_t offset) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto live = live_.find(offset);
  if (live == live_.end()) {
    throw std::invalid_argument("arena: offset " + std::to_string(offset) +
                                " is not a live allocation");
  }
  return live->second;
}

ArenaStats Arena::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ArenaStats s;
  s.capacity_bytes = capacity_;
  s.used_bytes = used_;
  s.free_bytes = capacity_ - used_;
  s.largest_free_bytes = free_by_size_.empty() ? 0 : std::prev(free_by_size_.end())->first;
  s.allocation_count = live_.size();
  s.free_block_count = free_by_offset_.size();
  return s;
}

}  // namespace infinity
