#include "allocator/block_allocator.h"

#include <algorithm>
#include <iterator>

namespace kvmux {

namespace {

std::string block_str(BlockAllocator::BlockId block) {
    return "block " + std::to_string(block);
}

}  // namespace

BlockAllocator::BlockAllocator(BlockId num_blocks) {
    if (num_blocks < 0) {
        throw BlockError("num_blocks must be >= 0, got " + std::to_string(num_blocks));
    }
    refcount_.assign(static_cast<std::size_t>(num_blocks), 0);
    hash_.assign(static_cast<std::size_t>(num_blocks), 0);
    cached_.assign(static_cast<std::size_t>(num_blocks), false);
    lru_pos_.resize(static_cast<std::size_t>(num_blocks));
    free_.reserve(static_cast<std::size_t>(num_blocks));
    for (BlockId b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

void BlockAllocator::check_id(BlockId block) const {
    if (block < 0 || block >= num_blocks()) {
        throw BlockError(block_str(block) + " out of range [0, " +
                         std::to_string(num_blocks()) + ")");
    }
}

void BlockAllocator::check_used(BlockId block) const {
    check_id(block);
    if (refcount_[block] == 0) throw BlockError(block_str(block) + " is already free");
}

void BlockAllocator::ensure_free(BlockId n) const {
    if (n > num_free()) {
        throw OutOfBlocks("out of KV blocks: need " + std::to_string(n) + ", " +
                          std::to_string(num_free()) + " free of " +
                          std::to_string(num_blocks()));
    }
}

BlockAllocator::BlockId BlockAllocator::take_free_block() {
    BlockId block;
    if (!free_.empty()) {
        block = free_.back();
        free_.pop_back();
    } else {
        // Only now does a cached block lose its contents: the coldest one.
        block = lru_.front();
        lru_.pop_front();
        if (record_evictions_) evicted_.emplace_back(block, hash_[block]);
        uncache(block);
    }
    refcount_[block] = 1;
    return block;
}

void BlockAllocator::release(BlockId block) {
    if (cached_[block]) {
        lru_.push_back(block);
        lru_pos_[block] = std::prev(lru_.end());
    } else {
        free_.push_back(block);
    }
}

void BlockAllocator::uncache(BlockId block) {
    by_hash_.erase(hash_[block]);
    cached_[block] = false;
    hash_[block] = 0;
}

BlockAllocator::BlockId BlockAllocator::num_shared() const {
    return static_cast<BlockId>(
        std::count_if(refcount_.begin(), refcount_.end(), [](std::int32_t r) { return r > 1; }));
}

std::vector<BlockAllocator::BlockId> BlockAllocator::lookup(const std::vector<Hash>& hashes) const {
    // Hashes are chained, so a miss ends the run: nothing after it can match
    // the same prefix.
    std::vector<BlockId> blocks;
    for (Hash h : hashes) {
        auto it = by_hash_.find(h);
        if (it == by_hash_.end()) break;
        blocks.push_back(it->second);
    }
    return blocks;
}

BlockAllocator::BlockId BlockAllocator::prefix_cost(const std::vector<Hash>& hashes, BlockId n) const {
    if (n < 0) throw BlockError("cannot allocate a negative number of blocks (" + std::to_string(n) + ")");
    std::vector<BlockId> hits = lookup(hashes);
    if (static_cast<BlockId>(hits.size()) > n) hits.resize(static_cast<std::size_t>(n));
    BlockId revived = std::count_if(hits.begin(), hits.end(), [&](BlockId b) { return refcount_[b] == 0; });
    return n - static_cast<BlockId>(hits.size()) + revived;
}

std::pair<std::vector<BlockAllocator::BlockId>, BlockAllocator::BlockId>
BlockAllocator::allocate_with_prefix(const std::vector<Hash>& hashes, BlockId n) {
    ensure_free(prefix_cost(hashes, n));
    std::vector<BlockId> blocks = lookup(hashes);
    if (static_cast<BlockId>(blocks.size()) > n) blocks.resize(static_cast<std::size_t>(n));
    const BlockId hits = static_cast<BlockId>(blocks.size());
    // Revive the hits before taking fresh blocks, so that an eviction made
    // for the fresh ones can never pick a block this sequence is reusing.
    for (BlockId b : blocks) {
        if (refcount_[b] == 0) lru_.erase(lru_pos_[b]);
        ++refcount_[b];
    }
    blocks.reserve(static_cast<std::size_t>(n));
    for (BlockId i = hits; i < n; ++i) blocks.push_back(take_free_block());
    return {blocks, hits};
}

bool BlockAllocator::register_block(BlockId block, Hash hash) {
    check_used(block);
    if (cached_[block]) {
        if (hash_[block] != hash) {
            throw BlockError(block_str(block) + " is already cached under another hash");
        }
        return true;
    }
    if (by_hash_.count(hash)) return false;
    by_hash_.emplace(hash, block);
    hash_[block] = hash;
    cached_[block] = true;
    return true;
}

bool BlockAllocator::has_hash(BlockId block) const {
    check_id(block);
    return cached_[block];
}

BlockAllocator::Hash BlockAllocator::block_hash(BlockId block) const {
    if (!has_hash(block)) throw BlockError(block_str(block) + " is not cached");
    return hash_[block];
}

BlockAllocator::BlockId BlockAllocator::evict(BlockId n) {
    BlockId dropped = 0;
    for (; dropped < n && !lru_.empty(); ++dropped) {
        BlockId block = lru_.front();
        lru_.pop_front();
        uncache(block);
        free_.push_back(block);
    }
    return dropped;
}

BlockAllocator::BlockId BlockAllocator::acquire_cost(const std::vector<Hash>& hashes, BlockId n_plain) const {
    if (n_plain < 0) throw BlockError("cannot allocate a negative number of blocks (" + std::to_string(n_plain) + ")");
    // A hash listed twice takes one block.
    std::unordered_map<Hash, bool> seen;
    BlockId cost = n_plain;
    for (Hash h : hashes) {
        if (!seen.emplace(h, true).second) continue;
        auto it = by_hash_.find(h);
        if (it == by_hash_.end() || refcount_[it->second] == 0) ++cost;  // fresh, or revived from the LRU
    }
    return cost;
}

std::pair<std::vector<BlockAllocator::BlockId>, std::vector<bool>>
BlockAllocator::acquire(const std::vector<Hash>& hashes, BlockId n_plain) {
    ensure_free(acquire_cost(hashes, n_plain));
    std::vector<BlockId> blocks(hashes.size(), -1);
    std::vector<bool> hit(hashes.size(), false);
    // Hits first, as in allocate_with_prefix: taking fresh blocks may reclaim
    // LRU blocks, and must never reclaim one about to be reused here.
    for (std::size_t i = 0; i < hashes.size(); ++i) {
        auto it = by_hash_.find(hashes[i]);
        if (it == by_hash_.end()) continue;
        BlockId b = it->second;
        if (refcount_[b] == 0) lru_.erase(lru_pos_[b]);
        ++refcount_[b];
        blocks[i] = b;
        hit[i] = true;
    }
    for (std::size_t i = 0; i < hashes.size(); ++i) {
        if (hit[i]) continue;
        auto it = by_hash_.find(hashes[i]);  // listed twice: the first occurrence registered it
        if (it != by_hash_.end()) {
            blocks[i] = it->second;
            ++refcount_[it->second];
            hit[i] = true;
            continue;
        }
        BlockId b = take_free_block();
        by_hash_.emplace(hashes[i], b);
        hash_[b] = hashes[i];
        cached_[b] = true;
        blocks[i] = b;
    }
    for (BlockId i = 0; i < n_plain; ++i) blocks.push_back(take_free_block());
    return {blocks, hit};
}

std::vector<std::pair<BlockAllocator::BlockId, BlockAllocator::Hash>> BlockAllocator::take_evicted() {
    std::vector<std::pair<BlockId, Hash>> out;
    out.swap(evicted_);
    return out;
}

std::vector<BlockAllocator::BlockId> BlockAllocator::allocate_n(BlockId n) {
    if (n < 0) throw BlockError("cannot allocate a negative number of blocks (" +
                                std::to_string(n) + ")");
    ensure_free(n);
    std::vector<BlockId> blocks;
    blocks.reserve(static_cast<std::size_t>(n));
    for (BlockId i = 0; i < n; ++i) blocks.push_back(take_free_block());
    return blocks;
}

bool BlockAllocator::decref(BlockId block) {
    check_used(block);
    if (--refcount_[block] > 0) return false;
    release(block);
    return true;
}

std::int32_t BlockAllocator::refcount(BlockId block) const {
    check_id(block);
    return refcount_[block];
}

void BlockAllocator::fork(const std::vector<BlockId>& blocks) {
    for (BlockId b : blocks) check_used(b);
    for (BlockId b : blocks) ++refcount_[b];
}

void BlockAllocator::free_blocks(const std::vector<BlockId>& blocks) {
    // A list may name one block several times (one per reference held), so
    // validate occurrence counts, not just membership.
    std::vector<BlockId> sorted(blocks);
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t i = 0; i < sorted.size();) {
        BlockId b = sorted[i];
        check_used(b);
        std::size_t j = i;
        while (j < sorted.size() && sorted[j] == b) ++j;
        if (static_cast<std::int64_t>(j - i) > refcount_[b]) {
            throw BlockError(block_str(b) + " freed " + std::to_string(j - i) +
                             " times but has only " + std::to_string(refcount_[b]) +
                             " reference(s)");
        }
        i = j;
    }
    for (BlockId b : blocks) decref(b);
}

void BlockAllocator::check_invariants() const {
    const BlockId n = num_blocks();
    std::vector<bool> on_free_list(static_cast<std::size_t>(n), false);
    for (BlockId b : free_) {
        if (b < 0 || b >= n) {
            throw std::logic_error("free list holds " + block_str(b) + " out of range");
        }
        if (on_free_list[b]) throw std::logic_error("free list holds " + block_str(b) + " twice");
        on_free_list[b] = true;
        if (refcount_[b] != 0) {
            throw std::logic_error("free " + block_str(b) + " has refcount " +
                                   std::to_string(refcount_[b]));
        }
        if (cached_[b]) throw std::logic_error("uncached free list holds cached " + block_str(b));
    }
    std::vector<bool> on_lru(static_cast<std::size_t>(n), false);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        BlockId b = *it;
        if (b < 0 || b >= n) throw std::logic_error("LRU holds " + block_str(b) + " out of range");
        if (on_lru[b] || on_free_list[b]) {
            throw std::logic_error("LRU holds " + block_str(b) + " twice or also on the free list");
        }
        on_lru[b] = true;
        if (!cached_[b]) throw std::logic_error("LRU holds uncached " + block_str(b));
        if (refcount_[b] != 0) {
            throw std::logic_error("LRU " + block_str(b) + " has refcount " + std::to_string(refcount_[b]));
        }
        if (lru_pos_[b] != it) throw std::logic_error("stale LRU position for " + block_str(b));
    }
    BlockId num_cached_blocks = 0;
    for (BlockId b = 0; b < n; ++b) {
        if (!cached_[b]) continue;
        ++num_cached_blocks;
        auto found = by_hash_.find(hash_[b]);
        if (found == by_hash_.end() || found->second != b) {
            throw std::logic_error("cached " + block_str(b) + " is not under its hash in the map");
        }
    }
    if (num_cached_blocks != static_cast<BlockId>(by_hash_.size())) {
        throw std::logic_error("hash map has " + std::to_string(by_hash_.size()) + " entries for " +
                               std::to_string(num_cached_blocks) + " cached blocks");
    }
    BlockId used = 0;
    for (BlockId b = 0; b < n; ++b) {
        if (on_free_list[b] || on_lru[b]) continue;
        if (refcount_[b] <= 0) {
            throw std::logic_error(block_str(b) + " is not on the free list but has refcount " +
                                   std::to_string(refcount_[b]));
        }
        ++used;
    }
    if (used + num_free() != n) {
        throw std::logic_error(std::to_string(used) + " used + " + std::to_string(num_free()) +
                               " free != " + std::to_string(n) + " blocks");
    }
}

}  // namespace kvmux
