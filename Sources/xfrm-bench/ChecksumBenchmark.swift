// `xfrm-bench checksum`: the Internet checksum's sum (RFC 1071) as the daemon takes it when it cuts TCP superpackets
// and checks segments before coalescing — `InternetChecksum.partial`, which hands 256 bytes or more to the C bulk sum
// (AVX2 lanes where the CPU has them) — against the inlined Swift loop (`inlinePartial`) on the same bytes in the same
// run, in ns per sum, one thread (thread CPU time, best of the rounds). Each size is summed at four start offsets in
// turn (0–3: aligned and not), over a buffer that stays in the cache. Both sums are checked equal before timing.

import Foundation
import XFRMPacket

func checksumBenchmark(seconds: Double, rounds: Int, sizes: [Int]) {
    let capacity = (sizes.max() ?? 0) + 64
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
    defer { buffer.deallocate() }
    var rng = SystemRandomNumberGenerator()
    for i in 0..<capacity { buffer.storeBytes(of: UInt8.random(in: 0...255, using: &rng), toByteOffset: i, as: UInt8.self) }
    var rows: [(size: Int, inline: Double, bulk: Double)] = []
    var sink: UInt64 = 0
    for size in sizes {
        for offset in 0..<4 {
            let a = InternetChecksum.finish(InternetChecksum.partial(buffer + offset, count: size))
            let b = InternetChecksum.finish(InternetChecksum.inlinePartial(buffer + offset, count: size))
            guard a == b else { fatalError("xfrm-bench checksum: the bulk and inline sums differ at \(size) bytes") }
        }
        var best = (inline: Double.infinity, bulk: Double.infinity)
        for _ in 0..<rounds {
            var k = 0
            let (inlinePerSecond, _) = measure(seconds: seconds, batch: 256) { batch in
                for _ in 0..<batch {
                    sink &+= InternetChecksum.inlinePartial(buffer + (k & 3), count: size)
                    k &+= 1
                }
            }
            let (bulkPerSecond, _) = measure(seconds: seconds, batch: 256) { batch in
                for _ in 0..<batch {
                    sink &+= InternetChecksum.partial(buffer + (k & 3), count: size)
                    k &+= 1
                }
            }
            best = (min(best.inline, 1e9 / inlinePerSecond), min(best.bulk, 1e9 / bulkPerSecond))
        }
        rows.append((size, best.inline, best.bulk))
    }
    print("| bytes | inline Swift ns | partial (bulk from \(InternetChecksum.bulkThreshold) B) ns | ratio |")
    print("|---:|---:|---:|---:|")
    for r in rows {
        print("| \(r.size) | \(String(format: "%.1f", r.inline)) | \(String(format: "%.1f", r.bulk)) | "
              + "\(String(format: "%.2f", r.inline / r.bulk)) |")
    }
    for r in rows {
        print("{\"bench\":\"checksum\",\"size\":\(r.size),\"inline_ns\":\(String(format: "%.1f", r.inline)),"
              + "\"partial_ns\":\(String(format: "%.1f", r.bulk)),\"ratio\":\(String(format: "%.3f", r.inline / r.bulk))}")
    }
    if sink == 1 { print("") }  // keeps the sums from being optimized away
}
