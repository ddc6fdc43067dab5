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
    static func espLength(plaintext: Int) -> Int { 20 + 8 + 8 + (plaintext + 2 + 3) / 4 * 4 + 16 }

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
        for mtu in [1500, 1400, 1281] {
            let h = try TwoHosts()
            try h.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = mtu }
            try h.tunnel(tfcPad: 65_535)
            // xfrm_state_mtu: (MTU − outer header, ESP header and IV − ICV) rounded down to the alignment, less 2.
            let limit = (mtu - 36 - 16) / 4 * 4 - 2
            for size in [0, 300, limit - 28] {
                let inner = h.packet(size: size)
                let (r, wire) = h.send(inner)
                #expect(r == .transmit(ifindex: 2))
                #expect(wire.count == Self.espLength(plaintext: limit), "MTU \(mtu), inner \(inner.count)")
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

    @Test("without tfcpad nothing is padded")
    func noPadByDefault() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet(size: 10)
        #expect(h.send(inner).1.count == Self.espLength(plaintext: inner.count))
    }
}
