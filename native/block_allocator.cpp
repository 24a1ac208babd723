#include "block_allocator.h"

#include <algorithm>

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
    BlockId block = free_.back();
    free_.pop_back();
    refcount_[block] = 1;
    return block;
}

void BlockAllocator::release(BlockId block) { free_.push_back(block); }

BlockAllocator::BlockId BlockAllocator::allocate() {
    ensure_free(1);
    return take_free_block();
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

void BlockAllocator::incref(BlockId block) {
    // A free block has no owner whose data could be shared; increfing it would
    // resurrect a block that is still on the free list.
    check_used(block);
    ++refcount_[block];
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

std::pair<BlockAllocator::BlockId, bool> BlockAllocator::copy_on_write(BlockId block) {
    check_used(block);
    if (refcount_[block] == 1) return {block, false};
    BlockId copy = allocate();
    --refcount_[block];  // still >= 1: the other owners keep it
    return {copy, true};
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
    }
    BlockId used = 0;
    for (BlockId b = 0; b < n; ++b) {
        if (on_free_list[b]) continue;
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
