import Testing
import XFRMPacket
import XFRMTestKit

@testable import XFRMCore

// MARK: - Helpers

/// "ADDR/LEN" on both sides; the family is the addresses' (or 0 with `anyFamily`).
private func selector(_ src: String, _ dst: String, proto: UInt8 = 0, sport: UInt16 = 0, sportMask: UInt16 = 0,
                      dport: UInt16 = 0, dportMask: UInt16 = 0, ifindex: Int32 = 0) -> Selector {
    let s = IPPrefix(src)!
    let d = IPPrefix(dst)!
    return Selector(family: d.address.version, source: s, destination: d, proto: proto, sourcePort: sport,
                    sourcePortMask: sportMask, destinationPort: dport, destinationPortMask: dportMask,
                    ifindex: ifindex)
}

private func policy(_ sel: Selector, _ dir: PolicyDirection = .outbound, priority: UInt32 = 0, index: UInt32 = 0,
                    mark: Mark = Mark(), action: PolicyAction = .allow, offload: Int32? = nil) -> Policy {
    Policy(selector: sel, direction: dir, action: action, priority: priority, index: index, mark: mark,
           offload: offload.map { PolicyOffload(ifindex: $0) })
}

private func flow(_ src: String, _ dst: String, proto: UInt8 = 0, sport: UInt16 = 0, dport: UInt16 = 0,
                  mark: UInt32 = 0, ifindex: Int32 = 0) -> Flow {
    Flow(source: IPAddress(src)!, destination: IPAddress(dst)!, proto: proto, sourcePort: sport,
         destinationPort: dport, mark: mark, ifindex: ifindex)
}

