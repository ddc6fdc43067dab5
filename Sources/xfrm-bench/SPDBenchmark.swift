// `xfrm-bench spd`: Security Policy Database lookup at 1,000, 10,000 and 100,000 outbound policies (a deterministic,
// realistic mix: 85% IPv4 / 15% IPv6, destination and source prefixes from /0 to full length, any/TCP/UDP/ICMP with
// and without ports, a few marks and a few packet-offloaded policies), against the database's own linear scan
// measured in the same run on the same flows. Flows are mostly derived from a policy (inside its prefixes, ports and
// mark), some are random. Time is the thread's CPU time; each figure is the best of N rounds. The insert rate is
// the time to insert all policies into an empty database (thread CPU time); the load time is the wall-clock time of
// the same load (`load_s`). Lookups take no lock (PolicyDatabase's Left-Right pair): the figure includes the
// reader's two atomic read-indicator updates. Before measuring, the index is checked against the scan on the flows
// (all 4096 up to 10,000 policies, fewer above, since each scan of 1,000,000 policies takes ~30 ms).

import CMallocCounter
import Foundation
import XFRMCore
import XFRMPacket

/// SplitMix64, so every run measures the same policies and flows.
private struct BenchRandom {
    var state: UInt64
    mutating func next() -> UInt64 {
        self.state &+= 0x9e37_79b9_7f4a_7c15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(self.next() % UInt64(n)) }
    mutating func pick<T>(_ options: [T]) -> T { options[self.below(options.count)] }
}

private func spdV4Address(_ r: inout BenchRandom) -> UInt32 {
    // 70% inside 10/8 (a site's own space), the rest anywhere.
    let x = UInt32(truncatingIfNeeded: r.next())
    return r.below(10) < 7 ? 0x0a00_0000 | (x & 0x00ff_ffff) : x
}

private func spdV6Address(_ r: inout BenchRandom) -> (UInt64, UInt64) {
    let hi = r.next()
    return (r.below(10) < 7 ? 0x2001_0db8_0000_0000 | (hi & 0xffff_ffff) : hi, r.next())
}

private func spdPrefixLength(_ r: inout BenchRandom, v6: Bool, zeroPercent: Int) -> UInt8 {
    if r.below(100) < zeroPercent { return 0 }
    if v6 {
        return r.below(2) == 0 ? r.pick([32, 48, 56, 64, 64, 96, 112, 128, 128]) : UInt8(32 + r.below(97))
    }
    switch r.below(10) {
    case 0..<4: return UInt8(8 + r.below(25))  // /8 ... /32
    case 4..<7: return 24
    default: return 32
    }
}

private func spdRandomPolicy(_ r: inout BenchRandom) -> Policy {
    let v6 = r.below(100) < 15
    var sel: Selector
    if v6 {
        let (dh, dl) = spdV6Address(&r)
        let (sh, sl) = spdV6Address(&r)
        sel = Selector(family: 6, source: IPPrefix(.v6(sh, sl), length: spdPrefixLength(&r, v6: true, zeroPercent: 30)),
                       destination: IPPrefix(.v6(dh, dl), length: spdPrefixLength(&r, v6: true, zeroPercent: 2)))
    } else {
        sel = Selector(family: 4, source: IPPrefix(.v4(spdV4Address(&r)), length: spdPrefixLength(&r, v6: false, zeroPercent: 30)),
                       destination: IPPrefix(.v4(spdV4Address(&r)), length: spdPrefixLength(&r, v6: false, zeroPercent: 2)))
    }
    let p = r.below(100)
    if p < 40 {
        sel.proto = 0
    } else if p < 90 {
        sel.proto = p < 70 ? 6 : 17
        let q = r.below(100)
        if q < 50 {
            sel.destinationPort = r.below(4) == 0 ? UInt16(1024 + r.below(60000)) : r.pick([22, 53, 80, 443, 500, 4500, 1194, 8080])
            sel.destinationPortMask = 0xffff
        } else if q < 55 {
            sel.destinationPort = UInt16(r.below(256)) << 8
            sel.destinationPortMask = 0xff00
        }
        if r.below(10) == 0 {
            sel.sourcePort = UInt16(1024 + r.below(60000))
            sel.sourcePortMask = 0xffff
        }
    } else if p < 95 {
        sel.proto = v6 ? 58 : 1
        if r.below(2) == 0 {
            sel.sourcePort = v6 ? r.pick([1, 128, 129, 135]) : r.pick([0, 3, 8, 11])  // ICMP type
            sel.sourcePortMask = 0xffff
            if r.below(5) == 0 {
                sel.destinationPortMask = 0xffff  // code 0
            }
        }
    } else {
        sel.proto = r.pick([47, 50, 132])
    }
    let mark = r.below(100) < 3 ? Mark(value: UInt32(1 + r.below(4)), mask: 0xff) : Mark()
    return Policy(selector: sel, direction: .outbound, priority: UInt32(r.below(2000)), mark: mark,
                  offload: r.below(100) == 0 ? PolicyOffload(ifindex: 2) : nil)
}

