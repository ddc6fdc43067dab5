import Testing
import XFRMPacket
import XFRMTestKit

/// A TCP header (20 bytes + 12 bytes of timestamp option) with flags, seq and a zero checksum.
private func tcpHeader(seq: UInt32, flags: UInt8) -> [UInt8] {
    var h: [UInt8] = [0x13, 0x89, 0xc3, 0x50]  // ports 5001 → 50000
    h += [UInt8(seq >> 24), UInt8(seq >> 16 & 0xff), UInt8(seq >> 8 & 0xff), UInt8(seq & 0xff)]
    h += [0, 0, 0x10, 0x01, 0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]  // ack, data offset 8 words, window, csum, urg
    h += [1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78]  // NOP NOP timestamps
    return h
}

/// Whether the TCP checksum of a whole IP packet verifies (pseudo-header included).
private func tcpChecksumOK(_ p: [UInt8]) -> Bool {
    let v4 = p[0] >> 4 == 4
    let ip = v4 ? Int(p[0] & 0x0f) * 4 : 40
    let tcpLength = p.count - ip
    var pseudo = v4 ? Array(p[12..<20]) : Array(p[8..<40])
    pseudo += v4 ? [0, 6, UInt8(tcpLength >> 8), UInt8(tcpLength & 0xff)]
        : [0, 0, UInt8(tcpLength >> 8), UInt8(tcpLength & 0xff), 0, 0, 0, 6]
    return InternetChecksum.compute(pseudo + Array(p[ip...])) == 0
}

@Suite("TCP segmentation and coalescing for the TUN offloads")
struct TCPOffloadTests {
    static let payload = PacketFactory.pattern(10_000, seed: 5)

    static func superpacket(v6: Bool, flags: UInt8 = 0x18) -> [UInt8] {
        let tcp = tcpHeader(seq: 1_000_000, flags: flags) + Self.payload
        return v6 ? PacketFactory.ipv6(nextHeader: 6, payload: tcp) : PacketFactory.ipv4(proto: 6, payload: tcp)
    }

