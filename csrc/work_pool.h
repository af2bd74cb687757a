// A small work-claiming thread pool for the CPU decode kernels.
//
// Why not OpenMP: a `parallel for` ends in a barrier that waits for every thread of the
// team, so one thread the OS has descheduled (another process, a neighbour's test run, a
// server's tokenizer thread) stalls the whole linear for a scheduler slice (milliseconds,
// against a 50 us kernel). Measured on the 2-core EPYC with a loaded machine, that made a
// decode step 3x slower than PyTorch's single-threaded GEMV (bench/RESULTS.md).
//
// Here the caller works too and never waits for a thread that has not started: the work is
// cut into chunks, and every participant (the caller and the workers that are awake)
// claims the next chunk from one atomic word until none are left. The caller then waits
// only for chunks already claimed, which are short. A worker that wakes late finds nothing
// to claim and goes back to waiting.
#pragma once

#include <atomic>
#include <cstdint>

namespace cotrt {

// fn(ctx, chunk) for every chunk in [0, chunks), on up to `threads` threads (the caller
// included; <= 0: the machine's hardware threads). Concurrent callers are safe: a caller
// that finds the pool busy runs its chunks alone.
void parallel_chunks(int64_t chunks, int threads, void (*fn)(const void* ctx, int64_t chunk),
                     const void* ctx);

// Workers started so far (for tests and the bench header).
int pool_workers();

}  // namespace cotrt