/// `count` policies with distinct keys.
private func spdPolicies(_ count: Int, seed: UInt64) -> [Policy] {
    var r = BenchRandom(state: seed)
    var keys = Set<Policy.Key>()
    var out: [Policy] = []
    out.reserveCapacity(count)
    while out.count < count {
        let p = spdRandomPolicy(&r)
        if keys.insert(p.key).inserted { out.append(p) }
    }
    return out
}

/// An address inside `prefix` (its bits, then random host bits).
private func spdAddress(in prefix: IPPrefix, _ r: inout BenchRandom) -> IPAddress {
    let l = Int(prefix.length)
    switch prefix.address {
    case .v4(let a):
        let keep: UInt32 = l == 0 ? 0 : ~(UInt32.max >> UInt32(l))
        return .v4((a & keep) | (UInt32(truncatingIfNeeded: r.next()) & ~keep))
    case .v6(let h, let lo):
        let keepHi: UInt64 = l == 0 ? 0 : l >= 64 ? .max : ~(UInt64.max >> UInt64(l))
        let keepLo: UInt64 = l <= 64 ? 0 : l >= 128 ? .max : ~(UInt64.max >> UInt64(l - 64))
        return .v6((h & keepHi) | (r.next() & ~keepHi), (lo & keepLo) | (r.next() & ~keepLo))
    }
}

/// 90% of flows are derived from a policy (so they match it or something better), 10% are random.
private func spdFlows(_ policies: [Policy], count: Int, seed: UInt64) -> [Flow] {
    var r = BenchRandom(state: seed)
    var flows: [Flow] = []
    for _ in 0..<count {
        let p = policies[r.below(policies.count)]
        let s = p.selector
        if r.below(10) == 0 {
            let v6 = s.family == 6
            let src: IPAddress = v6 ? { let (a, b) = spdV6Address(&r); return .v6(a, b) }() : .v4(spdV4Address(&r))
            let dst: IPAddress = v6 ? { let (a, b) = spdV6Address(&r); return .v6(a, b) }() : .v4(spdV4Address(&r))
            flows.append(Flow(source: src, destination: dst, proto: r.pick([6, 17, 1]),
                              sourcePort: UInt16(truncatingIfNeeded: r.next()),
                              destinationPort: UInt16(truncatingIfNeeded: r.next())))
            continue
        }
        let proto = s.proto != 0 ? s.proto : r.pick([6, 17, 6, 1])
        let sport = (s.sourcePort & s.sourcePortMask) | (UInt16(truncatingIfNeeded: r.next()) & ~s.sourcePortMask)
        let dport = (s.destinationPort & s.destinationPortMask)
            | (UInt16(truncatingIfNeeded: r.next()) & ~s.destinationPortMask)
        flows.append(Flow(source: spdAddress(in: s.source, &r), destination: spdAddress(in: s.destination, &r),
                          proto: proto, sourcePort: sport, destinationPort: dport,
                          mark: p.mark.mask != 0 ? p.mark.value : 0))
    }
    return flows
}

/// Runs `body(n)` (n operations) repeatedly for about `seconds` of CPU time; returns (ns per op, allocs per op).
private func spdMeasure(seconds: Double, batch: Int, _ body: (Int) -> Void) -> (ns: Double, allocs: Double) {
    body(batch)  // warm-up
    var ops = 0
    let a0 = xfrm_malloc_count()
    let t0 = threadCPUSeconds()
    var t = t0
    repeat {
        body(batch)
        ops += batch
        t = threadCPUSeconds()
    } while t - t0 < seconds
    return ((t - t0) * 1e9 / Double(ops), Double(xfrm_malloc_count() - a0) / Double(ops))
}

