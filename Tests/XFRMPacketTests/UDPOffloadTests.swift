import Testing
import XFRMPacket
import XFRMTestKit

/// RFC 1071's sum, written here independently of InternetChecksum: 16-bit big-endian words, end-around carry.
private func onesComplementSum(_ bytes: [UInt8]) -> UInt16 {
    var sum: UInt32 = 0
    var i = 0
    while i + 1 < bytes.count {
        sum += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1])
        i += 2
    }
    if i < bytes.count { sum += UInt32(bytes[i]) << 8 }
    while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
    return UInt16(sum)
}

/// The UDP checksum a sender puts in a whole IP packet (RFC 768, RFC 8200 §8.1), computed from scratch.
private func udpChecksum(_ p: [UInt8]) -> UInt16 {
    let v4 = p[0] >> 4 == 4
    let ip = v4 ? Int(p[0] & 0x0f) * 4 : 40
    var udp = Array(p[ip...])
    udp[6] = 0
    udp[7] = 0
    let n = udp.count
    let pseudo = (v4 ? Array(p[12..<20]) : Array(p[8..<40]))
        + (v4 ? [0, 17, UInt8(n >> 8), UInt8(n & 0xff)] : [0, 0, UInt8(n >> 8), UInt8(n & 0xff), 0, 0, 0, 17])
    let c = ~onesComplementSum(pseudo + udp)
    return c == 0 ? 0xffff : c
}

private func be16(_ p: [UInt8], _ at: Int) -> Int { Int(p[at]) << 8 | Int(p[at + 1]) }

@Suite("UDP segmentation and coalescing for the TUN offloads (USO)")
struct UDPOffloadTests {
    static let payload = PacketFactory.pattern(10_000, seed: 9)

    /// A UDP superpacket as the kernel hands it over: UDP length of the whole, the checksum field partial (junk here).
    static func superpacket(v6: Bool, payload: [UInt8] = Self.payload) -> [UInt8] {
        let n = 8 + payload.count
        let udp: [UInt8] = [0x11, 0x94, 0x13, 0x89, UInt8(n >> 8 & 0xff), UInt8(n & 0xff), 0xab, 0xcd] + payload
        return v6 ? PacketFactory.ipv6(nextHeader: 17, payload: udp) : PacketFactory.ipv4(proto: 17, payload: udp)
    }

