import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// XFRM_MSG_MAPPING (≈ km_new_mapping from esp_input_done2): a NAT-T SA's ESP that proved itself (replay window,
/// ICV) but came from another address or UDP source port than the SA's peer is delivered, and the key manager hears
/// the new endpoint, for every such packet without XFRMA_MTIMER_THRESH, rate-limited with it.
@Suite("NAT-T mapping changes (XFRM_MSG_MAPPING)")
struct NATMappingTests {
    /// `wire` (A's ESP in UDP 4500 to B) as a NAT passes it on: from `source` (if given) and UDP port `port`.
    static func natted(_ wire: [UInt8], source: String? = nil, port: UInt16) -> [UInt8] {
        var w = wire
        if let source { w.replaceSubrange(12..<16, with: IPAddress(source)!.bytes) }
        w[20] = UInt8(port >> 8)
        w[21] = UInt8(port & 0xff)
        (w[26], w[27]) = (0, 0)  // no UDP checksum
        (w[10], w[11]) = (0, 0)
        let c = InternetChecksum.compute(Array(w[0..<20]))
        (w[10], w[11]) = (UInt8(c >> 8), UInt8(c & 0xff))
        return w
    }

    /// The mapping events drained: (SPI, new address, new port, old port).
    static func mappings(_ s: EventBus.Subscription) -> [(UInt32, IPAddress, UInt16, UInt16)] {
        s.drain().compactMap { e in
            if case .mapping(let sa, let address, let port, let old) = e { return (sa.id.spi, address, port, old) }
            return nil
        }
    }

    @Test("a packet from a new port or address is delivered and told; the SA's own endpoint, a forgery and a replay tell nothing")
    func perPacket() throws {
        let h = try TwoHosts()
        try h.tunnel(natt: true)
        let wire = (0..<5).map { i in h.send(h.packet(size: 40 + i)).1 }
        #expect(wire[0][9] == 17 && wire[0][20] == 0x11 && wire[0][21] == 0x94, "ESP in UDP from port 4500")
        _ = h.eventsB.drain()
        #expect(h.receive(wire[0]).0 == .deliver)
        #expect(Self.mappings(h.eventsB).isEmpty)
        #expect(h.receive(Self.natted(wire[1], port: 31337)).0 == .deliver)
        var m = Self.mappings(h.eventsB)
        #expect(m.count == 1)
        #expect(m.first.map { $0.0 == 0x1001 && $0.1 == IPAddress("192.0.2.1")! && $0.2 == 31337 && $0.3 == 4500 } == true)
        #expect(h.receive(Self.natted(wire[2], source: "198.51.100.7", port: 4500)).0 == .deliver)
        m = Self.mappings(h.eventsB)
        #expect(m.count == 1 && m.first?.1 == IPAddress("198.51.100.7")! && m.first?.2 == 4500)
        var forged = Self.natted(wire[3], port: 999)
        forged[forged.count - 1] ^= 1
        #expect(h.receive(forged).0 != .deliver)
        #expect(Self.mappings(h.eventsB).isEmpty, "only a packet that proved itself moves the mapping")
        #expect(h.receive(Self.natted(wire[1], port: 4242)).0 != .deliver)
        #expect(Self.mappings(h.eventsB).isEmpty, "a replay from elsewhere is dropped before it tells anything")
        // Raw ESP SAs have no mapping to move.
        let r = try TwoHosts()
        try r.tunnel()
        let raw = r.send(r.packet()).1
        var elsewhere = raw
        elsewhere.replaceSubrange(12..<16, with: IPAddress("198.51.100.7")!.bytes)
        (elsewhere[10], elsewhere[11]) = (0, 0)
        let c = InternetChecksum.compute(Array(elsewhere[0..<20]))
        (elsewhere[10], elsewhere[11]) = (UInt8(c >> 8), UInt8(c & 0xff))
        _ = r.eventsB.drain()
        _ = r.receive(elsewhere)
        #expect(Self.mappings(r.eventsB).isEmpty)
    }