private struct SPDRow {
    let policies: Int
    var lookupNs = Double.infinity
    var linearNs = Double.infinity
    var insertsPerSecond = 0.0
    var loadSeconds = Double.infinity
    var allocs = 0.0
    var matched = 0.0
    var speedup: Double { self.linearNs / self.lookupNs }
}

func spdBenchmark(seconds: Double, rounds: Int, sizes: [Int] = [1_000, 10_000, 100_000, 1_000_000]) {
    checkAllocationCounter()
    var rows: [SPDRow] = []
    for n in sizes {
        let policies = spdPolicies(n, seed: 0x5eed_0000 &+ UInt64(n))
        let flows = spdFlows(policies, count: 4096, seed: 0xf10e_0000 &+ UInt64(n))
        var row = SPDRow(policies: n)
        var db = PolicyDatabase()

        for _ in 0..<rounds {
            // Inserts: all policies into an empty database.
            db = PolicyDatabase()
            let w0 = ContinuousClock.now
            let t0 = threadCPUSeconds()
            for p in policies { _ = try! db.insert(p, update: false) }
            let t = threadCPUSeconds() - t0
            let wall = ContinuousClock.now - w0
            row.insertsPerSecond = max(row.insertsPerSecond, Double(n) / t)
            row.loadSeconds = min(row.loadSeconds,
                                  Double(wall.components.seconds) + Double(wall.components.attoseconds) * 1e-18)
        }
        precondition(db.totalCount == n)

        // The index must agree with the scan on every flow measured; count how many flows hit a policy.
        var hits = 0
        let checked = n <= 10_000 ? flows.count : max(64, flows.count * 10_000 / n)
        for f in flows.prefix(checked) {
            let fast = db.lookup(.outbound, f)
            precondition(fast == db.linearLookup(.outbound, f), "lookup and linearLookup disagree on \(f)")
            if fast != nil { hits += 1 }
        }
        row.matched = Double(hits) / Double(checked)

        let database = db  // a constant for the closures (a captured `var` would be retained on every call)
        var next = 0
        var sink: UInt32 = 0
        let fast = { (k: Int) in
            for _ in 0..<k {
                sink &+= database.lookup(.outbound, flows[next])?.index ?? 1
                next = (next + 1) & 4095
            }
        }
        let slow = { (k: Int) in
            for _ in 0..<k {
                sink &+= database.linearLookup(.outbound, flows[next])?.index ?? 1
                next = (next + 1) & 4095
            }
        }
        for _ in 0..<rounds {
            let m = spdMeasure(seconds: seconds, batch: 1024, fast)
            if m.ns < row.lookupNs {
                row.lookupNs = m.ns
                row.allocs = m.allocs
            }
            // The scan is slow with many policies: fewer operations per batch, same time budget.
            row.linearNs = min(row.linearNs, spdMeasure(seconds: seconds, batch: max(1, 100_000 / n), slow).ns)
        }
        if sink == 0x7fff_ffff { print("") }  // keeps the lookups observable
        rows.append(row)
    }

    print("SPD lookup, outbound, mixed IPv4/IPv6 policies (prefixes /0../32 and /0../128, proto/ports/marks, 1% "
          + "offloaded); 4096 flows, ~90% derived from a policy; one core; thread CPU time; best of \(rounds) rounds "
          + "of \(seconds) s")
    print("policies  lookup ns  linear ns   speedup   inserts/s  load s  matched  allocs/lookup")
    for r in rows {
        print(String(format: "%8d  %9.1f  %9.1f  %8.1f  %10.0f  %6.2f  %6.1f%%  %13.3f", r.policies, r.lookupNs,
                     r.linearNs, r.speedup, r.insertsPerSecond, r.loadSeconds, r.matched * 100, r.allocs))
    }
    for r in rows {
        print(String(format: "{\"policies\": %d, \"lookup_ns\": %.1f, \"linear_ns\": %.1f, \"speedup\": %.1f, \"inserts_per_s\": %.0f, \"load_s\": %.3f}",
                     r.policies, r.lookupNs, r.linearNs, r.speedup, r.insertsPerSecond, r.loadSeconds))
    }
}
