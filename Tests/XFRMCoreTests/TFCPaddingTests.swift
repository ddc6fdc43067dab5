import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Traffic flow confidentiality padding (RFC 4303 §2.4; the SA's `tfcpad`, XFRMA_TFCPAD): a tunnel SA pads each
/// inner packet with zeros up to its `tfcpad` inside the encryption, capped at the largest inner packet the path
/// takes after ESP (≈ esp_output: min(x->tfcpad, xfrm_state_mtu(x, child_mtu_cached))); the receiver drops the
/// padding by the inner header's length.
@Suite("TFC padding: a tunnel SA's tfcpad hides inner lengths within the path's MTU")
struct TFCPaddingTests {
    /// The ESP packet (outer IPv4, AES-GCM-128: 8-byte IV, 16-byte ICV, 4-byte alignment) carrying `plaintext` bytes
    /// (inner packet and TFC padding) with the least ESP padding.
    static func espLength(plaintext: Int, natt: Bool = false) -> Int {
        20 + (natt ? 8 : 0) + 8 + 8 + (plaintext + 2 + 3) / 4 * 4 + 16
    }

    @Test("packets shorter than tfcpad leave as long as a tfcpad-byte packet would; longer ones unpadded; B delivers each byte for byte")
    func padsShortPackets() throws {
        let h = try TwoHosts()
        try h.tunnel(tfcPad: 600)
        for size in [0, 1, 100, 571, 572, 573, 1000] {
            let inner = h.packet(size: size)
            let (r, wire) = h.send(inner)
            #expect(r == .transmit(ifindex: 2), "size \(size)")
            #expect(wire.count == Self.espLength(plaintext: max(inner.count, 600)), "inner \(inner.count) bytes")
            let (r2, back) = h.receive(wire)
            #expect(r2 == .deliver)
            #expect(back == inner, "inner \(inner.count) bytes: the padding is gone")
        }
        // The sender's curlft counts the inner packets only (taken before esp_output); the receiver's counts the
        // padding too (skb->len after esp_input_done2, before the inner header's length trims it).
        let sizes = [0, 1, 100, 571, 572, 573, 1000].map { 28 + $0 }
        let id = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)
        #expect(h.a.states.lookup(id)!.current.bytes == UInt64(sizes.reduce(0, +)))
        #expect(h.b.states.lookup(id)!.current.bytes == UInt64(sizes.reduce(0) { $0 + max($1, 600) }))
    }

    @Test("a tfcpad past the path: every packet padded to the largest inner packet the MTU takes, so each ESP packet is exactly the MTU")
    func capsAtTheMTU() throws {
        for (mtu, natt) in [(1500, false), (1400, false), (1281, false), (1500, true), (1283, true)] {
            let h = try TwoHosts()
            try h.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = mtu }
            try h.tunnel(natt: natt, tfcPad: 65_535)
            // xfrm_state_mtu: (MTU − outer header, UDP, ESP header and IV − ICV) rounded down to the alignment,
            // less 2.
            let limit = (mtu - 36 - (natt ? 8 : 0) - 16) / 4 * 4 - 2
            for size in [0, 300, limit - 28] {
                let inner = h.packet(size: size)
                let (r, wire) = h.send(inner)
                #expect(r == .transmit(ifindex: 2))
                #expect(wire.count == Self.espLength(plaintext: limit, natt: natt), "MTU \(mtu), inner \(inner.count)")
                #expect(wire.count <= mtu && wire.count > mtu - 4, "MTU \(mtu): \(wire.count) bytes")
                #expect(h.receive(wire).1 == inner)
            }
            // One byte more than the path takes still gets ICMP, as without padding.
            #expect(h.send(h.packet(size: limit - 27)).0 == .icmpError)
        }
    }

    @Test("a run of one flow through the batch path pads exactly as one packet at a time")
    func batchRunsPad() throws {
        let h = try TwoHosts()
        try h.tunnel(tfcPad: 900)
        let pool = PacketPool(count: 16, slotSize: 2048, headroom: 256)
        var batch = PacketBatch(capacity: 16)
        let inners = (0..<16).map { h.packet(size: 40 * $0) }
        for inner in inners {
            var buffer = pool.allocate()!
            let copied = buffer.append(contentsOf: inner)
            #expect(copied)
            batch.append(PacketBatch.Packet(buffer, stage: .output))
        }
        h.a.process(&batch)
        for i in 0..<batch.count {
            #expect(batch[i].verdict == .output(.transmit(ifindex: 2), transformed: true))
            #expect(batch[i].buffer.count == Self.espLength(plaintext: max(inners[i].count, 900)), "packet \(i)")
            batch[i] = PacketBatch.Packet(batch[i].buffer, stage: .input, ifindex: 2)
        }
        // B opens them as one input run: each delivered without its padding, curlft counting it.
        h.b.process(&batch)
        for i in 0..<batch.count {
            #expect(batch[i].verdict == .input(.deliver, decapsulated: true), "packet \(i)")
            #expect(batch[i].buffer.bytes == inners[i])
            pool.release(batch[i].buffer)
        }
        let id = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)
        #expect(h.b.states.lookup(id)!.current.bytes == UInt64(inners.reduce(0) { $0 + max($1.count, 900) }))
    }

    @Test("a bundle of two tunnels: only the outermost SA pads (an inner one padded to the route's MTU would leave no room for the outer ESP), and B opens both")
    func nestedBundle() throws {
        let h = try TwoHosts()
        let inner = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 5)
        let outer = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 6)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [inner, outer]), update: false)
        try h.b.addPolicy(Policy(selector: sel, direction: .inbound, templates: [inner, outer]), update: false)
        for s in [h.a, h.b] {
            try s.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x5005, reqid: 5, on: s, tfcPad: 65_535))
            try s.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x6006, reqid: 6, on: s, tfcPad: 400))
        }
        for size in [10, 500] {
            let pkt = h.packet(size: size)
            let (r, wire) = h.send(pkt)
            #expect(r == .transmit(ifindex: 2), "inner packet of \(pkt.count) bytes")
            #expect(Array(wire[20..<24]) == [0, 0, 0x60, 0x06], "the outer tunnel's ESP is outermost")
            // The inner tunnel's ESP packet, unpadded, then padded to 400 by the outer SA if shorter.
            #expect(wire.count == Self.espLength(plaintext: max(Self.espLength(plaintext: pkt.count), 400)))
            let (r2, back) = h.receive(wire)
            #expect(r2 == .deliver)
            #expect(back == pkt)
        }
    }

    @Test("padding never costs a packet its buffer: with a 9,000-byte MTU and 2 KB buffers it stops where the buffer ends")
    func paddingFitsTheBuffer() throws {
        let h = try TwoHosts()
        try h.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 9000 }
        try h.tunnel(tfcPad: 65_535)
        let pool = PacketPool(count: 4, slotSize: 2048, headroom: 128)
        var batch = PacketBatch(capacity: 4)
        let inner = h.packet(size: 100)
        var buffer = pool.allocate()!
        let copied = buffer.append(contentsOf: inner)
        #expect(copied)
        batch.append(PacketBatch.Packet(buffer, stage: .output))
        h.a.process(&batch)
        #expect(batch[0].verdict == .output(.transmit(ifindex: 2), transformed: true))
        let wire = batch[0].buffer.bytes
        #expect(wire.count > 2048 - 128 - 16 && wire.count <= 2048, "\(wire.count) bytes")
        #expect(h.receive(wire).1 == inner)
        pool.release(batch[0].buffer)
    }

    @Test("without tfcpad nothing is padded")
    func noPadByDefault() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet(size: 10)
        #expect(h.send(inner).1.count == Self.espLength(plaintext: inner.count))
    }
}
