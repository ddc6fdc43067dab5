import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Per-CPU SAs (RFC 9611; Linux 6.13's `pcpu_num` in xfrm_state_find): one SA per CPU for one tunnel, each with
/// its own sequence space, and the SA bound to no CPU as the fallback.
@Suite("Per-CPU SAs: output resolution by CPU, fallback, per-CPU acquire")
struct PerCPUStateTests {
    let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
    let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)

    private func sa(_ h: TwoHosts, spi: UInt32, cpu: UInt32?) throws -> SecurityAssociation {
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: spi, on: h.a, window: 0).currentConfig
        c.pcpuNum = cpu
        c.direction = .outbound
        return try h.a.makeSA(c)
    }

    /// Sends one packet of `flow` (a source port) on `cpu`; returns the SPI it left with, or nil.
    private func send(_ h: TwoHosts, cpu: UInt32, port: UInt16 = 1000) -> UInt32? {
        let bytes = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                       payload: PacketFactory.udp(sourcePort: port, payload: PacketFactory.pattern(64)))
        let (r, wire) = h.buffers.with(bytes) { h.a.output(&$0, cpu: cpu) }
        guard case .transmit = r, wire[9] == 50 else { return nil }
        return UInt32(wire[20]) << 24 | UInt32(wire[21]) << 16 | UInt32(wire[22]) << 8 | UInt32(wire[23])
    }

    private func acquires(_ h: TwoHosts) -> [SecurityAssociation] {
        h.eventsA.drain().compactMap { if case .acquire(let s, _, _) = $0 { return s } else { return nil } }
    }

    @Test("each CPU takes the SA with its pcpu-num; a CPU without one takes the SA bound to no CPU")
    func cpuPicksItsSA() throws {
        let h = try TwoHosts()
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(self.sa(h, spi: 0x1000, cpu: nil))
        try h.a.addState(self.sa(h, spi: 0x1100, cpu: 0))
        try h.a.addState(self.sa(h, spi: 0x1101, cpu: 1))
        // The same flow, cached after its first packet, still follows the CPU it runs on.
        for _ in 0..<3 {
            #expect(self.send(h, cpu: 0) == 0x1100)
            #expect(self.send(h, cpu: 1) == 0x1101)
            #expect(self.send(h, cpu: 2) == 0x1000)
        }
        // Each SA counts its own packets and has its own sequence space.
        for spi: UInt32 in [0x1000, 0x1100, 0x1101] {
            let s = try #require(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: spi)))
            #expect(s.current.packets == 3)
        }
    }

    @Test("a CPU-bound SA beats a newer unbound one; an SA bound to another CPU is never used")
    func otherCPUNeverUsed() throws {
        let h = try TwoHosts()
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(self.sa(h, spi: 0x1101, cpu: 1))
        #expect(self.send(h, cpu: 0) == nil, "only CPU 1's SA exists: CPU 0 has none")
        let larval = self.acquires(h)
        #expect(larval.count == 1 && larval.first?.config.pcpuNum == nil, "no fallback: a plain acquire")
        #expect(self.send(h, cpu: 1) == 0x1101)
        try h.a.addState(self.sa(h, spi: 0x1000, cpu: nil))
        #expect(self.send(h, cpu: 1) == 0x1101, "the CPU's own SA wins over a newer unbound one")
    }

    @Test("with XFRM_POLICY_CPU_ACQUIRE a CPU without its SA uses the fallback and acquires once, carrying the CPU")
    func cpuAcquire() throws {
        let h = try TwoHosts()
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, flags: Policy.cpuAcquireFlag, templates: [t]),
                          update: false)
        try h.a.addState(self.sa(h, spi: 0x1000, cpu: nil))
        #expect(self.send(h, cpu: 3) == 0x1000, "the fallback carries the packet")
        #expect(self.send(h, cpu: 3) == 0x1000)
        let larval = self.acquires(h)
        #expect(larval.count == 1, "one acquire per CPU, not one per packet")
        #expect(larval.first?.config.pcpuNum == 3)
        #expect(self.send(h, cpu: 2) == 0x1000)
        #expect(self.acquires(h).map(\.config.pcpuNum) == [2], "another CPU asks for its own")
        // The key manager answers CPU 3: its SA replaces CPU 3's larval entry and takes CPU 3's traffic.
        let before = h.a.states.count
        try h.a.addState(self.sa(h, spi: 0x1103, cpu: 3))
        #expect(h.a.states.count == before, "the larval SA for CPU 3 went")
        #expect(self.send(h, cpu: 3) == 0x1103)
        #expect(self.send(h, cpu: 2) == 0x1000)
    }

    @Test("without per-CPU SAs every CPU shares one SA and one cached bundle")
    func noPerCPUStatesShareOneSA() throws {
        let h = try TwoHosts()
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(self.sa(h, spi: 0x1000, cpu: nil))
        #expect(!h.a.states.hasPerCPUStates)
        for cpu: UInt32 in 0..<4 { #expect(self.send(h, cpu: cpu) == 0x1000) }
        #expect(!h.a.states.hasPerCPUStates(destination: IPAddress("192.0.2.2")!, proto: 50, reqid: 1))
        try h.a.addState(self.sa(h, spi: 0x1100, cpu: 0))
        #expect(h.a.states.hasPerCPUStates(destination: IPAddress("192.0.2.2")!, proto: 50, reqid: 1))
        #expect(!h.a.states.hasPerCPUStates(destination: IPAddress("192.0.2.2")!, proto: 50, reqid: 2))
    }

    @Test("the engine's affinity spreads the flows of a per-CPU tunnel and keeps a plain tunnel on one key")
    func affinitySpreadsPerCPUTunnels() throws {
        let h = try TwoHosts()
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(self.sa(h, spi: 0x1000, cpu: nil))
        func keys() -> Set<UInt32> {
            Set((0..<32).map { (port: UInt16) -> UInt32 in
                let bytes = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                               payload: PacketFactory.udp(sourcePort: 2000 + port,
                                                                          payload: PacketFactory.pattern(8)))
                return h.buffers.with(bytes) { h.a.affinity(of: $0, stage: .output) }.0
            })
        }
        #expect(keys().count == 1, "one SA: every flow on one worker")
        try h.a.addState(self.sa(h, spi: 0x1100, cpu: 0))
        #expect(keys().count > 16, "per-CPU SAs: flows spread")
    }
}