    static func cut(_ packet: [UInt8], mss: Int) throws -> [[UInt8]] {
        var h = VirtioNetHeader()
        h.gsoType = packet[0] >> 4 == 4 ? VirtioNetHeader.gsoTCPv4 : VirtioNetHeader.gsoTCPv6
        h.gsoSize = UInt16(mss)
        h.flags = VirtioNetHeader.needsChecksum
        var out: [[UInt8]] = []
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 65_536, alignment: 16)
        defer { scratch.deallocate() }
        let p = UnsafeMutableRawPointer.allocate(byteCount: packet.count, alignment: 16)
        defer { p.deallocate() }
        p.copyMemory(from: packet, byteCount: packet.count)
        let collect = { (b: UnsafeRawPointer, n: Int) in out.append(Array(UnsafeRawBufferPointer(start: b, count: n))) }
        // In two calls, the first of at most 4 segments, as a TUN reader resumes a superpacket that overflowed its batch.
        var offset = try TCPOffload.segment(p, count: packet.count, header: h, limit: 4, scratch: scratch,
                                            scratchSize: 65_536, collect)
        #expect(out.count == 4)
        offset = try TCPOffload.segment(p, count: packet.count, header: h, from: offset, scratch: scratch,
                                        scratchSize: 65_536, collect)
        #expect(offset == Self.payload.count)
        return out
    }

    @Test("a superpacket is cut into MSS-sized segments with their own lengths, IDs, sequence numbers, flags and valid checksums",
          arguments: [false, true])
    func segmentation(v6: Bool) throws {
        let segments = try Self.cut(Self.superpacket(v6: v6), mss: 1_360)
        #expect(segments.count == 8)  // 7 × 1,360 + 480
        let ip = v6 ? 40 : 20
        var reassembled: [UInt8] = []
        for (i, s) in segments.enumerated() {
            let payload = Array(s[(ip + 32)...])
            #expect(payload.count == (i < 7 ? 1_360 : 480))
            reassembled += payload
            let seq = UInt32(s[ip + 4]) << 24 | UInt32(s[ip + 5]) << 16 | UInt32(s[ip + 6]) << 8 | UInt32(s[ip + 7])
            #expect(seq == 1_000_000 + UInt32(i * 1_360))
            #expect(s[ip + 13] == (i == 7 ? 0x18 : 0x10), "PSH only on the last segment")
            #expect(tcpChecksumOK(s))
            if v6 {
                #expect(Int(s[4]) << 8 | Int(s[5]) == s.count - 40)
            } else {
                #expect(Int(s[2]) << 8 | Int(s[3]) == s.count)
                #expect(Int(s[4]) << 8 | Int(s[5]) == 0x1234 + i)
                #expect(InternetChecksum.compute(Array(s[0..<20])) == 0)
            }
        }
        #expect(reassembled == Self.payload)
    }

    @Test("an IPv6 superpacket behind hop-by-hop and destination options headers is cut too, each segment with them (ipv6_gso_segment); a routing header is refused")
    func segmentationBehindExtensionHeaders() throws {
        let tcp = tcpHeader(seq: 7, flags: 0x18) + Self.payload
        // Hop-by-hop (8 bytes: PadN) then destination options (8 bytes: PadN), then TCP.
        let hbh: [UInt8] = [60, 0, 1, 4, 0, 0, 0, 0]
        let dst: [UInt8] = [6, 0, 1, 4, 0, 0, 0, 0]
        let packet = PacketFactory.ipv6(nextHeader: 6, extensionHeaders: hbh + dst, firstNextHeader: 0, payload: tcp)
        let segments = try Self.cut(packet, mss: 1_360)
        #expect(segments.count == 8)
        var reassembled: [UInt8] = []
        for s in segments {
            #expect(Array(s[40..<56]) == hbh + dst, "each segment carries the extension headers")
            #expect(Int(s[4]) << 8 | Int(s[5]) == s.count - 40)
            // The TCP checksum over the segment's TCP part, with the pseudo-header of its addresses.
            let tcpPart = Array(s[56...])
            let pseudo = Array(s[8..<40]) + [0, 0, UInt8(tcpPart.count >> 8), UInt8(tcpPart.count & 0xff), 0, 0, 0, 6]
            #expect(InternetChecksum.compute(pseudo + tcpPart) == 0)
            reassembled += Array(s[(56 + 32)...])
        }
        #expect(reassembled == Self.payload)
        let routing: [UInt8] = [6, 0, 0, 0, 0, 0, 0, 0]
        let routed = PacketFactory.ipv6(nextHeader: 6, extensionHeaders: routing, firstNextHeader: 43, payload: tcp)
        #expect(throws: TCPOffload.Failure.unsupported) { _ = try Self.cut(routed, mss: 1_360) }
    }

    @Test("segments of one flow coalesce back into the superpacket; a gap, another flow or a short middle segment ends the run",
          arguments: [false, true])
    func coalescing(v6: Bool) throws {
        let original = Self.superpacket(v6: v6)
        let segments = try Self.cut(original, mss: 1_360)
        let ip = v6 ? 40 : 20
        func continues(_ run: [[UInt8]], _ next: [UInt8]) -> Bool {
            let sizes = run.map { $0.count - ip - 32 }
            return run[0].withUnsafeBytes { f in
                next.withUnsafeBytes { n in
                    TCPOffload.continues(first: f.baseAddress!, firstCount: f.count, next: n.baseAddress!,
                                         nextCount: n.count, runPayload: sizes.reduce(0, +), segmentSize: sizes[0],
                                         lastPayload: sizes.last!)
                }
            }
        }
        for i in 1..<segments.count { #expect(continues(Array(segments[0..<i]), segments[i])) }
        #expect(!continues([segments[0]], segments[2]), "a sequence gap")
        #expect(!continues([segments[7]], segments[0]), "after the short last segment")
        var other = segments[1]
        other[ip + 1] ^= 1  // another source port
        #expect(!continues([segments[0]], other))
        var rst = segments[1]
        rst[ip + 13] = 0x14
        #expect(!continues([segments[0]], rst), "only ACK (and PSH at the end) coalesce")
        // The head of the run becomes the superpacket again: its lengths, PSH from the last segment, and the
        // pseudo-header sum the kernel expects with VIRTIO_NET_HDR_F_NEEDS_CSUM.
        let headBuffer = UnsafeMutableRawPointer.allocate(byteCount: segments[0].count, alignment: 16)
        defer { headBuffer.deallocate() }
        headBuffer.copyMemory(from: segments[0], byteCount: segments[0].count)
        let h = TCPOffload.finishRun(first: headBuffer, firstCount: segments[0].count,
                                     totalPayload: Self.payload.count, segmentSize: 1_360,
                                     lastFlags: segments[7][ip + 13])
        let head = Array(UnsafeRawBufferPointer(start: headBuffer, count: segments[0].count))
        #expect(h.gsoType == (v6 ? VirtioNetHeader.gsoTCPv6 : VirtioNetHeader.gsoTCPv4) && h.gsoSize == 1_360)
        #expect(Int(h.headerLength) == ip + 32 && Int(h.checksumStart) == ip && h.checksumOffset == 16)
        let whole = Array(head[0..<(ip + 32)]) + Self.payload
        // Completing the partial checksum as a NIC would gives the original packet, byte for byte.
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: whole.count, alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyMemory(from: whole, byteCount: whole.count)
        try TCPOffload.completeChecksum(buffer, count: whole.count, start: ip, offset: 16)
        let completed = Array(UnsafeRawBufferPointer(start: buffer, count: whole.count))
        #expect(tcpChecksumOK(completed))
        // The original superpacket had no checksum yet (0): apart from it, the bytes are the original's.
        #expect(Array(completed[0..<(ip + 16)]) == Array(original[0..<(ip + 16)]))
        #expect(Array(completed[(ip + 18)...]) == Array(original[(ip + 18)...]))
    }

    @Test("segments are merged only when their checksums verify; a completed UDP checksum is never 0",
          arguments: [false, true])
    func checksums(v6: Bool) throws {
        let segments = try Self.cut(Self.superpacket(v6: v6), mss: 1_360)
        let ip = v6 ? 40 : 20
        func valid(_ p: [UInt8]) -> Bool {
            p.withUnsafeBytes { TCPOffload.checksumsValid($0.baseAddress!, count: $0.count) }
        }
        #expect(segments.allSatisfy(valid))
        var corrupted = segments[3]
        corrupted[ip + 32 + 100] ^= 0x40  // one payload bit
        #expect(!valid(corrupted))
        if !v6 {
            var badHeader = segments[3]
            badHeader[8] &-= 1  // TTL without its header checksum
            #expect(!valid(badHeader))
        }
        // A UDP datagram whose checksum comes out as 0 gets 0xffff (0 means "no checksum").
        var udp = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                     payload: PacketFactory.udp(payload: [0, 0]))
        // The pseudo-header sum the kernel leaves, then payload bytes that make the whole sum 0xffff (checksum 0).
        let pseudo = InternetChecksum.partial(udp.withUnsafeBytes { $0.baseAddress! + 12 }, count: 8) + 17 + 10
        var folded = pseudo
        while folded > 0xffff { folded = (folded & 0xffff) + (folded >> 16) }
        udp[26] = UInt8(folded >> 8)
        udp[27] = UInt8(folded & 0xff)
        let rest = InternetChecksum.partial(udp.withUnsafeBytes { $0.baseAddress! + 20 }, count: 10)
        var r = rest
        while r > 0xffff { r = (r & 0xffff) + (r >> 16) }
        let filler = UInt16(0xffff) - UInt16(r)
        udp[28] = UInt8(filler >> 8)
        udp[29] = UInt8(filler & 0xff)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: udp.count, alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyMemory(from: udp, byteCount: udp.count)
        try TCPOffload.completeChecksum(buffer, count: udp.count, start: 20, offset: 6)
        #expect(buffer.load(fromByteOffset: 26, as: UInt16.self) == 0xffff)
    }

    @Test("a virtio header survives a store and a load; a truncated superpacket or a non-TCP one is refused")
    func headerAndRefusals() {
        var h = VirtioNetHeader()
        h.flags = 1
        h.gsoType = 4
        h.headerLength = 72
        h.gsoSize = 1_340
        h.checksumStart = 40
        h.checksumOffset = 16
        var bytes = [UInt8](repeating: 0, count: 10)
        bytes.withUnsafeMutableBytes { h.store(to: $0.baseAddress!) }
        #expect(bytes == [1, 4, 72, 0, 0x3c, 5, 40, 0, 16, 0])
        #expect(bytes.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress!) } == h)
        let udp = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(payload: [1, 2, 3]))
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 65_536, alignment: 16)
        defer { scratch.deallocate() }
        var g = VirtioNetHeader()
        g.gsoType = VirtioNetHeader.gsoTCPv4
        g.gsoSize = 1_000
        func cut(_ packet: [UInt8]) -> TCPOffload.Failure? {
            let p = UnsafeMutableRawPointer.allocate(byteCount: packet.count, alignment: 16)
            defer { p.deallocate() }
            p.copyMemory(from: packet, byteCount: packet.count)
            do {
                _ = try TCPOffload.segment(p, count: packet.count, header: g, scratch: scratch, scratchSize: 65_536) { _, _ in }
                return nil
            } catch {
                return error
            }
        }
        #expect(cut(udp) == .unsupported)
        #expect(cut(PacketFactory.ipv4(proto: 6, payload: tcpHeader(seq: 1, flags: 0x10))) == .malformed)
    }
}