private func expectError<R>(_ errno: Int32, _ message: String? = nil,
                            sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> R) {
    do {
        _ = try body()
        Issue.record("expected errno \(errno), got success", sourceLocation: sourceLocation)
    } catch let error as PolicyDatabaseError {
        #expect(error.errno == errno, sourceLocation: sourceLocation)
        if let message { #expect(error.message == message, sourceLocation: sourceLocation) }
    } catch {
        Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
    }
}

// MARK: - Tests

@Suite("Policy database")
struct PolicyDatabaseTests {
    @Test("the timers see only policies with a time limit, newest first, through updates, deletes and flushes")
    func timedList() throws {
        let db = PolicyDatabase()
        var timed = LifetimeConfig()
        timed.hardUseExpiresSeconds = 30
        var a = policy(selector("10.0.0.0/24", "10.1.0.0/24"))
        a.lifetime = timed
        let b = policy(selector("10.0.1.0/24", "10.1.0.0/24"))
        var c = policy(selector("10.0.2.0/24", "10.1.0.0/24"), .inbound)
        c.lifetime = timed
        let (ia, _, ic) = (try db.insert(a, update: false), try db.insert(b, update: false), try db.insert(c, update: false))
        #expect(db.timedList().map(\.index) == [ic.index, ia.index])
        var untimed = a
        untimed.lifetime = LifetimeConfig()
        try db.insert(untimed, update: true)  // the update drops a's time limit
        #expect(db.timedList().map(\.index) == [ic.index])
        try db.delete(index: ic.index, direction: .inbound)
        #expect(db.timedList().isEmpty)
        try db.insert(c, update: false)
        #expect(db.timedList().count == 1)
        db.flush()
        #expect(db.timedList().isEmpty)
    }

    @Test("a lower priority value wins, whatever the prefix lengths")
    func priorityOrder() throws {
        let db = PolicyDatabase()
        let specific = try db.insert(policy(selector("10.0.0.1/32", "10.1.0.1/32"), priority: 10), update: false)
        let broad = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.0/8"), priority: 5), update: false)
        let f = flow("10.0.0.1", "10.1.0.1")
        #expect(db.lookup(.outbound, f)?.index == broad.index)
        try db.delete(key: broad.key)
        #expect(db.lookup(.outbound, f)?.index == specific.index)
        // Only the flows the policy covers.
        #expect(db.lookup(.outbound, flow("10.0.0.2", "10.1.0.1")) == nil)
        #expect(db.lookup(.inbound, f) == nil)
    }

    @Test("equal priorities go to the older policy; deleting it hands over to the newer")
    func tiesGoToOlder() throws {
        let db = PolicyDatabase()
        let older = try db.insert(policy(selector("10.0.0.0/24", "0.0.0.0/0"), priority: 7), update: false)
        let newer = try db.insert(policy(selector("10.0.0.1/32", "10.9.0.0/16"), priority: 7), update: false)
        #expect(older.generation < newer.generation)
        let f = flow("10.0.0.1", "10.9.1.1")
        #expect(db.lookup(.outbound, f) == older)
        #expect(db.linearLookup(.outbound, f) == older)
        try db.delete(index: older.index, direction: .outbound)
        #expect(db.lookup(.outbound, f) == newer)
        // Re-adding the same selector makes it the newest: it now loses the tie.
        let again = try db.insert(policy(selector("10.0.0.0/24", "0.0.0.0/0"), priority: 7), update: false)
        #expect(db.lookup(.outbound, f) == newer)
        #expect(again.generation > newer.generation)
    }

    @Test("a matching packet-offloaded policy beats a software policy with a better priority")
    func offloadFirst() throws {
        let db = PolicyDatabase()
        let sw = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.0/8"), priority: 0), update: false)
        let hw = try db.insert(policy(selector("10.0.0.0/8", "10.2.0.0/16"), priority: 1000, offload: 4), update: false)
        let hwBetter = try db.insert(
            policy(selector("10.0.0.0/8", "10.2.3.0/24"), priority: 999, offload: 4), update: false)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.2.0.1")) == hw)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.2.3.1")) == hwBetter)  // among HW policies: priority
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.3.0.1")) == sw)  // no HW match: SW
        #expect(db.lookup(.outbound, flow("192.168.0.1", "10.2.0.1")) == sw)
        for f in [flow("10.0.0.1", "10.2.0.1"), flow("10.0.0.1", "10.2.3.1"), flow("10.0.0.1", "10.3.0.1")] {
            #expect(db.lookup(.outbound, f) == db.linearLookup(.outbound, f))
        }
    }

    @Test("the policy mark must match the packet mark under its mask")
    func markMatching() throws {
        let db = PolicyDatabase()
        let marked = try db.insert(
            policy(selector("0.0.0.0/0", "10.0.0.0/8"), priority: 1, mark: Mark(value: 0x10, mask: 0xf0)),
            update: false)
        let plain = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.0/8"), priority: 2), update: false)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", mark: 0x1f)) == marked)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", mark: 0x10)) == marked)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", mark: 0x20)) == plain)  // mask 0: any mark
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1")) == plain)
        // Same selector, other mark: another policy, not a duplicate.
        let other = try db.insert(
            policy(selector("0.0.0.0/0", "10.0.0.0/8"), priority: 0, mark: Mark(value: 0x2, mask: 0xff)),
            update: false)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", mark: 0x2)) == other)
        // A value with bits outside its mask can never match.
        try db.insert(
            policy(selector("0.0.0.0/0", "11.0.0.0/8"), mark: Mark(value: 0x101, mask: 0xff)), update: false)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "11.0.0.1", mark: 0x101)) == nil)
    }

    @Test("protocol, ports with masks, ICMP type and code, interface")
    func upperLayer() throws {
        let db = PolicyDatabase()
        let https = try db.insert(
            policy(selector("0.0.0.0/0", "10.0.0.0/8", proto: 6, dport: 443, dportMask: 0xffff), priority: 1),
            update: false)
        let highPorts = try db.insert(
            policy(selector("0.0.0.0/0", "10.0.0.0/8", proto: 17, sport: 0x8000, sportMask: 0x8000), priority: 2),
            update: false)
        let echo = try db.insert(  // ICMP type 8 (source port), code 0 (destination port)
            policy(selector("0.0.0.0/0", "10.0.0.0/8", proto: 1, sport: 8, sportMask: 0xffff, dport: 0,
                            dportMask: 0xffff), priority: 3), update: false)
        let echo6 = try db.insert(
            policy(selector("::/0", "2001:db8::/32", proto: 58, sport: 128, sportMask: 0xffff), priority: 3),
            update: false)
        let onEth = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.0/8", ifindex: 7), priority: 4), update: false)
        let fallback = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.0/8"), priority: 5), update: false)

        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", proto: 6, sport: 1234, dport: 443)) == https)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", proto: 17, sport: 1234, dport: 443)) == fallback)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", proto: 17, sport: 40000, dport: 53)) == highPorts)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", proto: 1, sport: 8, dport: 0)) == echo)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", proto: 1, sport: 0, dport: 0)) == fallback)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", proto: 1, sport: 8, dport: 1)) == fallback)
        #expect(db.lookup(.outbound, flow("2001:db8:1::1", "2001:db8::9", proto: 58, sport: 128)) == echo6)
        #expect(db.lookup(.outbound, flow("2001:db8:1::1", "2001:db8::9", proto: 58, sport: 129)) == nil)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", ifindex: 7)) == onEth)
        #expect(db.lookup(.outbound, flow("1.1.1.1", "10.0.0.1", ifindex: 8)) == fallback)
    }

    @Test("many exact-port policies on one prefix pair, mixed with any-port ones")
    func portBuckets() throws {
        let db = PolicyDatabase()
        var byPort: [UInt16: Policy] = [:]
        for port in stride(from: UInt16(1), through: 2000, by: 1) {
            byPort[port] = try db.insert(
                policy(selector("0.0.0.0/0", "0.0.0.0/0", proto: 6, dport: port, dportMask: 0xffff),
                       priority: UInt32(port % 7) + 2), update: false)
        }
        let anyPort = try db.insert(policy(selector("0.0.0.0/0", "0.0.0.0/0", proto: 6), priority: 4), update: false)
        let masked = try db.insert(
            policy(selector("0.0.0.0/0", "0.0.0.0/0", proto: 6, dport: 0x0700, dportMask: 0xff00), priority: 1),
            update: false)
        for port: UInt16 in [1, 2, 3, 4, 5, 6, 7, 100, 1999, 2000, 2001, 40000, 0x0705] {
            let f = flow("10.0.0.1", "10.0.0.2", proto: 6, dport: port)
            let expected: Policy
            if port >> 8 == 0x07 {
                expected = masked
            } else if let p = byPort[port], p.priority <= anyPort.priority {  // older on ties
                expected = p
            } else {
                expected = anyPort
            }
            #expect(db.lookup(.outbound, f) == expected, "port \(port)")
            #expect(db.linearLookup(.outbound, f) == expected, "port \(port)")
        }
        try db.delete(key: byPort[7]!.key)  // priority 2: the best one for port 7
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.0.0.2", proto: 6, dport: 7)) == anyPort)
        try db.delete(key: anyPort.key)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.0.0.2", proto: 6, dport: 7)) == nil)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.0.0.2", proto: 6, dport: 13)) == byPort[13])
    }

    @Test("lookups from several threads while policies change")
    func concurrentUse() async throws {
        let db = PolicyDatabase()
        for i in 0..<500 {
            try db.insert(policy(selector("10.\(i % 4).0.0/16", "10.9.\(i % 250).0/24"), priority: UInt32(i)),
                          update: false)
        }
        let stable = try db.insert(policy(selector("0.0.0.0/0", "0.0.0.0/0"), priority: 1_000_000), update: false)
        await withTaskGroup(of: Int.self) { group in
            for t in 0..<4 {
                group.addTask {
                    var found = 0
                    var rng = SplitMix(state: UInt64(t + 1))
                    for _ in 0..<5000 {
                        let f = Flow(source: .v4(0x0a00_0000 | UInt32(rng.next() % 4) << 16 | 1),
                                     destination: .v4(0x0a09_0000 | UInt32(rng.next() % 250) << 8 | 1))
                        if db.lookup(.outbound, f) != nil { found += 1 }  // the /0 policy always matches
                        db.markUsed(index: stable.index, direction: .outbound, at: UInt64(t))
                    }
                    return found
                }
            }
            group.addTask {
                var rng = SplitMix(state: 99)
                for i in 0..<2000 {
                    let sel = selector("10.\(rng.next() % 4).0.0/16", "10.9.\(rng.next() % 250).0/24")
                    if i % 2 == 0 {
                        _ = try? db.delete(key: sel.keyFor(.outbound))
                    } else {
                        _ = try? db.insert(policy(sel, priority: UInt32(rng.next() % 1000)), update: true)
                    }
                }
                return 5000
            }
            for await found in group { #expect(found == 5000) }
        }
        #expect(db.lastUse(index: stable.index, direction: .outbound).map { $0 < 4 } == true)
        for dir in PolicyDirection.allCases {
            for p in db.list() where p.direction == dir {
                let f = Flow(source: p.selector.source.address, destination: p.selector.destination.address)
                #expect(db.lookup(dir, f) == db.linearLookup(dir, f))
            }
        }
    }

    @Test("family-0 selectors match both families; bad selectors are refused")
    func families() throws {
        let db = PolicyDatabase()
        let any = try db.insert(policy(.any(family: 0), priority: 50), update: false)
        let v6 = try db.insert(policy(selector("::/0", "2001:db8::/32"), priority: 10), update: false)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.0.0.2")) == any)
        #expect(db.lookup(.outbound, flow("2001:db8::1", "2001:db8::2")) == v6)
        #expect(db.lookup(.outbound, flow("2001:db9::1", "2001:db9::2")) == any)
        // Mixed-family flow: only the family-0 policy can cover it (as Selector.matches decides).
        try db.insert(policy(selector("0.0.0.0/0", "0.0.0.0/0"), priority: 1), update: false)
        #expect(db.lookup(.outbound, flow("2001:db8::1", "10.0.0.2")) == any)
        #expect(db.linearLookup(.outbound, flow("2001:db8::1", "10.0.0.2")) == any)

        var bad = selector("0.0.0.0/0", "10.0.0.0/8")
        bad.family = 0
        expectError(22) { try db.insert(policy(bad), update: false) }
        bad.family = 6
        expectError(22) { try db.insert(policy(bad), update: false) }
        bad.family = 10
        expectError(22, "Invalid selector family") { try db.insert(policy(bad), update: false) }
        var long = selector("0.0.0.0/0", "10.0.0.0/8")
        long.destination.length = 33
        expectError(22, "Invalid prefix length in selector (must be <= 32 for IPv4)") {
            try db.insert(policy(long), update: false)
        }
        #expect(db.totalCount == 3)
    }

    @Test("index allocation: steps of 8, direction in the low bits, live indices never reused")
    func indexAllocation() throws {
        let db = PolicyDatabase()
        let out = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.1/32"), .outbound), update: false)
        let inb = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.1/32"), .inbound), update: false)
        let fwd = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.1/32"), .forward), update: false)
        #expect(out.index == 1)  // generator 0 | out
        #expect(inb.index == 8)  // generator 8 | in
        #expect(fwd.index == 18)  // generator 16 | fwd
        // A given index is kept; the generator then skips it.
        let given = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.2/32"), index: 25), update: false)
        #expect(given.index == 25)
        let next = try db.insert(policy(selector("0.0.0.0/0", "10.0.0.3/32")), update: false)
        #expect(next.index == 33)  // 24 | 1 = 25 is live
        // An index 0 from the generator (in, generator 0) reads as 8 — the kernel's rule, seen on a fresh database.
        let fresh = PolicyDatabase()
        #expect(try fresh.insert(policy(.any(family: 4), .inbound), update: false).index == 8)
        #expect(try fresh.insert(policy(.any(family: 4), .outbound), update: false).index == 9)
        #expect(try fresh.insert(policy(selector("0.0.0.0/0", "10.0.0.1/32"), .inbound), update: false).index == 16)

        for p in db.list() { #expect(p.index & 7 == UInt32(p.direction.rawValue)) }
        expectError(22, "Policy index doesn't match direction") {
            try db.insert(policy(selector("0.0.0.0/0", "10.0.0.9/32"), .inbound, index: 17), update: false)
        }
        expectError(17, "File exists") {  // 25 belongs to another policy
            try db.insert(policy(selector("0.0.0.0/0", "10.0.0.9/32"), index: 25), update: false)
        }
        expectError(17) {
            try db.insert(policy(selector("0.0.0.0/0", "10.0.0.9/32"), index: 25), update: true)
        }
        #expect(db.totalCount == 5)
    }

    @Test("add refuses a duplicate key; update replaces it, keeping its index")
    func addAndUpdate() throws {
        let db = PolicyDatabase()
        let sel = selector("10.0.0.0/24", "10.1.0.0/24", proto: 6)
        let first = try db.insert(policy(sel, priority: 5, action: .allow), update: false)
        expectError(17, "File exists") { try db.insert(policy(sel, priority: 9), update: false) }
        let other = try db.insert(policy(selector("10.0.0.0/24", "10.1.0.0/16"), priority: 6), update: false)

        let updated = try db.insert(policy(sel, priority: 1, action: .block), update: true)
        #expect(updated.index == first.index)
        #expect(updated.generation > other.generation)
        #expect(db.count(.outbound) == 2)
        #expect(db.get(key: sel.keyFor(.outbound)) == updated)
        #expect(db.get(index: first.index, direction: .outbound)?.action == .block)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.1.0.1", proto: 6)) == updated)
        // A given index is ignored when replacing (the kernel keeps the old one) unless another policy holds it.
        let again = try db.insert(policy(sel, priority: 1, index: 0x1001), update: true)
        #expect(again.index == first.index)
        #expect(db.get(index: 0x1001, direction: .outbound) == nil)
        // Update with no duplicate inserts.
        let inserted = try db.insert(policy(selector("10.0.0.0/24", "10.2.0.0/24")), update: true)
        #expect(db.get(index: inserted.index, direction: .outbound) == inserted)
        #expect(db.count(.outbound) == 3)
    }

    @Test("delete by key and by index; ENOENT when absent")
    func deletion() throws {
        let db = PolicyDatabase()
        let a = try db.insert(policy(selector("10.0.0.0/24", "10.1.0.0/24")), update: false)
        let b = try db.insert(policy(selector("10.0.0.0/24", "10.1.0.0/24"), .inbound), update: false)
        #expect(try db.delete(key: a.key) == a)
        expectError(2, "No such file or directory") { try db.delete(key: a.key) }
        expectError(2) { try db.delete(index: b.index, direction: .outbound) }  // wrong direction
        #expect(db.get(index: b.index, direction: .outbound) == nil)
        #expect(db.get(index: b.index, direction: .inbound) == b)
        #expect(try db.delete(index: b.index, direction: .inbound) == b)
        expectError(2, "No such file or directory") { try db.delete(index: b.index, direction: .inbound) }
        #expect(db.totalCount == 0)
        #expect(db.lookup(.inbound, flow("10.0.0.1", "10.1.0.1")) == nil)
        // The freed selector can be added again.
        #expect(try db.insert(policy(selector("10.0.0.0/24", "10.1.0.0/24")), update: false).key == a.key)
    }

    @Test("flush with a predicate removes only what it selects; counts follow")
    func flushAndCounts() throws {
        let db = PolicyDatabase()
        var offloaded: [Policy] = []
        for i in 0..<6 {
            let dir: PolicyDirection = i % 2 == 0 ? .outbound : .inbound
            let p = try db.insert(
                policy(selector("10.0.\(i).0/24", "10.1.\(i).0/24"), dir, offload: i < 3 ? 3 : nil), update: false)
            if i < 3 { offloaded.append(p) }
        }
        try db.insert(policy(selector("10.9.0.0/24", "10.8.0.0/24"), .forward, offload: 4), update: false)
        #expect(db.count(.outbound) == 3)
        #expect(db.count(.inbound) == 3)
        #expect(db.count(.forward) == 1)
        #expect(db.totalCount == 7)

        let removed = db.flush { $0.offload?.ifindex == 3 }
        #expect(Set(removed) == Set(offloaded))
        #expect(removed.map(\.generation) == removed.map(\.generation).sorted(by: >))  // list order
        #expect(db.totalCount == 4)
        #expect(db.count(.outbound) == 1)
        #expect(db.count(.inbound) == 2)
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.1.0.1")) == nil)

        #expect(db.flush().count == 4)
        #expect(db.totalCount == 0)
        #expect(db.count(.forward) == 0)
        #expect(db.list().isEmpty)
        #expect(db.flush().isEmpty)
    }

    @Test("list shows the newest policy first, like the kernel's policy_all dump")
    func listOrder() throws {
        let db = PolicyDatabase()
        var added: [Policy] = []
        for i in 0..<5 {
            added.append(try db.insert(policy(selector("10.0.\(i).0/24", "0.0.0.0/0"), i % 2 == 0 ? .outbound : .forward),
                                       update: false))
        }
        #expect(db.list() == added.reversed())
        // An update links the replacement anew: it moves to the front.
        let replaced = try db.insert(policy(selector("10.0.1.0/24", "0.0.0.0/0"), .forward, priority: 3), update: true)
        #expect(db.list().first == replaced)
        #expect(db.list().count == 5)
        try db.delete(key: added[4].key)
        #expect(db.list() == [replaced, added[3], added[2], added[0]])
    }

    @Test("use time: recorded per index, absent until used, reset by replacement")
    func useTime() throws {
        let db = PolicyDatabase()
        let p = try db.insert(policy(selector("10.0.0.0/24", "0.0.0.0/0")), update: false)
        #expect(db.lastUse(index: p.index, direction: .outbound) == nil)
        db.markUsed(index: p.index, direction: .outbound, at: 100)
        db.markUsed(index: p.index, direction: .outbound, at: 130)
        #expect(db.lastUse(index: p.index, direction: .outbound) == 130)
        #expect(db.lastUse(index: p.index, direction: .inbound) == nil)
        db.markUsed(index: 0x7777_0001, direction: .outbound, at: 5)  // unknown: ignored
        #expect(db.lastUse(index: 0x7777_0001, direction: .outbound) == nil)
        try db.insert(policy(selector("10.0.0.0/24", "0.0.0.0/0"), priority: 2), update: true)
        #expect(db.lastUse(index: p.index, direction: .outbound) == nil)
    }

    @Test("lookup agrees with the linear scan on random policies and flows", arguments: [1, 2, 3])
    func matchesLinearScan(seed: UInt64) throws {
        var rng = SplitMix(state: seed &* 0x1234_5678_9abc_def1)
        let db = PolicyDatabase()
        var keys: [Policy.Key] = []

        // A small address space, so prefixes nest and overlap a lot; few priorities, so ties are common.
        func v4(_ rng: inout SplitMix) -> UInt32 {
            0x0a00_0000 | UInt32(rng.next() % 4) << 16 | UInt32(rng.next() % 8) << 8 | UInt32(rng.next() % 8)
        }
        func v6(_ rng: inout SplitMix) -> (UInt64, UInt64) {
            (0x2001_0db8_0000_0000 | (rng.next() % 4) << 16, (rng.next() % 4) << 62 | rng.next() % 16)
        }
        func randomPolicy(_ rng: inout SplitMix) -> Policy {
            var sel: Selector
            let kind = rng.next() % 20
            if kind == 0 {
                sel = .any(family: 0)
            } else if kind < 14 {
                let lengths: [UInt8] = [0, 8, 14, 16, 21, 24, 29, 30, 32]
                sel = Selector(
                    family: 4, source: IPPrefix(.v4(v4(&rng)), length: lengths.randomElement(using: &rng)!),
                    destination: IPPrefix(.v4(v4(&rng)), length: lengths.randomElement(using: &rng)!))
            } else {
                let lengths: [UInt8] = [0, 16, 32, 46, 48, 64, 66, 100, 128]
                let (sh, sl) = v6(&rng)
                let (dh, dl) = v6(&rng)
                sel = Selector(
                    family: 6, source: IPPrefix(.v6(sh, sl), length: lengths.randomElement(using: &rng)!),
                    destination: IPPrefix(.v6(dh, dl), length: lengths.randomElement(using: &rng)!))
            }
            sel.proto = [0, 0, 6, 17, 1][Int(rng.next() % 5)]
            if rng.next() % 3 == 0 {
                sel.destinationPort = UInt16(rng.next() % 4)
                sel.destinationPortMask = [0xffff, 0x3, 0x1][Int(rng.next() % 3)]
            }
            if rng.next() % 4 == 0 {
                sel.sourcePort = UInt16(rng.next() % 4)
                sel.sourcePortMask = [0xffff, 0x2][Int(rng.next() % 2)]
            }
            if rng.next() % 10 == 0 { sel.ifindex = Int32(rng.next() % 2 + 1) }
            let mark = rng.next() % 6 == 0 ? Mark(value: UInt32(rng.next() % 2), mask: 0x1) : Mark()
            let dir: PolicyDirection = rng.next() % 5 == 0 ? .inbound : .outbound
            return Policy(selector: sel, direction: dir, priority: UInt32(rng.next() % 6), mark: mark,
                          offload: rng.next() % 15 == 0 ? PolicyOffload(ifindex: 3) : nil)
        }
        func randomFlow(_ rng: inout SplitMix) -> Flow {
            let proto: UInt8 = [0, 6, 17, 1, 58][Int(rng.next() % 5)]
            let sport = UInt16(rng.next() % 5)
            let dport = UInt16(rng.next() % 5)
            let mark = UInt32(rng.next() % 3)
            let ifindex = Int32(rng.next() % 3)
            let family = rng.next() % 10
            let src: IPAddress
            let dst: IPAddress
            if family < 6 {
                src = .v4(v4(&rng))
                dst = .v4(v4(&rng))
            } else if family < 9 {
                let (sh, sl) = v6(&rng)
                let (dh, dl) = v6(&rng)
                src = .v6(sh, sl)
                dst = .v6(dh, dl)
            } else {
                let (sh, sl) = v6(&rng)
                src = .v6(sh, sl)
                dst = .v4(v4(&rng))
            }
            return Flow(source: src, destination: dst, proto: proto, sourcePort: sport, destinationPort: dport,
                        mark: mark, ifindex: ifindex)
        }
        func check(_ rng: inout SplitMix, flows: Int) {
            var found = 0
            for _ in 0..<flows {
                let f = randomFlow(&rng)
                for dir in [PolicyDirection.outbound, .inbound, .forward] {
                    let fast = db.lookup(dir, f)
                    let slow = db.linearLookup(dir, f)
                    // Indices are unique: comparing them keeps a failure's message short.
                    #expect(fast?.index == slow?.index, "\(dir) \(f)")
                    #expect(fast == slow)
                    if fast != slow { return }
                    if fast != nil { found += 1 }
                }
            }
            #expect(found > flows / 4)  // the flows do hit policies
        }

        for _ in 0..<1500 {
            let p = randomPolicy(&rng)
            let update = rng.next() % 4 == 0
            if let stored = try? db.insert(p, update: update) { keys.append(stored.key) }
        }
        check(&rng, flows: 800)

        // Churn: delete a third, update some, add more; the index must stay exact.
        keys.shuffle(using: &rng)
        for key in keys.prefix(keys.count / 3) { _ = try? db.delete(key: key) }
        for _ in 0..<500 {
            var p = randomPolicy(&rng)
            if rng.next() % 2 == 0, let key = keys.randomElement(using: &rng), let old = db.get(key: key) {
                p.selector = old.selector  // replace an existing one (new priority, offload, ...)
                p.direction = old.direction
                p.mark = old.mark
            }
            if let stored = try? db.insert(p, update: true) { keys.append(stored.key) }
        }
        check(&rng, flows: 800)
        #expect(db.totalCount == db.list().count)
        #expect(db.count(.outbound) + db.count(.inbound) + db.count(.forward) == db.totalCount)

        // Emptying the database empties the index.
        db.flush { _ in rng.next() % 2 == 0 }
        check(&rng, flows: 200)
        db.flush()
        #expect(db.lookup(.outbound, flow("10.0.0.1", "10.0.0.2")) == nil)
    }

    @Test("100,000 policies insert quickly and lookups agree with the linear scan")
    func scale() throws {
        var rng = SplitMix(state: 42)
        let db = PolicyDatabase()
        let clock = ContinuousClock()
        let start = clock.now
        for i in 0..<100_000 {
            let a = UInt32(truncatingIfNeeded: rng.next())
            let b = UInt32(truncatingIfNeeded: rng.next())
            let dl = UInt8(8 + rng.next() % 25)
            let sl = UInt8(rng.next() % 4 == 0 ? 0 : 8 + rng.next() % 25)
            var sel = Selector(family: 4, source: IPPrefix(.v4(a), length: sl), destination: IPPrefix(.v4(b), length: dl))
            sel.destinationPort = UInt16(i % 1000)
            sel.destinationPortMask = i % 3 == 0 ? 0 : 0xffff
            _ = try? db.insert(Policy(selector: sel, direction: .outbound, priority: UInt32(rng.next() % 100)),
                               update: false)
        }
        let elapsed = clock.now - start
        #expect(elapsed < .seconds(30), "100k inserts took \(elapsed)")
        for _ in 0..<100 {
            let f = Flow(source: .v4(UInt32(truncatingIfNeeded: rng.next())),
                         destination: .v4(UInt32(truncatingIfNeeded: rng.next())), proto: 6,
                         sourcePort: 1000, destinationPort: UInt16(rng.next() % 1000))
            #expect(db.lookup(.outbound, f) == db.linearLookup(.outbound, f))
        }
    }
}

extension Selector {
    fileprivate func keyFor(_ direction: PolicyDirection, mark: Mark = Mark(), ifID: UInt32 = 0) -> Policy.Key {
        Policy(selector: self, direction: direction, mark: mark, ifID: ifID).key
    }
}
