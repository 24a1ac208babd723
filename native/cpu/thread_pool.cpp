#include "cpu/thread_pool.h"

#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kvmux {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kTasksPerThread = 4;
constexpr int kMaxHelpers = 255;
// How long an idle helper spins before it sleeps: longer than the gap between a decode step's kernels (tens
// of microseconds of Python), shorter than the gap between steps.
constexpr auto kHelperSpin = std::chrono::microseconds(200);
// A wait on a helper's task longer than this (plus twice the caller's own mean task) is a stall: the helper
// was descheduled mid-task.
constexpr auto kStallBase = std::chrono::microseconds(50);
// How long the caller spins on helpers' tasks before it also yields its core.
constexpr auto kYieldAfter = std::chrono::microseconds(500);
// After a stall the caller works alone for kSoloFirst, doubling up to kSoloMost while stalls recur, and back
// to kSoloFirst after kCallsToForgive shared calls without one.
constexpr auto kSoloFirst = std::chrono::milliseconds(1);
constexpr auto kSoloMost = std::chrono::milliseconds(256);
constexpr int64_t kCallsToForgive = 256;

void futex_wait(std::atomic<uint32_t>* word, uint32_t seen) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
    if (word->load() == seen) std::this_thread::yield();
#endif
}

void futex_wake_all(std::atomic<uint32_t>* word) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
#else
    (void)word;
#endif
}

std::atomic<int> task_delay_us{0};

void run_one(TaskFn fn, void* ctx, int64_t task) {
    if (const int most = task_delay_us.load(std::memory_order_relaxed)) {
        thread_local uint64_t state = 0x9e3779b97f4a7c15ull ^ reinterpret_cast<uintptr_t>(&state);
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        const int us = static_cast<int>(state % static_cast<uint64_t>(most + 1));
        if (us % 4 == 0)
            std::this_thread::yield();
        else
            std::this_thread::sleep_for(std::chrono::microseconds(us));
    }
    fn(ctx, task);
}

struct alignas(64) Pool {
    // The job: written by the caller that holds `busy` before it bumps `generation`. `next` carries the
    // generation in its high half, so a helper that read an older job's fields cannot claim a newer job's task.
    std::atomic<TaskFn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> tasks{0};
    std::atomic<int> helper_limit{0};
    alignas(64) std::atomic<uint64_t> next{0};
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) std::atomic<uint32_t> generation{0};  // the futex word helpers sleep on
    std::atomic<int> sleepers{0};
    alignas(64) std::atomic<bool> busy{false};
    std::atomic<int> helpers{0};  // started; only the caller holding `busy` starts more
    // The caller's stall policy (touched only while holding `busy`).
    Clock::time_point solo_until{};
    Clock::duration solo_for = kSoloFirst;
    int64_t calls_since_stall = 0;
    // Counters for pool_stats.
    std::atomic<int64_t> calls{0}, shared_calls{0}, stalls{0}, solo_calls{0};
    alignas(64) std::atomic<int64_t> helper_tasks{0};

    // Claims and runs tasks of generation g until none is left; returns how many it ran.
    int64_t work(uint32_t g, TaskFn f, void* c, int64_t n) {
        int64_t ran = 0;
        uint64_t cur = next.load(std::memory_order_relaxed);
        for (;;) {
            if (static_cast<uint32_t>(cur >> 32) != g || static_cast<int64_t>(cur & 0xffffffffu) >= n) return ran;
            if (!next.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel, std::memory_order_relaxed))
                continue;
            run_one(f, c, static_cast<int64_t>(cur & 0xffffffffu));
            done.fetch_add(1, std::memory_order_release);
            ++ran;
            cur = next.load(std::memory_order_relaxed);
        }
    }

    void helper_loop(int index) {
        uint32_t seen = generation.load(std::memory_order_acquire);
        for (;;) {
            const auto spin_end = Clock::now() + kHelperSpin;
            uint32_t g;
            for (int i = 0; (g = generation.load(std::memory_order_acquire)) == seen; ++i) {
                _mm_pause();
                if ((i & 63) == 63 && Clock::now() > spin_end) {
                    sleepers.fetch_add(1, std::memory_order_seq_cst);
                    if (generation.load(std::memory_order_seq_cst) == seen) futex_wait(&generation, seen);
                    sleepers.fetch_sub(1, std::memory_order_relaxed);
                }
            }
            seen = g;
            if (index >= helper_limit.load(std::memory_order_relaxed)) continue;
            const TaskFn f = fn.load(std::memory_order_relaxed);
            void* const c = ctx.load(std::memory_order_relaxed);
            const int64_t n = tasks.load(std::memory_order_relaxed);
            // Pairs with the caller's release fence: had these reads seen a newer call's fields, the claim in
            // work() sees that call's closed counter and takes nothing (a seqlock's read side).
            std::atomic_thread_fence(std::memory_order_acquire);
            const int64_t ran = work(g, f, c, n);
            if (ran) helper_tasks.fetch_add(ran, std::memory_order_relaxed);
        }
    }

    void start_helpers(int wanted) {
        for (int index = helpers.load(); index < std::min(wanted, kMaxHelpers); helpers.store(++index))
            std::thread([this, index] { helper_loop(index); }).detach();
    }
};

