import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// xfrm_input's order under the SA's lock: state (larval → XfrmAcquireError, otherwise not valid →
/// XfrmInStateInvalid), encapsulation, replay, and only then the lifetime check (xfrm_state_check_expire).
@Suite("Input check order (xfrm_input)")
struct InputCheckOrderTests {
    private static let inbound = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)

    /// B's inbound SA 0x1001 replaced by one with `lifetime` (before any traffic), so A's side keeps no limit.
    private func hostsWithInboundLimit(_ lifetime: LifetimeConfig) throws -> TwoHosts {
        let h = try TwoHosts()
        try h.tunnel()
        try h.b.updateState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: lifetime, on: h.b))
        _ = h.eventsB.drain()
        return h
    }

    @Test("a replayed packet at the hard packet limit is a sequence error and leaves the SA valid; a new one expires it")
    func replayBeforeHardExpiry() throws {
        var l = LifetimeConfig()
        l.hardPacketLimit = 2
        let h = try self.hostsWithInboundLimit(l)
        let wires = (0..<3).map { _ in h.send(h.packet()).1 }
        #expect(h.receive(wires[0]).0 == .deliver)
        #expect(h.receive(wires[1]).0 == .deliver)
        #expect(h.receive(wires[1]).0 == .dropped(.inStateSeqError))
        let sa = try #require(h.b.states.lookup(Self.inbound))
        #expect(sa.state == .valid)
        #expect(sa.stats.replay == 1)
        #expect(h.b.statistics[.inStateExpired] == 0)
        #expect(h.eventsB.expires().isEmpty)
        #expect(h.receive(wires[2]).0 == .dropped(.inStateExpired))
        #expect(h.b.statistics[.inStateSeqError] == 1)
        #expect(h.b.statistics[.inStateExpired] == 1)
        #expect(h.eventsB.expires().map(\.1) == [true])
    }

    @Test("a replayed packet at the soft packet limit sends no soft EXPIRE; the next new packet does")
    func replayBeforeSoftExpiry() throws {
        var l = LifetimeConfig()
        l.softPacketLimit = 1
        let h = try self.hostsWithInboundLimit(l)
        let wires = (0..<2).map { _ in h.send(h.packet()).1 }
        #expect(h.receive(wires[0]).0 == .deliver)
        #expect(h.receive(wires[0]).0 == .dropped(.inStateSeqError))
        let sa = try #require(h.b.states.lookup(Self.inbound))
        #expect(!sa.isDying)
        #expect(h.eventsB.expires().isEmpty)
        #expect(h.receive(wires[1]).0 == .deliver)
        #expect(sa.isDying)
        #expect(h.eventsB.expires().map(\.1) == [false])
    }

    @Test("an inner packet that fails after ESP verified it (bad next header, bogus inner IP) is a mode error that still counts in curlft and moves the window, per packet and in a batch run")
    func innerModeFailureCountsInLifetime() throws {
        for batch in [false, true] {
            let h = try TwoHosts()
            try h.tunnel()
            let sa = try #require(h.b.states.lookup(Self.inbound))
            let inner = h.packet()
            let good = h.send(inner).1  // sequence number 1
            // A's copy of the SA's key seals what the test chooses (its own SA object: B's window stays B's).
            let tx = try #require(try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).transform)
            let bad = [
                tx.handSealed(spi: 0x1001, seq: 2, plaintext: [1, 2, 3, 4, 5, 6, 0, 17]),  // UDP in a tunnel: 6 bytes
                tx.handSealed(spi: 0x1001, seq: 3, plaintext: [0x45, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 4]),  // 10 bytes
            ]
            if batch {
                // The good packet first: the batch's input run (one lock for the SA's packets) takes the two
                // bad ones after it.
                let o = BatchRunTests.run(h, [good, bad[0], bad[1]].map { ($0, .input) }, batch: true, atB: true)
                #expect(o.verdicts == [.input(.deliver, decapsulated: true)]
                    + Array(repeating: .input(.dropped(.inStateModeError), decapsulated: false), count: 2))
            } else {
                #expect(h.receive(good).0 == .deliver)
                #expect(h.receive(bad[0]).0 == .dropped(.inStateModeError))
                #expect(h.receive(bad[1]).0 == .dropped(.inStateModeError))
            }
            #expect(h.b.statistics[.inStateModeError] == 2)
            // ≈ xfrm_input: curlft and the window took both bad ones before xfrm_inner_mode_input refused them.
            #expect(sa.current.packets == 3 && sa.current.bytes == UInt64(inner.count + 16), "batch: \(batch)")
            #expect(h.receive(bad[1]).0 == .dropped(.inStateSeqError))
        }
    }

    @Test("ESP for a larval SA (ALLOCSPI, not yet filled in) counts XfrmAcquireError, not XfrmInNoStates")
    func larvalIsAcquireError() throws {
        let h = try TwoHosts()
        try h.tunnel()
        // A's SA 0x1001 goes to B, where only a larval SA holds that SPI.
        try h.b.deleteState(Self.inbound, mark: Mark())
        let config = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0, on: h.b).currentConfig
        let larval = try h.b.allocateSPI(config, min: 0x1001, max: 0x1001)
        #expect(larval.state == .acquiring)
        let (_, wire) = h.send(h.packet())
        #expect(h.receive(wire).0 == .dropped(.acquireError))
        #expect(h.b.statistics[.acquireError] == 1)
        #expect(h.b.statistics[.inNoStates] == 0)
    }
}
