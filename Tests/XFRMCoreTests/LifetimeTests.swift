import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

@Suite("SA lifetimes and the SAD")
struct LifetimeTests {
    @Test("a soft packet limit sends exactly one EXPIRE hard=0; the hard limit deletes with EXPIRE hard=1")
    func packetLimits() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softPacketLimit = 3
        l.hardPacketLimit = 5
        try h.tunnel(lifetime: l)
        _ = h.eventsA.drain()
        var results: [OutputResult] = []
        for _ in 0..<7 { results.append(h.send(h.packet()).0) }
        #expect(results.prefix(5).allSatisfy { $0 == .transmit(ifindex: 2) })
        #expect(results[5] == .dropped(.outStateExpired))
        let ex = h.eventsA.expires()
        #expect(ex.count == 2)
        #expect(ex[0] == (0x1001, false))
        #expect(ex[1] == (0x1001, true))
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)) == nil)
        #expect(h.a.statistics[.outStateExpired] == 1)
        #expect(results[6] == .dropped(.outNoStates), "after deletion the policy acquires a new SA")
    }

    @Test("a soft byte limit marks the SA dying; a fresh SA is then preferred; update revives the dying one")
    func dyingPreference() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softByteLimit = 100
        try h.tunnel(lifetime: l)
        _ = h.send(h.packet())
        _ = h.send(h.packet())
        let old = h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001))!
        #expect(old.isDying)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1003, on: h.a))
        let (_, wire) = h.send(h.packet())
        #expect(Array(wire[20..<24]) == [0, 0, 0x10, 0x03])
        try h.a.updateState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))
        #expect(!old.isDying)
    }

    @Test("add-time limits fire on the manual clock; an unused SA never use-expires")
    func timeLimits() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softAddExpiresSeconds = 10
        l.hardAddExpiresSeconds = 20
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: l, on: h.a))
        var u = LifetimeConfig()
        u.hardUseExpiresSeconds = 5
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1002, lifetime: u, on: h.a))
        _ = h.eventsA.drain()
        h.clock.advance(by: 9)
        h.a.runTimers()
        #expect(h.eventsA.expires().isEmpty)
        h.clock.advance(by: 1)
        h.a.runTimers()
        h.a.runTimers()
        #expect(h.eventsA.expires().map { $0.1 } == [false])
        h.clock.advance(by: 10)
        h.a.runTimers()
        #expect(h.eventsA.expires().map { $0.0 } == [0x1001])
        #expect(h.a.states.count == 1, "the never-used SA with a use limit is still there")
    }

    @Test("a clock that jumps past both add-time deadlines sends the soft EXPIRE first and the hard one as long after as the limits are apart (xfrm_timer_handler)")
    func clockJumpSoftBeforeHard() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softAddExpiresSeconds = 10
        l.hardAddExpiresSeconds = 20
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: l, on: h.a))
        _ = h.eventsA.drain()
        h.clock.advance(by: 1)
        h.a.runTimers()
        h.clock.advance(by: 3_600)  // the wall clock is set an hour on
        h.a.runTimers()
        #expect(h.eventsA.expires().map { $0.1 } == [false], "soft first")
        #expect(h.a.states.count == 1)
        h.clock.advance(by: 9)
        h.a.runTimers()
        #expect(h.eventsA.expires().isEmpty, "the hard limit is 10 s after the soft one")
        h.clock.advance(by: 1)
        h.a.runTimers()
        #expect(h.eventsA.expires().map { $0.1 } == [true])
        #expect(h.a.states.count == 0)
    }

    @Test("a policy's soft POLEXPIRE repeats every 30 s; a replacement (update) gets its own first one at its own deadline")
    func policySoftExpiryPerPolicy() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softAddExpiresSeconds = 5
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        _ = try h.a.addPolicy(Policy(selector: sel, direction: .outbound, lifetime: l), update: false)
        func softs() -> Int {
            h.eventsA.drain().filter { if case .policyExpire(_, hard: false) = $0 { true } else { false } }.count
        }
        _ = h.eventsA.drain()
        h.clock.advance(by: 5)
        h.a.runTimers()
        #expect(softs() == 1)
        h.clock.advance(by: 1)
        _ = try h.a.addPolicy(Policy(selector: sel, direction: .outbound, lifetime: l), update: true)
        h.a.runTimers()
        #expect(softs() == 0, "the replacement's lifetime starts now")
        h.clock.advance(by: 5)
        h.a.runTimers()
        #expect(softs() == 1, "its own first soft POLEXPIRE, not held back by its predecessor's")
    }

    @Test("use-time limits count from first use")
    func useTime() throws {
        let h = try TwoHosts()
        try h.tunnel()
        var u = LifetimeConfig()
        u.hardUseExpiresSeconds = 5
        try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: u, on: h.a))
        h.clock.advance(by: 100)
        h.a.runTimers()
        #expect(h.a.states.count == 2)
        _ = h.send(h.packet())
        h.clock.advance(by: 5)
        h.a.runTimers()
        #expect(h.a.states.count == 1)
    }

    @Test("duplicates are EEXIST, missing ones ESRCH; flush by protocol; dumps list the newest first")
    func sadBasics() throws {
        let h = try TwoHosts()
        let s1 = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x100, on: h.a)
        try h.a.addState(s1)
        #expect(throws: StateDatabaseError(17, "File exists")) {
            try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x100, on: h.a))
        }
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x101, on: h.a))
        #expect(h.a.states.list().map(\.id.spi) == [0x101, 0x100])
        #expect(throws: StateDatabaseError(3, "No such process")) {
            try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x999), mark: Mark())
        }
        #expect(throws: StateDatabaseError(3, "No such process")) {
            try h.a.updateState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x999, on: h.a))
        }
        h.a.flushStates(proto: 51)
        #expect(h.a.states.count == 2)
        h.a.flushStates(proto: 50)
        #expect(h.a.states.count == 0)
    }

    /// An OUT policy 10.0.1.0/24 → 10.0.2.0/24 with a reqid-42 tunnel template and no SA on A; one packet makes
    /// the ACQUIRE, whose larval SA is returned.
    private func acquireLarval(_ h: TwoHosts) throws -> SecurityAssociation {
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 42)
        let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        return try #require(h.a.states.list().first { $0.config.reqid == 42 })
    }

    @Test("allocspi picks a free SPI in the range and refuses an exhausted one")
    func allocSPI() throws {
        let h = try TwoHosts()
        let c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0, on: h.a).currentConfig
        let sa = try h.a.allocateSPI(c, min: 0x1000, max: 0x1000)
        #expect(sa.id.spi == 0x1000)
        #expect(sa.state == .acquiring)
        #expect(throws: StateDatabaseError.self) { try h.a.allocateSPI(c, min: 0x1000, max: 0x1000) }
        let sb = try h.a.allocateSPI(c, min: 0x2000, max: 0x2fff)
        #expect((0x2000...0x2fff).contains(sb.id.spi))
        // update fills the larval SA in.
        try h.a.updateState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1000, on: h.a))
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1000))?.state == .valid)
    }

    @Test("allocspi never hands out SPI 0, keeps SPIs unique per protocol across destinations, and an SA found by seq keeps its protocol")
    func allocSPIEdges() throws {
        let h = try TwoHosts()
        let c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0, on: h.a).currentConfig
        #expect(throws: StateDatabaseError.self) { try h.a.allocateSPI(c, min: 0, max: 0) }
        for _ in 0..<20 {  // 0 is in range: drawn, it fails the request; it never becomes an SA's SPI
            var r = c
            r.reqid = 100
            if let sa = try? h.a.allocateSPI(r, min: 0, max: 1) {
                #expect(sa.id.spi == 1)
                try h.a.deleteState(sa.id, mark: Mark())
            }
        }
        var low = c
        low.reqid = 101
        #expect((0x10...0x20).contains(try h.a.allocateSPI(low, min: 0x10, max: 0x20).id.spi), "any range, as Linux")
        _ = try h.a.allocateSPI(c, min: 0x3000, max: 0x3000)
        var elsewhere = c
        elsewhere.id.destination = IPAddress("192.0.2.9")!
        #expect(throws: StateDatabaseError.self) { try h.a.allocateSPI(elsewhere, min: 0x3000, max: 0x3000) }
        // The larval SAs left behind (SPI 0: the failed requests') are not in the input table: `get` finds none.
        #expect(h.a.states.get(SAID(destination: IPAddress("192.0.2.2")!, spi: 0), mark: Mark()) == nil)
        // ALLOCSPI naming an ACQUIRE's larval SA by its sequence number gives the SPI to that SA, whose protocol
        // (ESP) decides which SPIs are free, whatever the request says.
        let acquired = try self.acquireLarval(h)
        var bySeq = c
        bySeq.id.proto = 51
        bySeq.reqid = 7
        #expect(throws: StateDatabaseError.self, "0x3000 is ESP's already (AH's is free)") {
            try h.a.allocateSPI(bySeq, seq: acquired.config.kmSequence, min: 0x3000, max: 0x3000)
        }
        let got = try h.a.allocateSPI(bySeq, seq: acquired.config.kmSequence, min: 0x3001, max: 0x3001)
        #expect(got.config.reqid == 42 && got.id.proto == 50 && got.id.spi == 0x3001)
        #expect(got.config.selector == acquired.config.selector, "the ACQUIRE's flow selector stays")
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x3001)) === got)
        // That larval SA is still an acquire in progress: the next packet asks nothing more.
        _ = h.eventsA.drain()
        #expect(h.send(h.packet(from: "10.0.1.9")).0 == .dropped(.outNoStates))
        #expect(!h.eventsA.drain().contains { if case .acquire = $0 { return true } else { return false } })
        try h.a.deleteState(got.id, mark: Mark())
        #expect(h.a.states.lookup(got.id) == nil, "deleted from the input table too")
    }

    @Test("add with an ACQUIRE's sequence number replaces its larval SA even after ALLOCSPI gave it an SPI, only for the same destination and CPU; ALLOCSPI by number checks the CPU too")
    func addReplacesLarvalBySequence() throws {
        let h = try TwoHosts()
        let acquired = try self.acquireLarval(h)
        let seq = acquired.config.kmSequence
        #expect(seq != 0 && acquired.id.spi == 0)
        let c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0, reqid: 42, on: h.a).currentConfig
        // ALLOCSPI naming the ACQUIRE's number for another CPU does not take its larval SA (Linux 6.13+).
        var otherCPU = c
        otherCPU.pcpuNum = 1
        let fresh = try h.a.allocateSPI(otherCPU, seq: seq, min: 0x3ff0, max: 0x3ff0)
        #expect(fresh.config.pcpuNum == 1 && fresh.config.kmSequence != seq)
        #expect(h.a.states.list().contains { $0.state == .acquiring && $0.id.spi == 0 && $0.config.reqid == 42 })
        try h.a.deleteState(fresh.id, mark: Mark())
        let larval = try h.a.allocateSPI(c, seq: seq, min: 0x4000, max: 0x4000)
        #expect(larval.id.spi == 0x4000 && larval.state == .acquiring)
        /// A full SA for `spi`, reqid 7 (so only the sequence number can name the larval SA), with `seq`.
        func full(_ spi: UInt32, to: String = "192.0.2.2", pcpu: UInt32? = nil) throws -> SecurityAssociation {
            var config = try h.sa(from: "192.0.2.1", to: to, spi: spi, reqid: 7, on: h.a).currentConfig
            config.kmSequence = seq
            config.pcpuNum = pcpu
            return try h.a.makeSA(config)
        }
        // Another destination or another CPU: the larval SA stays (≈ __xfrm_find_acq_byseq, Linux 6.13+).
        try h.a.addState(full(0x5001, to: "192.0.2.9"))
        try h.a.addState(full(0x5002, pcpu: 1))
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x4000)) === larval)
        // Its own: the larval SA with its SPI goes, whatever its reqid.
        try h.a.addState(full(0x5000))
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x4000)) == nil)
        #expect(!h.a.states.list().contains { $0.state == .acquiring })
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x5000))?.state == .valid)
    }

    @Test("a slow subscriber loses events (counted) and never blocks publishing")
    func slowSubscriber() {
        let bus = EventBus()
        let slow = bus.subscribe(capacity: 2)
        let fast = bus.subscribe(capacity: 100)
        for _ in 0..<10 { bus.publish(.policiesFlushed) }
        #expect(slow.drain().count == 2)
        #expect(slow.dropped == 8)
        #expect(fast.drain().count == 10)
    }
}

