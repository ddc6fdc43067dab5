// Timing and allocation counting shared by the benchmarks.

import CMallocCounter
import Foundation

func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Runs `body(batch)` repeatedly for about `seconds` of CPU time; returns (packets per second, allocs per packet).
func measure(seconds: Double, batch: Int = 256, _ body: (Int) -> Void) -> (pps: Double, allocs: Double) {
    body(batch)  // warm-up
    var packets = 0
    let a0 = xfrm_malloc_count()
    let t0 = threadCPUSeconds()
    var t = t0
    repeat {
        body(batch)
        packets += batch
        t = threadCPUSeconds()
    } while t - t0 < seconds
    let allocs = Double(xfrm_malloc_count() - a0) / Double(packets)
    return (Double(packets) / (t - t0), allocs)
}
