// xfrm-bench: benchmarks that report speed as ratios against a reference measured in the same run.
//
//   swift run -c release xfrm-bench esp [--seconds S] [--rounds N] [--backend openssl|ipsec-mb|all] [--threads N[,N...]]
//                                          [--sizes N[,N...]]
//                                          ESP encap/decap vs the backend's raw AES-GCM; scaling over threads
//   swift run -c release xfrm-bench stack [--check] [--sizes N[,N...]]
//                                          the stack's output and input paths per packet vs the bare ESP transform
//   swift run -c release xfrm-bench spd [--seconds S] [--rounds N] [--policies N[,N...]]
//                                          SPD lookup (default 1k/10k/100k/1M policies) vs a linear scan, and
//                                          the time to load them
//   swift run -c release xfrm-bench scale [--sas N[,N...]] [--policies N[,N...]]
//                                          resident memory per SA and per policy, add/delete rates (rows pair the
//                                          lists; default 1k/10k/100k/100k SAs with 1k/10k/100k/1M policies)
//   swift run -c release xfrm-bench sad [--seconds S] [--rounds N] [--sas N[,N...]]
//                                          output SA resolution (a flow's first packet) among 1k/10k/100k SAs
//   swift run -c release xfrm-bench engine [--check]   the daemon's per-packet path (both dispatchers) vs bare ESP,
//                                          with allocations per packet (--check: exit 1 if any)
//   swift run -c release xfrm-bench modes [--packets N] [--rounds N] [--svg PATH]
//                                          host CPU per packet and throughput: baseline, software, crypto, packet offload
//   swift run -c release xfrm-bench checksum [--sizes N[,N...]]
//                                          the Internet checksum's sum (bulk C/AVX2 from 256 B) vs the inlined Swift loop
//
// Each benchmark lives in its own file; this file only dispatches.

import CMallocCounter
import Foundation
import XFRMBenchmarks
import XFRMCrypto

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
var backends = CryptoBackends.names.filter { CryptoBackends.named($0) != nil }
var threadCounts: [Int] = []
var espSizes = [64, 512, 1420]
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
    case "--backend":
        let b = args.isEmpty ? "" : args.removeFirst()
        guard b == "all" || CryptoBackends.named(b) != nil else {
            FileHandle.standardError.write("xfrm-bench esp: --backend takes \(CryptoBackends.names.joined(separator: ", ")) or all (available here)\n".data(using: .utf8)!)
            exit(2)
        }
        if b != "all" { backends = [b] }
    case "--sizes":
        let list = (args.isEmpty ? "" : args.removeFirst()).split(separator: ",").compactMap { Int($0) }
        guard !list.isEmpty, list.allSatisfy({ $0 >= 28 && $0 <= 1500 }) else {
            FileHandle.standardError.write("xfrm-bench esp: --sizes takes N[,N...] (28 to 1500 bytes)\n".data(using: .utf8)!)
            exit(2)
        }
        espSizes = list
    case "--threads":
        let list = (args.isEmpty ? "" : args.removeFirst()).split(separator: ",").compactMap { Int($0) }
        guard !list.isEmpty, list.allSatisfy({ $0 > 0 && $0 <= 64 }) else {
            FileHandle.standardError.write("xfrm-bench esp: --threads takes N[,N...] (1 to 64)\n".data(using: .utf8)!)
            exit(2)
        }
        threadCounts = list
    default: if command == nil { command = a }  // the first word is the command; `modes` parses the rest itself
    }
}
switch command {
case "esp":
    checkAllocationCounter()
    espBenchmark(seconds: seconds, rounds: rounds, backends: backends, threads: threadCounts, sizes: espSizes)
case "engine":
    checkAllocationCounter()
    engineBenchmark(seconds: seconds, rounds: rounds, check: check)
case "stack":
    checkAllocationCounter()
    stackBenchmark(seconds: seconds, rounds: rounds, sizes: espSizes == [64, 512, 1420] ? [64, 1420] : espSizes, check: check)
case "spd": spdBenchmark(seconds: seconds, rounds: rounds, sizes: policyCounts)
case "scale":
    guard saCounts.count == policyCounts.count else {
        FileHandle.standardError.write("xfrm-bench scale: --sas and --policies must list as many counts\n".data(using: .utf8)!)
        exit(2)
    }
    scaleBenchmark(saCounts: saCounts, policyCounts: policyCounts)
case "sad": sadBenchmark(seconds: seconds, rounds: rounds,
                         sizes: saCounts == [1_000, 10_000, 100_000, 100_000] ? [1_000, 10_000, 100_000] : saCounts)
case "modes": modesBenchmark(arguments: Array(CommandLine.arguments.dropFirst()))
case "checksum":
    checksumBenchmark(seconds: seconds, rounds: rounds,
                      sizes: espSizes == [64, 512, 1420] ? [64, 256, 1420, 9000, 65000] : espSizes)
default:
    FileHandle.standardError.write(("usage: xfrm-bench esp [--backend B|all] [--threads N[,N...]] [--sizes N[,N...]] | "
        + "stack [--check] [--sizes N[,N...]] | engine [--check] | spd [--policies N[,N...]] | "
        + "scale [--sas N[,N...]] [--policies N[,N...]] | sad [--sas N[,N...]] (all: [--seconds S] [--rounds N]) | "
        + "modes [--packets N] [--rounds N] [--svg PATH] | checksum [--sizes N[,N...]]\n").data(using: .utf8)!)
    exit(2)
}
