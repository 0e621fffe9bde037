// Pinned-memory arena: carves one large region into aligned blocks.
// Plain C++17, no Python or torch headers. The arena hands out offsets, never
// pointers: the caller owns the region and adds its base address.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace infinity {

// Raised when a request cannot be satisfied; the message carries the numbers.
class CapacityError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ArenaStats {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t free_bytes = 0;
  uint64_t largest_free_bytes = 0;
  uint64_t allocation_count = 0;
  uint64_t free_block_count = 0;
};

// Best-fit allocator with immediate coalescing of neighbouring free blocks.
// Every offset and every block size is a multiple of `alignment` (a power of two).
// A zero-byte request takes one alignment unit so that offsets stay unique.
// Thread-safe: one mutex guards all state.
class Arena {
 public:
  Arena(uint64_t capacity_bytes, uint64_t alignment);

  uint64_t alloc(uint64_t nbytes);                 // throws CapacityError
  // Mark [offset, offset + nbytes) as allocated (rebuilding state from a manifest).
  // Throws std::invalid_argument when unaligned or not entirely free.
  void reserve(uint64_t offset, uint64_t nbytes);
  void free(uint64_t offset);                      // throws std::invalid_argument
  uint64_t size_of(uint64_t offset) const;         // bytes reserved for a live block
  ArenaStats stats() const;

  uint64_t capacity_bytes() const { return capacity_; }
  uint64_t alignment() const { return alignment_; }

 private:
  void insert_free_locked(uint64_t offset, uint64_t nbytes);
  void erase_free_locked(std::map<uint64_t, uint64_t>::iterator it);

  uint64_t capacity_;
  uint64_t alignment_;
  uint64_t used_ = 0;
  mutable std::mutex mutex_;
  std::map<uint64_t, uint64_t> free_by_offset_;        // offset -> size
  std::multimap<uint64_t, uint64_t> free_by_size_;     // size -> offset (best fit)
  std::map<uint64_t, uint64_t> live_;                  // offset -> reserved size
};

std::string format_bytes(uint64_t nbytes);

}  // namespace infinity
