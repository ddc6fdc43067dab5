// Lookups without a lock (PolicyDatabase's Left-Right pair) under a writer that keeps inserting, updating, deleting
// and flushing: every result must be one that a linear scan could have returned while the lookup ran.

import Foundation
import Synchronization
import Testing
import XFRMPacket
import XFRMTestKit

@testable import XFRMCore

/// SplitMix64, deterministic per thread.
private struct Mix {
    var state: UInt64
    mutating func next() -> UInt64 {
        self.state &+= 0x9e37_79b9_7f4a_7c15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(self.next() % UInt64(n)) }
}

/// A small IPv4 space (10.0.0.0/20) so that prefixes nest and overlap; some ports and protocols; a few offloaded.
private func randomSelector(_ r: inout Mix) -> Selector {
    func prefix(_ r: inout Mix) -> IPPrefix {
        let length = UInt8([0, 16, 18, 20, 22, 24, 26, 28, 32][r.below(9)])
        let a: UInt32 = 0x0a00_0000 | UInt32(r.below(1 << 12))
        let masked = length == 0 ? 0 : a & ~(UInt32.max >> UInt32(length))
        return IPPrefix(.v4(masked), length: length)
    }
    var sel = Selector(family: 4, source: prefix(&r), destination: prefix(&r))
    if r.below(3) == 0 {
        sel.proto = 6
        if r.below(2) == 0 {
            sel.destinationPort = UInt16(1 + r.below(4))
            sel.destinationPortMask = 0xffff
        }
    }
    return sel
}

private func randomFlow(_ r: inout Mix) -> Flow {
    Flow(source: .v4(0x0a00_0000 | UInt32(r.below(1 << 12))), destination: .v4(0x0a00_0000 | UInt32(r.below(1 << 12))),
         proto: r.below(2) == 0 ? 6 : 17, sourcePort: 1000, destinationPort: UInt16(1 + r.below(4)))
}

/// Whether `a` wins over `b` (offloaded first, then lower priority, then older).
private func precedes(_ a: Policy, _ b: Policy) -> Bool {
    if (a.offload != nil) != (b.offload != nil) { return a.offload != nil }
    return a.priority < b.priority || (a.priority == b.priority && a.generation < b.generation)
}

private func matches(_ p: Policy, _ f: Flow) -> Bool {
    p.selector.matches(f) && p.mark.matches(f.mark) && p.ifID == f.ifID
}

/// What the writer and the readers share: when each generation became visible and stopped being visible, in
/// writer steps (written by the writer before the change it describes; readers compare with the step counter read
/// before and after their lookup), the stop flag, and what the readers found.
private final class History: @unchecked Sendable {
    static let capacity = 1 << 18
    let added: UnsafeMutablePointer<Atomic<UInt64>>
    let removed: UnsafeMutablePointer<Atomic<UInt64>>
    let step = Atomic<UInt64>(0)
    let stop = Atomic<Bool>(false)
    let lookups = Atomic<Int>(0)
    let failures = XFRMMutex<[String]>([])

    init() {
        self.added = .allocate(capacity: Self.capacity)
        self.removed = .allocate(capacity: Self.capacity)
        for i in 0..<Self.capacity {
            (self.added + i).initialize(to: Atomic(.max))
            (self.removed + i).initialize(to: Atomic(.max))
        }
    }

    deinit {
        self.added.deinitialize(count: Self.capacity)
        self.added.deallocate()
        self.removed.deinitialize(count: Self.capacity)
        self.removed.deallocate()
    }
}