Pool& pool() {
    // Never destroyed: helpers run until the process ends, and a static destructor would race them.
    static Pool* p = [] {
        auto* created = new Pool;
        // A forked child has none of the parent's threads: it starts its own helpers when it needs them.
        pthread_atfork(nullptr, nullptr, [] {
            Pool& child = pool();
            child.helpers.store(0);
            child.sleepers.store(0);
            child.busy.store(false);
        });
        return created;
    }();
    return *p;
}

void run_alone(int64_t tasks, TaskFn fn, void* ctx) {
    for (int64_t t = 0; t < tasks; ++t) run_one(fn, ctx, t);
}

}  // namespace

int64_t task_count(int64_t n, int threads, int64_t min_items) {
    if (threads <= 1 || n <= 0) return 1;
    return std::max<int64_t>(1, std::min<int64_t>(n / std::max<int64_t>(min_items, 1), threads * kTasksPerThread));
}

void run_tasks(int64_t tasks, int max_threads, TaskFn fn, void* ctx) {
    Pool& p = pool();
    p.calls.fetch_add(1, std::memory_order_relaxed);
    if (tasks <= 1 || max_threads <= 1 || p.busy.exchange(true, std::memory_order_acquire))
        return run_alone(tasks, fn, ctx);
    const auto start = Clock::now();
    if (start < p.solo_until) {
        p.solo_calls.fetch_add(1, std::memory_order_relaxed);
        run_alone(tasks, fn, ctx);
        p.busy.store(false, std::memory_order_release);
        return;
    }
    p.start_helpers(max_threads - 1);
    p.shared_calls.fetch_add(1, std::memory_order_relaxed);
    const uint32_t g = p.generation.load(std::memory_order_relaxed) + 1;
    // Close the counter before the fields change: a helper that read the previous call's generation and is
    // about to claim with a mix of old and new fields then finds no task to take.
    p.next.store(static_cast<uint64_t>(g) << 32 | 0xffffffffu, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    p.fn.store(fn, std::memory_order_relaxed);
    p.ctx.store(ctx, std::memory_order_relaxed);
    p.tasks.store(tasks, std::memory_order_relaxed);
    p.helper_limit.store(max_threads - 1, std::memory_order_relaxed);
    p.done.store(0, std::memory_order_relaxed);
    p.next.store(static_cast<uint64_t>(g) << 32, std::memory_order_release);
    p.generation.store(g, std::memory_order_seq_cst);
    if (p.sleepers.load(std::memory_order_seq_cst) > 0) futex_wake_all(&p.generation);

    const int64_t own = p.work(g, fn, ctx, tasks);
    const auto worked = Clock::now();
    for (int i = 1; p.done.load(std::memory_order_acquire) < tasks; ++i) {
        _mm_pause();
        // A helper put on this thread's core can only finish its task if this thread lets it run; yielding
        // sooner hands the core to whatever else spins there (torch's own OpenMP threads) for a time slice.
        if (i % 1024 == 0 && Clock::now() - worked > kYieldAfter) std::this_thread::yield();
    }
    const auto waited = Clock::now() - worked;
    const auto mean_task = own ? (worked - start) / own : Clock::duration::zero();
    if (waited > kStallBase + 2 * mean_task && !task_delay_us.load(std::memory_order_relaxed)) {
        p.stalls.fetch_add(1, std::memory_order_relaxed);
        p.solo_until = Clock::now() + p.solo_for;
        p.solo_for = std::min<Clock::duration>(2 * p.solo_for, kSoloMost);
        p.calls_since_stall = 0;
    } else if (++p.calls_since_stall == kCallsToForgive) {
        p.solo_for = kSoloFirst;
    }
    p.busy.store(false, std::memory_order_release);
}

PoolStats pool_stats() {
    Pool& p = pool();
    return {p.calls.load(), p.shared_calls.load(), p.helper_tasks.load(), p.stalls.load(), p.solo_calls.load(),
            p.helpers.load()};
}

void set_task_delay(int max_us) { task_delay_us.store(std::max(0, max_us)); }

}  // namespace kvmux
