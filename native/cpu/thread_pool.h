// The one thread pool every CPU kernel's parallel work runs on.
//
// A kernel splits its work into many small tasks (task = a run of weight panels, a row block, a query
// tile and head); the calling thread and the pool's helpers take them from one counter, so a thread the OS
// has not scheduled simply takes none and the threads that run do its share. The call returns when every
// task is done, not when every thread has checked in: a helper that wakes after the last task was taken
// finds nothing and goes back to waiting, and nobody waits for it. Helpers spin briefly between calls (a
// decode step makes hundreds of them, tens of microseconds apart) and then sleep on a futex.
//
// What dynamic tasks cannot fix is a helper the OS takes off the CPU in the middle of a task: the caller has
// to wait for that task, up to a time slice of whatever else runs on that core (milliseconds). When such a
// stall happens, the caller runs the following calls alone for a while, doubling that while on each new
// stall: beside a busy neighbour that is almost always, so kvmux then works on the core it has rather than
// waiting on the one it shares; on a quiet machine stalls are rare and every call uses every thread.
#pragma once

#include <cstdint>
#include <type_traits>

namespace kvmux {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for every t in [0, tasks), on at most max_threads threads (the calling one among them), and
// returns when all are done. A call made while the pool is running another (another Python thread's kernel, a
// task that calls a kernel) runs its tasks on the calling thread alone. Tasks must not throw.
void run_tasks(int64_t tasks, int max_threads, TaskFn fn, void* ctx);

template <typename F>
void parallel_for(int64_t tasks, int max_threads, F&& fn) {
    run_tasks(tasks, max_threads, [](void* f, int64_t t) { (*static_cast<std::remove_reference_t<F>*>(f))(t); },
              const_cast<void*>(static_cast<const void*>(&fn)));
}

// [begin, end) of part `part` of `parts` equal parts of n (the tasks of a kernel that splits n items).
struct Span {
    int64_t begin, end;
};
inline Span split(int64_t n, int64_t parts, int64_t part) { return {n * part / parts, n * (part + 1) / parts}; }

// Tasks for n items: about kTasksPerThread per thread so a missing thread's share is spread over the others,
// but never fewer than min_items per task (a task must outweigh taking it).
int64_t task_count(int64_t n, int threads, int64_t min_items);

struct PoolStats {
    int64_t calls;          // run_tasks calls
    int64_t shared_calls;   // of which the helpers were asked to join
    int64_t helper_tasks;   // tasks the helpers ran
    int64_t stalls;         // calls whose caller waited on a helper's unfinished task past the stall threshold
    int64_t solo_calls;     // calls run alone because of a recent stall
    int helpers;            // helper threads started so far
};
PoolStats pool_stats();

// A test hook: with max_us > 0 every task first sleeps a pseudo-random 0..max_us microseconds, so that tests
// see threads delayed and descheduled at random points (results must not change); meanwhile no call goes
// solo, so the delays land in shared calls. 0 turns it off.
void set_task_delay(int max_us);

}  // namespace kvmux
