import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// What a decapsulated packet is taken for (≈ the inner packet going through the IP layer again after xfrm_input):
/// only one for this host reaches the ESP, NAT-T and IKE demultiplexing, fragments are plain traffic, a layer the
/// secpath cannot hold is never opened, and an SA's set-mark is the mark the rest of input sees.
@Suite("Inner packets: local demux only, fragments, depth, set-mark")
struct InnerPacketTests {
    /// A UDP packet 10.0.1.1 → `to` with `payload` to `port`, as A's tunnel carries it.
    private func udp(to: String, port: UInt16, payload: [UInt8], flags: UInt16 = 0) -> [UInt8] {
        var p = PacketFactory.ipv4(source: "10.0.1.1", destination: to, proto: 17, dontFragment: false,
                                   payload: PacketFactory.udp(sourcePort: 500, destinationPort: port, payload: payload))
        if flags != 0 {
            p[6] = UInt8(flags >> 8)
            p[7] = UInt8(flags & 0xff)
            p[10] = 0
            p[11] = 0
            let c = InternetChecksum.compute(Array(p[0..<20]))
            p[10] = UInt8(c >> 8)
            p[11] = UInt8(c & 0xff)
        }
        return p
    }

    @Test("IKE inside a tunnel-mode SA to this host is refused (the IKE socket's bypass policy meets a tunnel SA: XfrmInTmplMismatch), never relayed")
    func ikeInsideTheTunnelIsRefused() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let ike = self.udp(to: "10.0.2.1", port: 4500, payload: [0, 0, 0, 0] + PacketFactory.pattern(40))
        let (out, wire) = h.send(ike)
        #expect(out == .transmit(ifindex: 2))
        let before = h.b.statistics[.inTmplMismatch]
        #expect(h.receive(wire).0 == .dropped(.inTmplMismatch))
        #expect(h.b.statistics[.inTmplMismatch] == before + 1)
        // The same from outside the SA's selector is a selector mismatch first.
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.b).currentConfig
        c.selector = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.128/25")!)
        try h.b.deleteState(c.id, mark: Mark())
        try h.b.addState(h.b.makeSA(c))
        let (_, wire2) = h.send(ike)
        #expect(h.receive(wire2).0 == .dropped(.inStateMismatch))
        // Plain IKE off the wire is still IKE.
        let plain = PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 17,
                                       payload: PacketFactory.udp(sourcePort: 4500, destinationPort: 4500,
                                                                  payload: [0, 0, 0, 0] + PacketFactory.pattern(40)))
        #expect(h.receive(plain).0 == .ike)
    }

    @Test("IKE or NAT-T ESP inside the tunnel for another host is forwarded through the FWD check, not demultiplexed here")
    func natTPortForAnotherHostIsForwarded() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for marker: [UInt8] in [[0, 0, 0, 0], [0, 0, 0x70, 0x07]] {
            let (_, wire) = h.send(self.udp(to: "10.0.2.77", port: 4500, payload: marker + PacketFactory.pattern(40)))
            let (r, inner) = h.receive(wire)
            #expect(r == .forward, "marker \(marker)")
            #expect(inner[9] == 17 && inner[8] == 63, "the inner packet as sent, its TTL decremented")
        }
    }

    @Test("nested ESP for another host is forwarded, never opened with an SA this host holds for that address")
    func nestedESPForAnotherHostIsForwarded() throws {
        let h = try TwoHosts()
        try h.tunnel()
        // An SA B holds whose destination is the inner packet's: the old code looked it up and tried to open it.
        let other = try h.sa(from: "10.0.1.1", to: "10.0.2.77", spi: 0x7007, mode: .transport, on: h.b)
        try h.b.addState(other)
        let esp = [0, 0, 0x70, 0x07, 0, 0, 0, 1] + PacketFactory.pattern(64)
        let inner = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.77", proto: 50, payload: esp)
        let (_, wire) = h.send(inner)
        let failedBefore = h.b.statistics[.inStateProtoError]
        #expect(h.receive(wire).0 == .forward)
        #expect(h.b.statistics[.inStateProtoError] == failedBefore)
        #expect(other.stats.failed == 0 && other.current.packets == 0, "the SA was not touched")
        // For this host, nested ESP is still opened (here: no SA with that SPI for 10.0.2.1).
        let local = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 50, payload: esp)
        let (_, wire2) = h.send(local)
        #expect(h.receive(wire2).0 == .dropped(.inNoStates))
    }

    @Test("inner UDP fragments (first, middle; IPv4) are plain traffic for the policy check, checked without ports as the kernel decodes them")
    func innerFragmentsAreDelivered() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let hdrErrors = h.b.statistics[.inHdrError]
        for flags: UInt16 in [0x2000, 0x2000 | 185, 185] {  // first (MF), middle (MF, offset), last
            let frag = self.udp(to: "10.0.2.1", port: 4500, payload: [0, 0, 0, 0] + PacketFactory.pattern(40),
                                flags: flags)
            let (out, wire) = h.send(frag)
            #expect(out == .transmit(ifindex: 2), "flags \(flags)")
            let (r, inner) = h.receive(wire)
            #expect(r == .deliver, "flags \(flags)")
            #expect(inner == frag)
        }
        #expect(h.b.statistics[.inHdrError] == hdrErrors)
        // A first fragment has no ports for the policy lookup: a policy for UDP port 5678 does not see it.
        let first = self.udp(to: "10.0.2.1", port: 5678, payload: PacketFactory.pattern(40), flags: 0x2000)
        let flow = try #require(first.withUnsafeBytes { raw in
            Flow.parse(UnsafeMutableRawPointer(mutating: raw.baseAddress!), count: first.count)
        })
        #expect(flow.sourcePort == 0 && flow.destinationPort == 0 && flow.proto == 17)
    }

    @Test("an IPv6 Mobility Header ends the header chain: the bytes behind it are not read as TCP (ipv6_ext_hdr)")
    func mobilityHeaderIsTheUpperLayer() throws {
        // MH: payload proto 6 (wrong on purpose), length 1, type 5, then what would look like a TCP header to 443.
        let mh: [UInt8] = [6, 1, 5, 0, 0, 0, 0, 0] + [0x30, 0x39, 0x01, 0xbb] + [UInt8](repeating: 0, count: 4)
        let packet = PacketFactory.ipv6(nextHeader: 135, payload: mh)
        let flow = try #require(packet.withUnsafeBytes { raw in
            Flow.parse(UnsafeMutableRawPointer(mutating: raw.baseAddress!), count: packet.count)
        })
        #expect(flow.proto == 135)
        #expect(flow.sourcePort == 5, "the MH type, as xfrm_flowi_sport reads it")
        #expect(flow.destinationPort == 0)
        let tcp443 = Selector(family: 6, source: IPPrefix("::/0")!, destination: IPPrefix("::/0")!, proto: 6,
                              destinationPort: 443, destinationPortMask: 0xffff)
        #expect(!tcp443.covers(flow))
    }

    @Test("a seventh nested layer is refused before it is opened (XFRM_MAX_DEPTH): its SA's replay and lifetime untouched")
    func seventhLayerIsNotOpened() throws {
        let h = try TwoHosts()
        var bytes = h.packet()
        var sasAtB: [SecurityAssociation] = []
        for k in 0..<7 {
            let spi = UInt32(0x100 + k)
            let sealer = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: spi, on: h.a)
            bytes = h.buffers.with(bytes) { b -> DropReason? in
                var layout = ESPLayout()
                return sealer.transform!.encapsulate(&b, layout: &layout, innerHeaderChecked: true)
            }.1
            let sa = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: spi, on: h.b)
            try h.b.addState(sa)
            sasAtB.append(sa)
        }
        let before = h.b.statistics[.inBufferError]
        #expect(h.receive(bytes).0 == .dropped(.inBufferError))
        #expect(h.b.statistics[.inBufferError] == before + 1)
        #expect(sasAtB[6].current.packets == 1, "the outermost layer was opened")
        #expect(sasAtB[1].current.packets == 1, "the sixth layer was opened")
        #expect(sasAtB[0].current.packets == 0, "the seventh (innermost) layer was not")
    }

    @Test("an inbound SA's set-mark is the mark its traffic's IN policy is looked up with (xfrm_smark_get in xfrm_input)")
    func setMarkAppliesToTheInboundPolicyCheck() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.b.deletePolicy(key: Policy(selector: ab, direction: .inbound).key)
        try h.b.addPolicy(Policy(selector: ab, direction: .inbound, mark: Mark(value: 7, mask: 0xff), templates: [t]),
                          update: false)
        let (_, wire) = h.send(h.packet())
        #expect(h.receive(wire).0 == .dropped(.inNoPols), "mark 0: the marked policy does not match")
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.b).currentConfig
        c.outputMark = Mark(value: 0x107, mask: 0xff)
        try h.b.deleteState(c.id, mark: Mark())
        try h.b.addState(h.b.makeSA(c))
        for k in 0..<3 {
            let (_, wire) = h.send(h.packet())
            #expect(h.receive(wire).0 == .deliver, "packet \(k)")
        }
        // And in a batch (the run path leaves such an SA to the per-packet way).
        let pool = PacketPool(count: 4, slotSize: 2048, headroom: 256)
        var batch = PacketBatch(capacity: 4)
        for _ in 0..<4 {
            var buffer = pool.allocate()!
            let appended = buffer.append(contentsOf: h.send(h.packet()).1)
            #expect(appended)
            _ = batch.append(PacketBatch.Packet(buffer, stage: .input, ifindex: 2))
        }
        h.b.process(&batch)
        for i in 0..<batch.count {
            #expect(batch[i].verdict == .input(.deliver, decapsulated: true), "batch packet \(i)")
            pool.release(batch[i].buffer)
        }
    }
}
