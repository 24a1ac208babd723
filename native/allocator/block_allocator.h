// Fixed pool of KV-cache blocks shared by reference count.
//
// Blocks are identified by their index in [0, num_blocks). A block is either
// free (refcount 0, on the free list) or in use (refcount >= 1). Every public
// method validates its whole input before touching state, so an exception
// never leaves the pool half-updated.
//
// Prefix caching: a full block whose KV has been computed can be registered
// under a content hash (chained over every token before it, computed by the
// caller). A cached block whose refcount drops to zero is not forgotten: it
// waits on an LRU list and still counts as free. An allocation takes plain
// free blocks first and evicts the least recently used cached block only when
// none are left; a lookup hit on a cached free block revives it.
//
// All transitions between "free" and "in use" go through take_free_block() /
// release(), which is where the cache plugs in.
//
// Tiers: the same class keeps the books of the host and disk pools below the
// device pool. There, acquire() hands out one block per content hash (a block
// shared by several swapped sequences is stored once), and with
// record_evictions on, every cached block whose contents an allocation
// reclaims is logged so the caller can move it a tier down before it is
// overwritten.
#pragma once

#include <cstdint>
#include <list>
#include <stdexcept>
#include <string>
#include <unordered_map>
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
    using Hash = std::uint64_t;

    explicit BlockAllocator(BlockId num_blocks);

    BlockId num_blocks() const { return static_cast<BlockId>(refcount_.size()); }
    // Cached blocks nobody holds are free: they are reclaimed on demand.
    BlockId num_free() const { return static_cast<BlockId>(free_.size() + lru_.size()); }
    BlockId num_cached() const { return static_cast<BlockId>(by_hash_.size()); }
    BlockId num_cached_free() const { return static_cast<BlockId>(lru_.size()); }
    BlockId num_shared() const;  // blocks with more than one reference

    std::vector<BlockId> allocate_n(BlockId n);  // all or nothing

    bool decref(BlockId block);  // true if the block became free
    std::int32_t refcount(BlockId block) const;

    // One more reference on each block, atomically. A free block has no owner
    // whose data could be shared, so forking one is refused.
    void fork(const std::vector<BlockId>& blocks);
    void free_blocks(const std::vector<BlockId>& blocks);  // decref each, atomically

    // Blocks cached under the longest leading run of `hashes` (not taken).
    std::vector<BlockId> lookup(const std::vector<Hash>& hashes) const;
    // Free blocks that allocate_with_prefix(hashes, n) would consume.
    BlockId prefix_cost(const std::vector<Hash>& hashes, BlockId n) const;
    // n blocks for a new sequence, all or nothing: the cached blocks matching
    // the leading hashes (one more reference each, reviving free ones), then
    // fresh blocks. Returns the blocks and how many came from the cache.
    std::pair<std::vector<BlockId>, BlockId> allocate_with_prefix(const std::vector<Hash>& hashes,
                                                                   BlockId n);
    // Publish an in-use block's computed KV under `hash`. Returns false (and
    // leaves the block uncached) when another block already holds that hash:
    // the same content was computed twice, and the first copy stays canonical.
    bool register_block(BlockId block, Hash hash);
    bool has_hash(BlockId block) const;
    // BlockError when the block is not cached. Production code never asks (it
    // keeps hashes beside its block tables); the tests read it as the oracle
    // of which contents a cached block must hold.
    Hash block_hash(BlockId block) const;
    // Drop up to n least recently used cached free blocks from the cache
    // (they stay free); returns how many were dropped.
    BlockId evict(BlockId n);

    // One block per hash (the cached one, another reference on it, reviving it
    // when free; else a fresh block registered under the hash: the caller
    // copies the contents in before anyone reads them), then n_plain fresh
    // uncached blocks; all or nothing. Returns the blocks and, per hash,
    // whether it was already cached (nothing to copy).
    std::pair<std::vector<BlockId>, std::vector<bool>> acquire(const std::vector<Hash>& hashes,
                                                               BlockId n_plain);
    // Free blocks acquire(hashes, n_plain) would consume.
    BlockId acquire_cost(const std::vector<Hash>& hashes, BlockId n_plain) const;

    // Log (block, hash) of every cached free block an allocation reclaims.
    bool record_evictions() const { return record_evictions_; }
    void set_record_evictions(bool on) { record_evictions_ = on; }
    // The log since the last call, oldest first; clears it.
    std::vector<std::pair<BlockId, Hash>> take_evicted();
    // Entries in the log now (every allocation's caller takes them at once: more between steps means one did not).
    BlockId num_evicted() const { return static_cast<BlockId>(evicted_.size()); }

    // Throws std::logic_error describing the first inconsistency found.
    void check_invariants() const;

private:
    void check_id(BlockId block) const;
    void check_used(BlockId block) const;
    void ensure_free(BlockId n) const;
    BlockId take_free_block();
    void release(BlockId block);
    void uncache(BlockId block);

    std::vector<std::int32_t> refcount_;
    // LIFO stack: recently freed blocks are reused first (warm in cache), and a
    // fresh pool is stacked in reverse so it hands out 0, 1, 2, ...
    // Holds only uncached free blocks; cached free ones are on lru_.
    std::vector<BlockId> free_;

    // Cache: hash -> block and back, for every cached block, in use or free.
    std::unordered_map<Hash, BlockId> by_hash_;
    std::vector<Hash> hash_;
    std::vector<bool> cached_;
    // Cached free blocks, least recently used first; lru_pos_ finds a block's
    // node in O(1) when a hit revives it.
    std::list<BlockId> lru_;
    std::vector<std::list<BlockId>::iterator> lru_pos_;

    bool record_evictions_ = false;
    std::vector<std::pair<BlockId, Hash>> evicted_;
};

}  // namespace kvmux