@Suite("Policy database: lock-free lookups under concurrent changes")
struct PolicyDatabaseConcurrencyTests {
    @Test("every lookup result is a matching policy that was live during the lookup and no worse than the stable best")
    func hammer() throws {
        let db = PolicyDatabase()
        let history = History()
        var r = Mix(state: 7)

        // Stable policies (never removed), including a catch-all, so that every flow has a stable best.
        var stable: [Policy] = []
        var keys = Set<Policy.Key>()
        stable.append(try db.insert(Policy(selector: .any(family: 4), direction: .outbound, priority: 5000),
                                    update: false))
        keys.insert(stable[0].key)
        while stable.count < 150 {
            let p = Policy(selector: randomSelector(&r), direction: .outbound, priority: UInt32(100 + r.below(3000)),
                           offload: r.below(20) == 0 ? PolicyOffload(ifindex: 3) : nil)
            guard keys.insert(p.key).inserted else { continue }
            stable.append(try db.insert(p, update: false))
        }
        for p in stable { history.added[Int(p.generation)].store(0, ordering: .relaxed) }
        let firstChurnGeneration = stable.count + 1

        // Churn: specs with two possible priorities each, toggled by the writer.
        struct Spec {
            var selector: Selector
            var priorities: (UInt32, UInt32)
            var offloaded: Bool
        }
        var specs: [Spec] = []
        while specs.count < 300 {
            let sel = randomSelector(&r)
            guard keys.insert(Policy.Key(direction: .outbound, selector: sel)).inserted else { continue }
            specs.append(Spec(selector: sel, priorities: (UInt32(r.below(3000)), UInt32(r.below(3000))),
                              offloaded: r.below(20) == 0))
        }
        let churnPriorities: [Selector: (UInt32, UInt32)] = Dictionary(
            uniqueKeysWithValues: specs.map { ($0.selector, $0.priorities) })
        let stableGenerations = Set(stable.map(\.generation))
        let stablePolicies = stable

        let done = DispatchGroup()

        @Sendable func reader(_ seed: UInt64) {
            var r = Mix(state: seed)
            var n = 0
            while !history.stop.load(ordering: .relaxed) {
                let f = randomFlow(&r)
                let before = history.step.load(ordering: .acquiring)
                let got: Policy?
                switch n % 3 {
                case 0: got = db.lookup(.outbound, f)
                case 1: got = db.lookup(.outbound, f, usedAt: UInt64(n / 1000))
                default:
                    got = db.lookup(.outbound, f)
                    if let got { db.markUsed(index: got.index, direction: .outbound, at: UInt64(n / 1000)) }
                }
                let after = history.step.load(ordering: .acquiring)
                n += 1
                var best = stablePolicies[0]
                for p in stablePolicies where matches(p, f) && precedes(p, best) { best = p }
                let problem: String?
                if let got {
                    let g = Int(got.generation)
                    if !matches(got, f) {
                        problem = "does not match"
                    } else if stableGenerations.contains(got.generation) {
                        problem = got == best ? nil : "a stable policy other than the stable best"
                    } else if g < firstChurnGeneration || g >= History.capacity {
                        problem = "unknown generation"
                    } else if let prios = churnPriorities[got.selector],
                        got.priority == prios.0 || got.priority == prios.1
                    {
                        // Live at some step in [before, after + 1] (after + 1: the change being published).
                        let added = history.added[g].load(ordering: .acquiring)
                        let removed = history.removed[g].load(ordering: .acquiring)
                        if added > after + 1 || removed <= before {
                            problem = "not live during the lookup (added at \(added), removed at \(removed))"
                        } else if !precedes(got, best) {
                            problem = "worse than the stable best"
                        } else {
                            problem = nil
                        }
                    } else {
                        problem = "not a policy that was inserted"
                    }
                } else {
                    problem = "nil although a stable policy matches"
                }
                if let problem {
                    history.failures.withLock { if $0.count < 10 { $0.append("\(f): \(problem): \(String(describing: got))") } }
                }
            }
            history.lookups.wrappingAdd(n, ordering: .relaxed)
        }

        for t in 0..<3 {
            done.enter()
            Thread.detachNewThread {
                reader(UInt64(100 + t))
                done.leave()
            }
        }

        // The writer: inserts, updates (the other priority), deletes by key or index, and now and then a flush of a
        // subset, for about a second.
        var live: [Int: Policy] = [:]
        var generation = UInt64(firstChurnGeneration)
        var ops = 0
        // About 1.2 s and at least 600 changes, but never more than 4 s (a loaded machine, a debug build).
        let clock = ContinuousClock()
        let start = clock.now
        while (clock.now - start < .milliseconds(1200) || ops < 600) && clock.now - start < .seconds(4)
            && generation + 400 < UInt64(History.capacity)
        {
            let step = history.step.load(ordering: .relaxed) + 1
            ops += 1
            if ops % 500 == 0 {
                let odd = live.filter { $0.value.priority % 2 == 1 }
                for (_, p) in odd { history.removed[Int(p.generation)].store(step, ordering: .releasing) }
                let flushed = db.flush { p in !stableGenerations.contains(p.generation) && p.priority % 2 == 1 }
                #expect(flushed.count == odd.count)
                for (i, _) in odd { live[i] = nil }
            } else {
                let i = r.below(specs.count)
                let spec = specs[i]
                if let old = live[i] {
                    history.removed[Int(old.generation)].store(step, ordering: .releasing)
                    switch r.below(3) {
                    case 0:
                        try db.delete(key: old.key)
                        live[i] = nil
                    case 1:
                        try db.delete(index: old.index, direction: .outbound)
                        live[i] = nil
                    default:
                        let priority = old.priority == spec.priorities.0 ? spec.priorities.1 : spec.priorities.0
                        history.added[Int(generation)].store(step, ordering: .releasing)
                        live[i] = try db.insert(
                            Policy(selector: spec.selector, direction: .outbound, priority: priority,
                                   offload: spec.offloaded ? PolicyOffload(ifindex: 3) : nil), update: true)
                        #expect(live[i]?.generation == generation)
                        generation += 1
                    }
                } else {
                    history.added[Int(generation)].store(step, ordering: .releasing)
                    live[i] = try db.insert(
                        Policy(selector: spec.selector, direction: .outbound, priority: spec.priorities.0,
                               offload: spec.offloaded ? PolicyOffload(ifindex: 3) : nil), update: false)
                    #expect(live[i]?.generation == generation)
                    generation += 1
                }
            }
            history.step.store(step, ordering: .releasing)
        }
        history.stop.store(true, ordering: .relaxed)
        done.wait()

        #expect(history.failures.withLock { $0 } == [])
        #expect(history.lookups.load(ordering: .relaxed) > 1000)
        #expect(ops > 500)
        // Quiescent again: the index agrees with the scan, and holds exactly the stable and live policies.
        #expect(db.totalCount == stable.count + live.count)
        #expect(db.lookupCopiesAgree())
        var q = Mix(state: 1)
        for _ in 0..<2000 {
            let f = randomFlow(&q)
            #expect(db.lookup(.outbound, f) == db.linearLookup(.outbound, f))
        }
    }