    @Test("a TFC dummy packet (next header 59) from a new port is dropped as a dummy and still told, as esp_input_done2 tells it")
    func tfcDummyTells() throws {
        let h = try TwoHosts()
        try h.tunnel(natt: true)
        // A's SA 0x1001 as a transport-mode transform: its dummy packet carries next header 59.
        let tx = try ESPTransform(ESPConfig(
            spi: 0x1001, mode: .transport,
            crypto: ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: TwoHosts.key, icvBits: 128),
            encapsulation: NATTEncapsulation()))
        let dummy = PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 59, payload: [0, 0, 0, 0])
        let (r, wire) = h.buffers.with(dummy) { tx.encapsulate(&$0) }
        #expect(r == nil)
        _ = h.eventsB.drain()
        #expect(h.receive(Self.natted(wire, port: 31337)).0 == .dropped(nil))
        #expect(Self.mappings(h.eventsB).first?.2 == 31337)
    }

    @Test("after the key manager moves the SA's ports (update), packets from there are the SA's own endpoint")
    func updatedPorts() throws {
        let h = try TwoHosts()
        try h.tunnel(natt: true)
        let wire = (0..<3).map { i in h.send(h.packet(size: 40 + i)).1 }
        _ = h.eventsB.drain()
        #expect(h.receive(Self.natted(wire[0], port: 31337)).0 == .deliver)
        #expect(Self.mappings(h.eventsB).count == 1)
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.b, natt: true).currentConfig
        c.encapsulation = NATTEncapsulation(sourcePort: 31337, destinationPort: 4500)
        try h.b.updateState(h.b.makeSA(c))
        _ = h.eventsB.drain()
        #expect(h.receive(Self.natted(wire[1], port: 31337)).0 == .deliver)
        #expect(Self.mappings(h.eventsB).isEmpty)
        #expect(h.receive(wire[2]).0 == .deliver, "the old port: the mapping moved back")
        #expect(Self.mappings(h.eventsB).first?.2 == 4500)
    }

    @Test("XFRMA_MTIMER_THRESH: a move to a new port is told at once; more from that port at most once per threshold")
    func rateLimited() throws {
        let h = try TwoHosts()
        try h.tunnel(natt: true)
        // B's inbound SA again, with a 30-second threshold (≈ km_new_mapping with x->mapping_maxage).
        try h.b.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        var c = try #require(h.b.states.lookup(SAID(destination: IPAddress("192.0.2.1")!, spi: 0x2002))).currentConfig
        c.id = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)
        c.source = IPAddress("192.0.2.1")!
        c.reqid = 1
        c.mappingMaxAge = 30
        try h.b.addState(h.b.makeSA(c))
        let wire = (0..<9).map { i in h.send(h.packet(size: 40 + i)).1 }
        _ = h.eventsB.drain()
        func told(_ i: Int, port: UInt16) -> Bool {
            #expect(h.receive(Self.natted(wire[i], port: port)).0 == .deliver, "packet \(i) is delivered all the same")
            return !Self.mappings(h.eventsB).isEmpty
        }
        #expect(told(0, port: 31337), "the first move")
        #expect(!told(1, port: 31337), "the same port again within 30 s")
        #expect(told(2, port: 31338), "another port: at once")
        h.clock.advance(by: 30)
        #expect(!told(3, port: 31338), "30 s are not more than 30")
        h.clock.advance(by: 1)
        #expect(told(4, port: 31338), "31 s later")
        #expect(!told(5, port: 31338))
        // A forgery from yet another port proves nothing and uses up nothing: the real packet from there is told.
        var forged = Self.natted(wire[6], port: 31339)
        forged[forged.count - 1] ^= 1
        #expect(h.receive(forged).0 != .deliver)
        #expect(Self.mappings(h.eventsB).isEmpty)
        #expect(told(7, port: 31339), "a new port, and the forgery before it did not count")
        // Without a threshold (the SA A→B of the other direction is not involved): every packet tells.
        let u = try TwoHosts()
        try u.tunnel(natt: true)
        let more = (0..<2).map { i in u.send(u.packet(size: 40 + i)).1 }
        _ = u.eventsB.drain()
        for w in more { _ = u.receive(Self.natted(w, port: 31337)) }
        #expect(Self.mappings(u.eventsB).count == 2)
    }
}

