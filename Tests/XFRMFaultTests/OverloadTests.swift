import Testing
import XFRMCore
import XFRMCrypto
import XFRMPacket
import XFRMSimHost
import XFRMSimulatedNIC
import XFRMTestKit

@Suite("Overload: pool exhaustion and full event queues are counted drops, and everything recovers when load falls")
struct OverloadTests {
    @Test("an exhausted packet pool drops and counts (sent = delivered + pool_exhausted); once the load falls every buffer is back and traffic flows",
          arguments: [OffloadType.packet, .crypto])
    func poolExhaustion(_ mode: OffloadType) throws {
        let t = try FaultTopology(mode: mode, poolSlots: 64)
        try t.addTunnel()
        // A stalled NIC holds every buffer A hands it: the pool runs dry.
        t.nicA.setStalled(true)
        t.send(200)
        #expect(t.a.poolExhausted == 200 - 64)
        #expect(t.a.pool.available == 0)
        t.nicA.setStalled(false)
        t.settle()
        #expect(t.b.deliveredPackets + t.a.poolExhausted == 200)
        #expect(t.a.pool.available == t.a.pool.slotCount, "every buffer is back")
        t.send(50, seed: 1)
        t.settle()
        #expect(t.b.deliveredPackets == 64 + 50, "traffic flows again")
        #expect(t.a.poolExhausted == 136, "nothing more was dropped")
        #expect(t.wireFromA().clear == 0)
        t.expectConsistent()
        t.expectNoLeak()
    }

    @Test("a subscriber whose event queue is full loses events, counted and reported once (≈ ENOBUFS); later events arrive again")
    func eventQueueFull() throws {
        let stack = XFRMStack()
        let slow = stack.events.subscribe(capacity: 8)
        let fast = stack.events.subscribe()
        func add(_ spi: UInt32) throws {
            let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
            try stack.addState(stack.makeSA(SAConfig(
                id: SAID(destination: IPAddress("192.0.2.2")!, spi: spi), source: IPAddress("192.0.2.1")!,
                selector: .any(family: 0), reqid: 1, mode: .tunnel, crypto: crypto)))
        }
        for spi in UInt32(0x100)..<0x114 { try add(spi) }
        var (events, lost) = slow.drainReportingLoss()
        #expect(events.count == 8 && lost == 12)
        #expect(fast.drain().count == 20, "a slow subscriber does not hold up the others")
        (events, lost) = slow.drainReportingLoss()
        #expect(events.isEmpty && lost == 0, "the loss is reported once")
        for spi in UInt32(0x200)..<0x203 { try add(spi) }
        (events, lost) = slow.drainReportingLoss()
        #expect(events.count == 3 && lost == 0, "it recovers once drained")
        #expect(slow.dropped == 12)
        #expect(stack.states.count == 23, "losing events loses no state")
    }
}
