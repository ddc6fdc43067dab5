import Testing
import XFRMPacket
import XFRMTestKit

@Suite("Packets")
struct PacketTests {
    @Test("Internet checksum matches RFC 1071's worked example and validates a real IPv4 header")
    func checksum() {
        // RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2, so the checksum is ~ddf2 = 220d.
        #expect(InternetChecksum.compute([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]) == 0x220d)
        // RFC 3602 case 5's outer header, checksum f9a5 included, sums to zero.
        let hdr = PacketFactory.hex("4500007c08f200004032f9a5c0a87b03c0a87b64")
        #expect(InternetChecksum.compute(hdr) == 0)
        #expect(InternetChecksum.compute([0xab]) == ~UInt16(0xab00))
    }

    @Test("the checksum of every length 0-600, random bytes, all-ones and all-zero, with carried-in sums, is RFC 1071's")
    func checksumAgainstReference() {
        /// RFC 1071's definition, one big-endian 16-bit word at a time, the odd byte padded with zero.
        func reference(_ bytes: [UInt8], initial: UInt64) -> UInt16 {
            var sum = initial
            var i = 0
            while i < bytes.count {
                sum &+= UInt64(bytes[i]) << 8 | UInt64(i + 1 < bytes.count ? bytes[i + 1] : 0)
                i += 2
            }
            while sum >> 16 != 0 { sum = (sum & 0xffff) &+ (sum >> 16) }
            return ~UInt16(sum)
        }
        var state: UInt64 = 0x1071
        func next() -> UInt64 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return state >> 11
        }
        for length in 0...600 {
            let random = (0..<length).map { _ in UInt8(truncatingIfNeeded: next()) }
            for bytes in [random, [UInt8](repeating: 0xff, count: length), [UInt8](repeating: 0, count: length)] {
                for initial in [UInt64(0), 0xffff, next() & 0xffff_ffff] {
                    let got = bytes.withUnsafeBytes {
                        InternetChecksum.finish(InternetChecksum.partial($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!,
                                                                         count: length, initial: initial))
                    }
                    let want = reference(bytes, initial: initial)
                    // 0x0000 and 0xffff are the same ones'-complement value.
                    #expect(got == want || (got | want == 0xffff && got & want == 0),
                            "length \(length), initial \(initial), first bytes \(bytes.prefix(8))")
                }
            }
        }
    }

    @Test("the bulk sum (C, AVX2 where the CPU has it) is the inline one at every start alignment, to 70,000 bytes")
    func bulkChecksumAgreesWithInline() {
        var state: UInt64 = 0x2460
        func next() -> UInt64 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return state >> 11
        }
        let size = 70_100
        let random = (0..<size).map { _ in UInt8(truncatingIfNeeded: next()) }
        // All ones: every lane at its largest; all zeros: the one sum that folds to 0.
        for fill in [random, [UInt8](repeating: 0xff, count: size), [UInt8](repeating: 0, count: size)] {
            fill.withUnsafeBytes { raw in
                let base = raw.baseAddress!
                var lengths = Array(InternetChecksum.bulkThreshold..<InternetChecksum.bulkThreshold + 200)
                lengths += [1_000, 1_420, 1_500, 4_096, 9_000, 65_535, 65_536, 70_000]
                lengths += (0..<40).map { _ in Int(next() % 70_000) }
                for length in lengths {
                    for start in 0..<8 {
                        let bulk = InternetChecksum.partial(base + start, count: length)
                        let inline = InternetChecksum.inlinePartial(base + start, count: length)
                        // Equal, not only the same ones'-complement value: both fold to 0 only for all-zero bytes.
                        #expect(InternetChecksum.finish(bulk) == InternetChecksum.finish(inline),
                                "length \(length) from byte \(start)")
                    }
                }
            }
        }
    }

    @Test("a written header's checksum (summed from the field values) is the byte-wise checksum of what was stored")
    func writtenHeaderChecksum() {
        var rng = SystemRandomNumberGenerator()
        var hdr = [UInt8](repeating: 0xee, count: 20)
        for _ in 0..<5000 {
            let (tos, ttl, proto) = (UInt8.random(in: 0...255, using: &rng), UInt8.random(in: 0...255, using: &rng),
                                     UInt8.random(in: 0...255, using: &rng))
            let total = Int.random(in: 20...65535, using: &rng)
            let (id, flags) = (UInt16.random(in: 0...0xffff, using: &rng), UInt16.random(in: 0...0xffff, using: &rng))
            let (src, dst) = (UInt32.random(in: 0...0xffff_ffff, using: &rng), UInt32.random(in: 0...0xffff_ffff, using: &rng))
            hdr.withUnsafeMutableBytes { b in
                IPv4Header.write(b.baseAddress!, tos: tos, totalLength: total, identification: id, flags: flags,
                                 ttl: ttl, proto: proto, source: src, destination: dst)
            }
            #expect(InternetChecksum.compute(hdr) == 0, "header \(hdr)")
            var copy = hdr
            copy[10] = 0
            copy[11] = 0
            let c = InternetChecksum.compute(copy)
            #expect(hdr[10] == UInt8(c >> 8) && hdr[11] == UInt8(c & 0xff))
        }
    }

    @Test("the checksum check of a 20-byte header (five words, no loop) agrees with the byte-wise sum, options too")
    func headerChecksumCheck() {
        var rng = SystemRandomNumberGenerator()
        for length in [20, 24, 60] {
            for _ in 0..<3000 {
                var hdr = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
                if Bool.random(using: &rng) {  // half of them with a correct checksum
                    hdr[10] = 0
                    hdr[11] = 0
                    let c = InternetChecksum.compute(hdr)
                    (hdr[10], hdr[11]) = (UInt8(c >> 8), UInt8(c & 0xff))
                }
                let valid = hdr.withUnsafeMutableBytes { IPv4Header.checksumIsValid($0.baseAddress!, headerLength: length) }
                #expect(valid == (InternetChecksum.compute(hdr) == 0), "header \(hdr)")
            }
        }
    }

    @Test("a TTL decrement's incremental checksum verifies like a full recompute, for every TTL and many headers")
    func ttlDecrementChecksum() {
        var rng = SystemRandomNumberGenerator()
        for ttl in 2...255 {
            for _ in 0..<40 {
                var hdr = (0..<20).map { _ in UInt8.random(in: 0...255, using: &rng) }
                hdr[0] = 0x45
                hdr[8] = UInt8(ttl)
                hdr[10] = 0
                hdr[11] = 0
                hdr.withUnsafeMutableBytes { b in
                    IPv4Header.updateChecksum(b.baseAddress!, headerLength: 20)
                    IPv4Header.decrementTTL(b.baseAddress!)
                }
                #expect(hdr[8] == UInt8(ttl - 1))
                #expect(InternetChecksum.compute(hdr) == 0, "header \(hdr)")
            }
        }
    }

    @Test("addresses parse and print in canonical form", arguments: [
        ("192.0.2.1", "192.0.2.1"), ("2001:db8::1", "2001:db8::1"), ("2001:0db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ("::", "::"), ("::ffff:192.0.2.1", "::ffff:c000:201"), ("fe80::", "fe80::"), ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
    ])
    func addresses(_ text: String, _ canonical: String) {
        #expect(IPAddress(text)?.description == canonical)
    }

    @Test("malformed addresses are refused", arguments: ["", "1.2.3", "1.2.3.256", "01.2.3.4", "1::2::3", "12345::", ":::", "1:2:3:4:5:6:7:8:9"])
    func badAddresses(_ text: String) {
        #expect(IPAddress(text) == nil)
    }

    @Test("IPv6 extension headers are walked to the upper layer, and fragments are flagged")
    func ipv6Walk() {
        let frag: [UInt8] = [17, 0, 0, 1, 0, 0, 0, 1]  // next UDP, offset 0, M set
        var pkt = PacketFactory.ipv6(extensionHeaders: frag, firstNextHeader: 44, payload: PacketFactory.udp(payload: [1]))
        pkt.withUnsafeMutableBytes { p in
            let info = IPv6Header.parse(p.baseAddress!, available: p.count)!
            #expect(info.upperProtocol == 17)
            #expect(info.upperOffset == 48)
            #expect(info.nextHeaderFieldOffset == 40)
            #expect(info.isFragment)
        }
        pkt[45] = 0xff  // a header length running past the packet
        pkt[40] = 0
        pkt[6] = 0
        pkt.withUnsafeMutableBytes { p in #expect(IPv6Header.parse(p.baseAddress!, available: p.count) == nil) }
    }

    @Test("the pool hands out every slot once, then reports exhaustion instead of allocating")
    func pool() {
        let pool = PacketPool(count: 3, slotSize: 256, headroom: 64)
        let a = pool.allocate()!, b = pool.allocate()!, c = pool.allocate()!
        #expect(pool.allocate().map { _ in true } == nil)
        #expect(Set([a.slot, b.slot, c.slot]).count == 3)
        #expect(a.headroom == 64 && a.tailroom == 192)
        pool.release(b)
        #expect(pool.available == 1)
        let d = pool.allocate()!
        #expect(d.slot == b.slot)
        pool.release(a)
        pool.release(c)
        pool.release(d)
        #expect(pool.available == 3)
    }

    @Test("prepend and append move only the packet's edges")
    func pushPull() {
        let pool = PacketPool(count: 1, slotSize: 128, headroom: 32)
        var b = pool.allocate()!
        let appended = b.append(contentsOf: [1, 2, 3])
        #expect(appended)
        b.prepend(2).storeBE16(0xabcd, at: 0)
        #expect(b.bytes == [0xab, 0xcd, 1, 2, 3])
        b.trimFront(1)
        b.trimBack(1)
        #expect(b.bytes == [0xcd, 1, 2])
        let overflowed = b.append(contentsOf: [UInt8](repeating: 0, count: 200))
        #expect(!overflowed)
        #expect(b.count == 3)
        pool.release(b)
    }

    @Test("transport-mode ESP goes after destination options that no routing header precedes, before those after one (ip6_find_1stfragopt)")
    func ipv6TransportInsertionPoint() {
        func point(_ ext: [UInt8], first: UInt8) -> Int? {
            var packet = PacketFactory.ipv6(nextHeader: 6, extensionHeaders: ext, firstNextHeader: first,
                                            payload: [UInt8](repeating: 0, count: 20))
            return packet.withUnsafeMutableBytes { IPv6Header.transportInsertionPoint($0.baseAddress!, available: $0.count)?.offset }
        }
        let dstToTCP: [UInt8] = [6, 0, 1, 4, 0, 0, 0, 0]
        #expect(point(dstToTCP, first: 60) == 48, "IPv6|DestOpts|TCP → IPv6|DestOpts|ESP")
        let dstToRouting: [UInt8] = [43, 0, 1, 4, 0, 0, 0, 0]
        let routingToDst: [UInt8] = [60, 0, 0, 0, 0, 0, 0, 0]
        #expect(point(dstToRouting + routingToDst + dstToTCP, first: 60) == 56,
                "IPv6|DestOpts|Routing|DestOpts|TCP: ESP before the second destination options")
        #expect(point([], first: 6) == 40)
    }
}