    @Test("the two lookup copies are equal after every insert, update, delete and flush")
    func copiesAgree() throws {
        let db = PolicyDatabase()
        var r = Mix(state: 42)
        var keys: [Policy.Key] = []
        for step in 0..<600 {
            switch r.below(10) {
            case 0..<5:
                let p = Policy(selector: randomSelector(&r), direction: PolicyDirection.allCases[r.below(3)],
                               priority: UInt32(r.below(50)), offload: r.below(10) == 0 ? PolicyOffload(ifindex: 3) : nil)
                if let stored = try? db.insert(p, update: r.below(2) == 0) { keys.append(stored.key) }
            case 5..<9:
                if !keys.isEmpty { _ = try? db.delete(key: keys.remove(at: r.below(keys.count))) }
            default:
                let cut = UInt32(r.below(50))
                db.flush { $0.priority < cut && $0.priority % 3 == 0 }
                keys = db.list().map(\.key)
            }
            #expect(db.lookupCopiesAgree(), "after step \(step)")
            let f = randomFlow(&r)
            for dir in PolicyDirection.allCases { #expect(db.lookup(dir, f) == db.linearLookup(dir, f)) }
        }
    }

    @Test("use time: written once per second of the clock, read back by index, gone with the policy")
    func useTimeLockFree() throws {
        let db = PolicyDatabase()
        let p = try db.insert(Policy(selector: .any(family: 4), direction: .outbound), update: false)
        let f = Flow(source: .v4(1), destination: .v4(2))
        #expect(db.lookup(.outbound, f, usedAt: 0) == p)
        #expect(db.lastUse(index: p.index, direction: .outbound) == 0)  // used at second 0 is not "never"
        #expect(db.lookup(.outbound, f, usedAt: 7) == p)
        #expect(db.lastUse(index: p.index, direction: .outbound) == 7)
        db.markUsed(index: p.index, direction: .outbound, at: 9)
        #expect(db.lastUse(index: p.index, direction: .outbound) == 9)
        db.markUsed(index: p.index, direction: .inbound, at: 11)  // wrong direction: not this policy
        #expect(db.lastUse(index: p.index, direction: .outbound) == 9)
        try db.delete(key: p.key)
        #expect(db.lastUse(index: p.index, direction: .outbound) == nil)
        // The freed slot is reused by the next policy, which starts unused.
        let q = try db.insert(Policy(selector: .any(family: 4), direction: .outbound, priority: 3), update: false)
        #expect(db.lastUse(index: q.index, direction: .outbound) == nil)
    }
}