@Suite("State update (xfrm_state_update)")
struct StateUpdateTests {
    private func natt(_ h: TwoHosts, sport: UInt16, type: UInt16 = 2, lifetime: LifetimeConfig = LifetimeConfig())
        throws -> SecurityAssociation
    {
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: lifetime, on: h.a).currentConfig
        c.encapsulation = NATTEncapsulation(sourcePort: sport, destinationPort: 4500)
        c.encapsulationType = type
        return try h.a.makeSA(c)
    }

    @Test("update on a valid SA takes the new NAT-T ports; a change of encapsulation presence or type is EINVAL")
    func encapsulationUpdate() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(self.natt(h, sport: 4500))
        try h.a.updateState(self.natt(h, sport: 31337))
        let (_, wire) = h.send(h.packet())
        #expect(Array(wire[20..<22]) == [0x7a, 0x69], "the UDP source port is the updated one")
        #expect(h.a.states.list()[0].encapsulation?.sourcePort == 31337)
        #expect(throws: StateDatabaseError.self) { try h.a.updateState(self.natt(h, sport: 1, type: 1)) }
        #expect(throws: StateDatabaseError.self) {
            try h.a.updateState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))
        }
    }

    @Test("update sets a non-zero if_id and an output mark, as xfrm_state_update copies them")
    func updateIfID() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let all = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("0.0.0.0/0")!)
        try h.a.addPolicy(Policy(selector: all, direction: .outbound, ifID: 7, templates: [t]), update: false)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))
        #expect(h.buffers.with(h.packet()) { h.a.output(&$0, ifID: 7) }.0 == .dropped(.outNoStates))
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig
        c.ifID = 7
        c.outputMark = Mark(value: 5, mask: 0xff)
        try h.a.updateState(h.a.makeSA(c))
        let sa = try #require(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)))
        #expect(sa.ifID == 7 && sa.outputMark == Mark(value: 5, mask: 0xff))
        #expect(h.buffers.with(h.packet()) { h.a.output(&$0, ifID: 7) }.0 == .transmit(ifindex: 2))
    }

    @Test("update lowering byte-hard below the current count expires the SA at once (EXPIRE hard 1)")
    func updateExpiresNow() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for _ in 0..<3 { _ = h.send(h.packet()) }
        _ = h.eventsA.drain()
        var l = LifetimeConfig()
        l.hardByteLimit = 10
        try h.a.updateState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: l, on: h.a))
        #expect(h.eventsA.expires().map(\.1) == [true])
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)) == nil)
    }

    @Test("received bytes count the decapsulated packet (tunnel: the inner packet), and last-used moves with every packet")
    func receivedBytesAndLastUsed() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet(size: 100)
        let (_, wire) = h.send(inner)
        #expect(h.receive(wire).0 == .deliver)
        let sa = try #require(h.b.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)))
        #expect(sa.current.bytes == UInt64(inner.count))
        let first = sa.lastUsed
        #expect(first == h.clock.now)
        h.clock.advance(by: 5)
        let (_, wire2) = h.send(inner)
        #expect(h.receive(wire2).0 == .deliver)
        #expect(sa.lastUsed == first + 5)
        #expect(sa.current.useTime == first, "use_time stays the first use")
    }

    @Test("sent bytes count what ESP carries: the inner packet in tunnel mode, the payload after the IP header in transport mode")
    func sentBytesByMode() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet(size: 100)
        #expect(h.send(inner).0 == .transmit(ifindex: 2))
        let tunnelSA = try #require(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)))
        #expect(tunnelSA.current.bytes == UInt64(inner.count))

        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 0, reqid: 7)
        let hosts = Selector(family: 4, source: IPPrefix("192.0.2.1/32")!, destination: IPPrefix("192.0.2.2/32")!)
        try h.a.addPolicy(Policy(selector: hosts, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x3003, mode: .transport, reqid: 7, on: h.a))
        let direct = h.packet(from: "192.0.2.1", to: "192.0.2.2", size: 100)
        #expect(h.send(direct).0 == .transmit(ifindex: 2))
        let transportSA = try #require(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x3003)))
        #expect(transportSA.current.bytes == UInt64(direct.count - 20))
    }
}
