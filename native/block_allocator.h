// Fixed pool of KV-cache blocks shared by reference count.
//
// Blocks are identified by their index in [0, num_blocks). A block is either
// free (refcount 0, on the free list) or in use (refcount >= 1). Every public
// method validates its whole input before touching state, so an exception
// never leaves the pool half-updated.
//
// Prefix caching will later keep freed full blocks around, keyed by a content
// hash, in an LRU of reclaimable blocks. All transitions between "free" and
// "in use" therefore go through take_free_block() / release(): that is where
// the cache plugs in, without changing the public API.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvmux {

// The pool cannot satisfy a request; nothing was allocated.
class OutOfBlocks : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A caller bug: unknown block, double free, negative count, ...
class BlockError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class BlockAllocator {
public:
    // Block ids arrive as int64 so that absurd values coming from Python get a
    // BlockError naming them instead of an integer-conversion failure.
    using BlockId = std::int64_t;

    explicit BlockAllocator(BlockId num_blocks);

    BlockId num_blocks() const { return static_cast<BlockId>(refcount_.size()); }
    BlockId num_free() const { return static_cast<BlockId>(free_.size()); }

    BlockId allocate();
    std::vector<BlockId> allocate_n(BlockId n);  // all or nothing

    void incref(BlockId block);
    bool decref(BlockId block);  // true if the block became free
    std::int32_t refcount(BlockId block) const;

    void fork(const std::vector<BlockId>& blocks);         // incref each, atomically
    void free_blocks(const std::vector<BlockId>& blocks);  // decref each, atomically

    // A writer about to modify `block` gets a private copy when it is shared:
    // returns (new block, true) after moving one reference over, or
    // (block, false) when the caller is the sole owner.
    std::pair<BlockId, bool> copy_on_write(BlockId block);

    // Throws std::logic_error describing the first inconsistency found.
    void check_invariants() const;

private:
    void check_id(BlockId block) const;
    void check_used(BlockId block) const;
    void ensure_free(BlockId n) const;
    BlockId take_free_block();
    void release(BlockId block);

    std::vector<std::int32_t> refcount_;
    // LIFO stack: recently freed blocks are reused first (warm in cache), and a
    // fresh pool is stacked in reverse so it hands out 0, 1, 2, ...
    std::vector<BlockId> free_;
};

}  // namespace kvmux