    static func cut(_ packet: [UInt8], size: Int) throws -> [[UInt8]] {
        var h = VirtioNetHeader()
        h.gsoType = VirtioNetHeader.gsoUDPL4
        h.gsoSize = UInt16(size)
        h.flags = VirtioNetHeader.needsChecksum
        var out: [[UInt8]] = []
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 65_536, alignment: 16)
        defer { scratch.deallocate() }
        let p = UnsafeMutableRawPointer.allocate(byteCount: packet.count, alignment: 16)
        defer { p.deallocate() }
        p.copyMemory(from: packet, byteCount: packet.count)
        let collect = { (b: UnsafeRawPointer, n: Int) in out.append(Array(UnsafeRawBufferPointer(start: b, count: n))) }
        // Resumed after 3 datagrams, as the TUN reader does when its batch is full.
        var offset = try UDPOffload.segment(p, count: packet.count, header: h, limit: 3, scratch: scratch,
                                            scratchSize: 65_536, collect)
        #expect(out.count == 3 && offset == 3 * size)
        offset = try UDPOffload.segment(p, count: packet.count, header: h, from: offset, scratch: scratch,
                                        scratchSize: 65_536, collect)
        #expect(offset == packet.count - (packet[0] >> 4 == 4 ? 28 : 48))
        return out
    }

    @Test("a UDP superpacket is cut into gso_size datagrams with their own lengths, IDs and checksums",
          arguments: [false, true])
    func segmentation(v6: Bool) throws {
        let datagrams = try Self.cut(Self.superpacket(v6: v6), size: 1_300)
        #expect(datagrams.count == 8)  // 7 × 1,300 + 900
        var joined: [UInt8] = []
        for (i, d) in datagrams.enumerated() {
            let ip = v6 ? 40 : 20
            let payload = i == 7 ? 900 : 1_300
            #expect(d.count == ip + 8 + payload)
            if v6 {
                #expect(be16(d, 4) == 8 + payload)
            } else {
                #expect(be16(d, 2) == d.count)
                #expect(be16(d, 4) == 0x1234 + i)  // identification counts up (inet_gso_segment)
                #expect(onesComplementSum(Array(d[0..<20])) == 0xffff)  // header checksum verifies
            }
            #expect(be16(d, ip) == 0x1194 && be16(d, ip + 2) == 0x1389)
            #expect(be16(d, ip + 4) == 8 + payload)
            #expect(be16(d, ip + 6) == Int(udpChecksum(d)))
            #expect(UDPOffload.checksumsValid(d, count: d.count))
            joined += d[(ip + 8)...]
        }
        #expect(joined == Self.payload)
    }

    @Test("cut datagrams coalesce back into one packet whose virtio header and completed checksum are right",
          arguments: [false, true])
    func coalescing(v6: Bool) throws {
        let datagrams = try Self.cut(Self.superpacket(v6: v6), size: 1_300)
        let ip = v6 ? 40 : 20
        var run = datagrams[0].count - ip - 8
        var last = run
        for j in 1..<datagrams.count {
            let ok = datagrams[0].withUnsafeBytes { a in
                datagrams[j].withUnsafeBytes { b in
                    UDPOffload.continues(first: a.baseAddress!, firstCount: a.count, next: b.baseAddress!,
                                         nextCount: b.count, runPayload: run, runCount: j, segmentSize: 1_300,
                                         lastPayload: last)
                }
            }
            #expect(ok)
            last = datagrams[j].count - ip - 8
            run += last
        }
        #expect(run == Self.payload.count)
        var head = datagrams[0]
        let h = head.withUnsafeMutableBytes {
            UDPOffload.finishRun(first: $0.baseAddress!, firstCount: $0.count, totalPayload: run, segmentSize: 1_300)
        }
        #expect(h.gsoType == VirtioNetHeader.gsoUDPL4 && h.gsoSize == 1_300 && h.flags == VirtioNetHeader.needsChecksum)
        #expect(Int(h.checksumStart) == ip && h.checksumOffset == 6 && Int(h.headerLength) == ip + 8)
        // What the kernel does with NEEDS_CSUM: sum from csum_start to the end over the field holding the
        // pseudo-header sum; the result must be the whole datagram's checksum, computed independently.
        let whole = Array(head[..<(ip + 8)]) + Self.payload
        var completed = whole
        let c = ~onesComplementSum(Array(whole[ip...]))
        completed[ip + 6] = UInt8(c >> 8)
        completed[ip + 7] = UInt8(c & 0xff)
        #expect(be16(completed, ip + 6) == Int(udpChecksum(completed)))
        #expect(be16(whole, ip + 4) == 8 + Self.payload.count)
        if !v6 { #expect(be16(whole, 2) == whole.count && onesComplementSum(Array(whole[0..<20])) == 0xffff) }
    }

    @Test("runs stop at another flow, a larger datagram after a short one, and a bad checksum")
    func runLimits() throws {
        let a = try Self.cut(Self.superpacket(v6: false), size: 1_000)
        var otherPort = a[1]
        otherPort[21] ^= 1
        func continues(_ next: [UInt8], lastPayload: Int = 1_000) -> Bool {
            a[0].withUnsafeBytes { f in
                next.withUnsafeBytes { n in
                    UDPOffload.continues(first: f.baseAddress!, firstCount: f.count, next: n.baseAddress!,
                                         nextCount: n.count, runPayload: 1_000, runCount: 1, segmentSize: 1_000,
                                         lastPayload: lastPayload)
                }
            }
        }
        #expect(continues(a[1]))
        #expect(!continues(otherPort))
        #expect(!continues(a[1], lastPayload: 500))  // nothing follows a shorter datagram
        let bigger = Self.superpacket(v6: false, payload: PacketFactory.pattern(1_200))
        #expect(!continues(bigger))
        var corrupt = a[2]
        corrupt[100] ^= 0xff
        #expect(!UDPOffload.checksumsValid(corrupt, count: corrupt.count))
        var noChecksum = a[2]
        noChecksum[26] = 0
        noChecksum[27] = 0
        #expect(!UDPOffload.checksumsValid(noChecksum, count: noChecksum.count))
    }
}
