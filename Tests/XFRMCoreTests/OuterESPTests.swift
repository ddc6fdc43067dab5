import Testing
import XFRMESP
import XFRMPacket
import XFRMTestKit
@testable import XFRMCore

/// An input run reads the usual received packet (raw ESP in a plain IPv4 header) with `usualOuterESP` instead of
/// `ESPClassification.classify`: for every packet it accepts it must find exactly what `classify` finds, or a run
/// would open a packet the per-packet path drops, or open it at another offset.
@Suite("A run's outer ESP shortcut agrees with the full classification")
struct OuterESPTests {
    static let spi: UInt32 = 0x1001
    static let destination: UInt32 = 0xc000_0202  // 192.0.2.2

    /// Raw ESP, or ESP in UDP from and to `nattPort` when given.
    static func esp(spi: UInt32, sequence: UInt32, body: Int, nattPort: UInt16? = nil) -> [UInt8] {
        var esp: [UInt8] = []
        for v in [spi, sequence] { esp += [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
        esp += PacketFactory.pattern(body)
        guard let port = nattPort else {
            return PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 50, payload: esp)
        }
        return PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 17,
                                  payload: PacketFactory.udp(sourcePort: port, destinationPort: port, payload: esp))
    }

    /// (shortcut's info, classify's answer, the packet's length after classify).
    static func both(_ bytes: [UInt8], spi: UInt32 = spi, destination: UInt32? = destination)
        -> (ESPPacketInfo?, ESPClassification, Int)
    {
        let storage = UnsafeMutableRawPointer.allocate(byteCount: 2048, alignment: 64)
        defer { storage.deallocate() }
        var packet = PacketBuffer(storage: storage, capacity: 2048, headroom: 256)
        precondition(packet.append(contentsOf: bytes))
        let usual = XFRMStack.usualOuterESP(packet, spi: spi, destination: destination, nattPort: 4500)
        let full = ESPClassification.classify(&packet, nattPort: 4500)
        return (usual, full, packet.count)
    }

    static func expectSame(_ u: ESPPacketInfo, _ full: ESPClassification, count: Int, original: Int) {
        guard case .esp(let f) = full else {
            Issue.record("the shortcut took a packet classify answers \(full) for")
            return
        }
        #expect(count == original, "classify trimmed a packet the shortcut took whole")
        #expect(u.ipVersion == f.ipVersion && u.source == f.source && u.destination == f.destination)
        #expect(u.transportOffset == f.transportOffset && u.espOffset == f.espOffset)
        #expect(u.nextHeaderFieldOffset == f.nextHeaderFieldOffset && u.udpEncapsulated == f.udpEncapsulated)
        #expect(u.spi == f.spi && u.sequence == f.sequence)
    }

    @Test("the usual packet, raw or in UDP 4500, is taken with classify's offsets, addresses, SPI and sequence",
          arguments: [nil, 4500] as [UInt16?])
    func usualPacketIsTaken(nattPort: UInt16?) {
        let p = Self.esp(spi: Self.spi, sequence: 7, body: 48, nattPort: nattPort)
        let (u, full, count) = Self.both(p)
        guard let u else {
            Issue.record("the shortcut refused the usual packet")
            return
        }
        Self.expectSame(u, full, count: count, original: p.count)
        #expect(u.udpEncapsulated == (nattPort != nil))
        // Another SPI, another destination, or an IPv6 SA (no v4 destination) is left to classify.
        #expect(Self.both(p, spi: Self.spi + 1).0 == nil)
        #expect(Self.both(p, destination: Self.destination + 1).0 == nil)
        #expect(Self.both(p, destination: nil).0 == nil)
    }

    @Test("UDP to another port, IKE's non-ESP marker, a keepalive, a short UDP length or one past the packet are left to classify")
    func unusualUDPIsLeftToClassify() {
        func withChecksum(_ q: [UInt8]) -> [UInt8] {
            var q = q
            q.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: 20) }
            return q
        }
        let p = Self.esp(spi: Self.spi, sequence: 7, body: 48, nattPort: 4500)
        #expect(Self.both(Self.esp(spi: Self.spi, sequence: 7, body: 48, nattPort: 4501)).0 == nil)
        let ike = Self.esp(spi: 0, sequence: 7, body: 48, nattPort: 4500)
        #expect(Self.both(ike, spi: 0).0 == nil)
        let keepalive = PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 17,
                                           payload: PacketFactory.udp(sourcePort: 4500, destinationPort: 4500, payload: [0xff]))
        #expect(Self.both(keepalive).0 == nil)
        var shortUDP = p
        shortUDP[25] -= 4  // the UDP length ends before the packet: classify trims the rest
        var longUDP = p
        longUDP[25] += 4
        for q in [shortUDP, longUDP] { #expect(Self.both(withChecksum(q)).0 == nil) }
    }

    @Test("fragments, options, bad checksums, trailing or missing bytes, UDP and short packets are left to classify")
    func unusualPacketsAreLeftToClassify() {
        let p = Self.esp(spi: Self.spi, sequence: 7, body: 48)
        func withChecksum(_ q: [UInt8]) -> [UInt8] {
            var q = q
            q.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: 20) }
            return q
        }
        var mf = p
        mf[6] |= 0x20
        var offset = p
        offset[7] = 1
        var udp = p
        udp[9] = 17
        var badSum = p
        badSum[10] ^= 1
        var trailing = p
        trailing.append(0)
        var truncatedTotal = p
        truncatedTotal.removeLast()
        let short = withChecksum([0x45, 0, 0, 27] + Array(p[4..<27]))
        for q in [withChecksum(mf), withChecksum(offset), withChecksum(udp), badSum, trailing, truncatedTotal, short] {
            #expect(Self.both(q).0 == nil)
        }
    }

    @Test("20,000 mutated packets: whatever the shortcut takes, classify finds the same ESP packet in it")
    func mutatedPacketsAgree() {
        var rng = SplitMix(state: 0x0e5b_2026_1201)
        var taken = 0
        for _ in 0..<20_000 {
            var p = Self.esp(spi: Bool.random(using: &rng) ? Self.spi : 0x2002, sequence: UInt32.random(in: 0...9, using: &rng),
                             body: Int.random(in: 0...40, using: &rng), nattPort: Bool.random(using: &rng) ? 4500 : nil)
            // Sometimes the UDP length or ports too.
            if p.count > 28 && Int.random(in: 0..<4, using: &rng) == 0 {
                p[Int.random(in: 20..<28, using: &rng)] = [UInt8.random(in: 0...255, using: &rng), 0x11, 0x94, 0][Int.random(in: 0..<4, using: &rng)]
            }
            for _ in 0..<Int.random(in: 0...3, using: &rng) {
                let at = Int.random(in: 0..<min(p.count, 28), using: &rng)
                p[at] = [UInt8.random(in: 0...255, using: &rng), p[at] ^ 1, 0x45, 50, 17, 0][Int.random(in: 0..<6, using: &rng)]
            }
            if Int.random(in: 0..<8, using: &rng) == 0 { p.removeLast(Int.random(in: 0...p.count, using: &rng)) }
            if Int.random(in: 0..<8, using: &rng) == 0 { p += [0, 0] }
            if p.count >= 20 && Bool.random(using: &rng) {
                p.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: 20) }
            }
            let (u, full, count) = Self.both(p)
            guard let u else { continue }
            taken += 1
            Self.expectSame(u, full, count: count, original: p.count)
        }
        #expect(taken > 1_000, "too few packets taken to mean anything: \(taken)")
    }
}
