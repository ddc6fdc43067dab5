import Testing
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Bad input never crashes and is always dropped with the right named reason.
@Suite("Malformed input")
struct MalformedInputTests {
    let buffers = TestBuffers()

    func pair(_ suite: String = "gcm128", mode: ESPMode = .tunnel) throws -> (ESPTransform, ESPTransform) {
        let c = ESPConfig(
            spi: 0x1000, mode: mode, crypto: Suites.crypto(suite), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"))
        return (try ESPTransform(c), try ESPTransform(c))
    }

    func wire(_ tx: ESPTransform, payload: Int = 40) -> [UInt8] {
        let inner = PacketFactory.ipv4(payload: PacketFactory.udp(payload: PacketFactory.pattern(payload)))
        return buffers.with(inner) { tx.encapsulate(&$0) }.1
    }

    @Test("every truncation of a valid packet is dropped, never delivered", arguments: ["gcm128", "cbc-sha256"])
    func truncations(_ suite: String) throws {
        let (tx, _) = try pair(suite)
        let w = wire(tx)
        for cut in 0..<w.count {
            let (_, rx) = try pair(suite)
            var bytes = Array(w[0..<cut])
            if bytes.count >= 20 {  // keep the IP length honest so the ESP layer sees the short packet
                bytes[2] = UInt8(bytes.count >> 8)
                bytes[3] = UInt8(bytes.count & 0xff)
                bytes[10] = 0
                bytes[11] = 0
                let c = InternetChecksum.compute(Array(bytes[0..<20]))
                bytes[10] = UInt8(c >> 8)
                bytes[11] = UInt8(c & 0xff)
            }
            let (r, _) = buffers.with(bytes) { rx.decapsulate(&$0) }
            guard case .dropped(let reason) = r else {
                Issue.record("cut at \(cut) was not dropped: \(r)")
                continue
            }
            let allowed: Set<DropReason> = [.truncated, .badIPHeader, .icvFailed, .badCipherLength]
            #expect(allowed.contains(reason), "cut at \(cut): \(reason)")
        }
    }

    @Test("an IP total length that claims more than the packet holds is truncated")
    func lyingLength() throws {
        let (tx, rx) = try pair()
        var w = wire(tx)
        w[2] = 0x05  // 1280+ bytes claimed
        let (r, _) = buffers.with(w) { rx.decapsulate(&$0) }
        #expect(r == .dropped(.truncated))
        var v6 = PacketFactory.ipv6(nextHeader: 50, payload: PacketFactory.pattern(40))
        v6[4] = 0x10
        #expect(buffers.with(v6) { rx.decapsulate(&$0) }.0 == .dropped(.truncated))
    }

    @Test("a corrupted IPv4 header checksum is a bad IP header")
    func badChecksum() throws {
        let (tx, rx) = try pair()
        var w = wire(tx)
        w[10] ^= 0xff
        #expect(buffers.with(w) { rx.decapsulate(&$0) }.0 == .dropped(.badIPHeader))
    }

    @Test("an unknown SPI is noState; trailing link padding is ignored")
    func spiAndPadding() throws {
        let (tx, rx) = try pair()
        var w = wire(tx)
        let good = w + [0, 0, 0, 0]  // Ethernet minimum-frame padding behind the IP packet
        #expect(buffers.with(good) { rx.decapsulate(&$0) }.0 == .delivered)
        w[22] ^= 0x01
        #expect(buffers.with(w) { rx.decapsulate(&$0) }.0 == .dropped(.noState))
    }

    @Test("CBC ciphertext that is not a whole number of blocks is badCipherLength")
    func cbcLength() throws {
        let (tx, rx) = try pair("cbc-sha256")
        var w = wire(tx)
        w.insert(0xaa, at: 20 + 8 + 16 + 3)
        w[3] = w[3] &+ 1
        w[10] = 0
        w[11] = 0
        let c = InternetChecksum.compute(Array(w[0..<20]))
        w[10] = UInt8(c >> 8)
        w[11] = UInt8(c & 0xff)
        #expect(buffers.with(w) { rx.decapsulate(&$0) }.0 == .dropped(.badCipherLength))
    }

    @Test("padding bytes other than 1, 2, 3, ... are badPadding and do not move the window")
    func badPadding() throws {
        let (tx, rx) = try pair()
        let inner = PacketFactory.ipv4(payload: [1, 2, 3, 4, 5, 6])  // 26 bytes
        let pkt = tx.handSealed(seq: 5, plaintext: inner + [1, 9, 2, 4])  // pad 1, 9 (wrong), pad length 2, nh 4
        #expect(buffers.with(pkt) { rx.decapsulate(&$0) }.0 == .dropped(.badPadding))
        #expect(rx.replay.top == 0)
        let good = tx.handSealed(seq: 5, plaintext: inner + [1, 2, 2, 4])
        #expect(buffers.with(good) { rx.decapsulate(&$0) }.0 == .delivered)
    }

    @Test("a pad length beyond the payload is badPadding")
    func padTooLong() throws {
        let (tx, rx) = try pair()
        let pkt = tx.handSealed(seq: 1, plaintext: [1, 2, 200, 4])
        #expect(buffers.with(pkt) { rx.decapsulate(&$0) }.0 == .dropped(.badPadding))
    }

    @Test("tunnel mode with a next header other than IPv4/IPv6 is badNextHeader; a bogus inner packet is badInnerPacket")
    func nextHeader() throws {
        let (tx, rx) = try pair()
        let pkt = tx.handSealed(seq: 1, plaintext: [1, 2, 3, 4, 5, 6, 0, 17])
        #expect(buffers.with(pkt) { rx.decapsulate(&$0) }.0 == .dropped(.badNextHeader))
        let junk = tx.handSealed(seq: 2, plaintext: [0x45, 2, 3, 4, 5, 6, 0, 4])
        #expect(buffers.with(junk) { rx.decapsulate(&$0) }.0 == .dropped(.badInnerPacket))
        let v6 = tx.handSealed(seq: 3, plaintext: [0x45, 2, 3, 4, 5, 6, 0, 41])
        #expect(buffers.with(v6) { rx.decapsulate(&$0) }.0 == .dropped(.badInnerPacket))
    }

    @Test("an ESP payload of no bytes (pad length and next header fill the encrypted part) is badPadding and does not move the window, as esp_remove_trailer; one byte is delivered")
    func zeroLengthPayload() throws {
        let (tx, rx) = try pair(mode: .transport)
        let empty = PacketFactory.ipv4(proto: 6, payload: [])
        let (r, w) = buffers.with(empty) { tx.encapsulate(&$0) }
        #expect(r == nil)
        #expect(buffers.with(w) { rx.decapsulate(&$0) }.0 == .dropped(.badPadding))
        #expect(rx.replay.top == 0)
        let one = PacketFactory.ipv4(proto: 6, payload: [7])
        let (r2, w2) = buffers.with(one) { tx.encapsulate(&$0) }
        #expect(r2 == nil)
        let (r3, back) = buffers.with(w2) { rx.decapsulate(&$0) }
        #expect(r3 == .delivered)
        #expect(back == one)
    }

    @Test("fragmented ESP is dropped as fragmented (no reassembly inside the transform)")
    func fragments() throws {
        let (tx, rx) = try pair()
        var w = wire(tx)
        w[6] |= 0x20  // MF
        w[10] = 0
        w[11] = 0
        let c = InternetChecksum.compute(Array(w[0..<20]))
        w[10] = UInt8(c >> 8)
        w[11] = UInt8(c & 0xff)
        #expect(buffers.with(w) { rx.decapsulate(&$0) }.0 == .dropped(.fragmented))
    }

    @Test("random bytes never crash and never get delivered", arguments: ["gcm128", "cbc-sha256", "null-sha256"])
    func randomBytes(_ suite: String) throws {
        let (_, rx) = try pair(suite)
        var rng = XorShift(state: 0x1234_5678_9abc_def1)
        var delivered = 0
        for i in 0..<5000 {
            let n = Int(rng.next() % 300)
            var bytes = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            // Half of them get a plausible IPv4/ESP header so they reach the transform.
            if i % 2 == 0 && n >= 28 {
                let ip = PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 50,
                                            payload: [0, 0, 0x10, 0] + Array(bytes[24...]))
                bytes = ip
            }
            if case .delivered = buffers.with(bytes, { rx.decapsulate(&$0) }).0 { delivered += 1 }
        }
        #expect(delivered == 0)
        #expect(rx.statistics.packets == 0)
    }

    @Test("bad output packets are refused with a reason", arguments: [[], [0x45], [0x60, 0, 0], [0x10, 0, 0, 0]])
    func badOutput(_ bytes: [UInt8]) throws {
        let (tx, _) = try pair()
        #expect(buffers.with(bytes) { tx.encapsulate(&$0) }.0 == .badOutputPacket)
    }
}
