// xfrm-bench: benchmarks that report speed as ratios against a reference measured in the same run.
//
//   swift run -c release xfrm-bench esp [--seconds S] [--rounds N]     ESP encap/decap vs raw OpenSSL AES-GCM
//   swift run -c release xfrm-bench spd [--seconds S] [--rounds N] [--policies N[,N...]]
//                                          SPD lookup (default 1k/10k/100k/1M policies) vs a linear scan, and
//                                          the time to load them
//   swift run -c release xfrm-bench scale [--sas N[,N...]] [--policies N[,N...]]
//                                          resident memory per SA and per policy, add/delete rates (rows pair the
//                                          lists; default 1k/10k/100k/100k SAs with 1k/10k/100k/1M policies)
//   swift run -c release xfrm-bench engine [--check]   the daemon's per-packet path (both dispatchers) vs bare ESP,
//                                          with allocations per packet (--check: exit 1 if any)
//   swift run -c release xfrm-bench modes [--packets N] [--rounds N] [--svg PATH]
//                                          host CPU per packet and throughput: baseline, software, crypto, packet offload
//
// Each benchmark lives in its own file; this file only dispatches.

import CMallocCounter
import Foundation
import XFRMBenchmarks

/// The allocation counter must see allocations, or "0 allocs per packet" would prove nothing.
func checkAllocationCounter() {
    let before = xfrm_malloc_count()
    let probe = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
    probe.deallocate()
    guard xfrm_malloc_count() > before else {
        FileHandle.standardError.write("xfrm-bench: the malloc counter is not interposed; refusing to report allocations\n".data(using: .utf8)!)
        exit(1)
    }
}

var args = Array(CommandLine.arguments.dropFirst())
var seconds = 0.3
var rounds = 5
var command: String? = nil
var policyCounts = [1_000, 10_000, 100_000, 1_000_000]
var saCounts = [1_000, 10_000, 100_000, 100_000]
var check = false
while !args.isEmpty {
    let a = args.removeFirst()
    switch a {
    case "--policies":
        let list = (args.isEmpty ? "" : args.removeFirst()).split(separator: ",").compactMap { Int($0) }
        guard !list.isEmpty, list.allSatisfy({ $0 > 0 }) else {
            FileHandle.standardError.write("xfrm-bench spd: --policies takes N[,N...] (positive counts)\n".data(using: .utf8)!)
            exit(2)
        }
        policyCounts = list
    case "--sas":
        let list = (args.isEmpty ? "" : args.removeFirst()).split(separator: ",").compactMap { Int($0) }
        guard !list.isEmpty, list.allSatisfy({ $0 > 0 }) else {
            FileHandle.standardError.write("xfrm-bench scale: --sas takes N[,N...] (positive counts)\n".data(using: .utf8)!)
            exit(2)
        }
        saCounts = list
    case "--seconds": seconds = Double(args.isEmpty ? "" : args.removeFirst()) ?? 0.3
    case "--rounds": rounds = Int(args.isEmpty ? "" : args.removeFirst()) ?? 5
    case "--check": check = true
    default: if command == nil { command = a }  // the first word is the command; `modes` parses the rest itself
    }
}
switch command {
case "esp":
    checkAllocationCounter()
    espBenchmark(seconds: seconds, rounds: rounds)
case "engine":
    checkAllocationCounter()
    engineBenchmark(seconds: seconds, rounds: rounds, check: check)
case "spd": spdBenchmark(seconds: seconds, rounds: rounds, sizes: policyCounts)
case "scale":
    guard saCounts.count == policyCounts.count else {
        FileHandle.standardError.write("xfrm-bench scale: --sas and --policies must list as many counts\n".data(using: .utf8)!)
        exit(2)
    }
    scaleBenchmark(saCounts: saCounts, policyCounts: policyCounts)
case "modes": modesBenchmark(arguments: Array(CommandLine.arguments.dropFirst()))
default:
    FileHandle.standardError.write("usage: xfrm-bench esp|engine|spd [--seconds S] [--rounds N] [--policies N[,N...]] | scale [--sas N[,N...]] [--policies N[,N...]] | modes [--packets N] [--rounds N] [--svg PATH]\n".data(using: .utf8)!)
    exit(2)
}
