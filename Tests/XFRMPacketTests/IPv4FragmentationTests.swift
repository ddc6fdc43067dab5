import Testing
import XFRMPacket
import XFRMTestKit

private func be16(_ p: [UInt8], _ at: Int) -> Int { Int(p[at]) << 8 | Int(p[at + 1]) }

/// The RFC 1071 sum of a header, written here independently: a valid header sums to 0xffff.
private func headerSum(_ h: ArraySlice<UInt8>) -> UInt16 {
    var sum: UInt32 = 0
    var i = h.startIndex
    while i + 1 < h.endIndex {
        sum += UInt32(h[i]) << 8 | UInt32(h[i + 1])
        i += 2
    }
    while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
    return UInt16(sum)
}

@Suite("IPv4 fragmentation of packets larger than the MTU (RFC 791 §3.2, ip_do_fragment)")
struct IPv4FragmentationTests {
    static let pool = PacketPool(count: 256, slotSize: 4096, headroom: 64)

    /// Cuts `packet` for `mtu` as the dispatcher does; nil when it is not to be cut.
    static func cut(_ packet: [UInt8], mtu: Int) -> [[UInt8]]? {
        var buf = Self.pool.allocate()!
        defer { Self.pool.release(buf) }
        let appended = buf.append(contentsOf: packet)
        #expect(appended)
        guard let plan = IPv4Fragmentation.plan(buf.data, count: buf.count, mtu: mtu) else { return nil }
        var out: [[UInt8]] = []
        for i in 1..<plan.count {
            var piece = Self.pool.allocate()!
            let written = IPv4Fragmentation.writeFragment(i, of: buf.data, plan: plan, into: &piece)
            #expect(written)
            out.append(piece.bytes)
            Self.pool.release(piece)
        }
        IPv4Fragmentation.makeFirst(&buf, plan: plan)
        return [buf.bytes] + out
    }

    /// What a receiver checks and does (RFC 791's reassembly, written here from scratch): every fragment a valid
    /// header of the original's identity, at most `mtu` bytes, payloads in multiples of eight but the last; returns
    /// the payload put back together and the last fragment's More Fragments flag.
    static func reassemble(_ fragments: [[UInt8]], like original: [UInt8], mtu: Int) -> (payload: [UInt8], lastMF: Bool) {
        var payload: [UInt8] = []
        var lastMF = false
        let base = (be16(original, 6) & 0x1fff) * 8
        for (i, f) in fragments.enumerated() {
            let hl = Int(f[0] & 0x0f) * 4
            #expect(f.count <= mtu, "fragment \(i) is \(f.count) bytes")
            #expect(be16(f, 2) == f.count, "fragment \(i): total length")
            #expect(headerSum(f[0..<hl]) == 0xffff, "fragment \(i): header checksum")
            #expect(hl == Int(original[0] & 0x0f) * 4)
            #expect(Array(f[4..<6]) == Array(original[4..<6]), "identification")
            #expect(f[8] == original[8] && f[9] == original[9], "TTL and protocol")
            #expect(Array(f[12..<20]) == Array(original[12..<20]), "addresses")
            #expect(f[6] & 0x40 == 0, "no DF")
            let offset = (be16(f, 6) & 0x1fff) * 8 - base
            #expect(offset == payload.count, "fragment \(i) starts where the one before ended")
            let mf = f[6] & 0x20 != 0
            if i < fragments.count - 1 {
                #expect(mf, "More Fragments on fragment \(i)")
                #expect((f.count - hl) % 8 == 0)
            }
            lastMF = mf
            payload += f[hl...]
        }
        return (payload, lastMF)
    }

    @Test("a packet without DF is cut into fragments of at most the MTU that put back together give its payload",
          arguments: [(1500, 1400), (2000, 1500), (3000, 1280), (1500, 576), (200, 68), (1401, 1400)])
    func cutsAndReassembles(size: Int, mtu: Int) throws {
        let payload = PacketFactory.pattern(size - 20, seed: UInt8(truncatingIfNeeded: size))
        let p = PacketFactory.ipv4(proto: 50, dontFragment: false, payload: payload)
        let pieces = try #require(Self.cut(p, mtu: mtu))
        let chunk = (mtu - 20) & ~7
        #expect(pieces.count == (payload.count + chunk - 1) / chunk)
        let (back, lastMF) = Self.reassemble(pieces, like: p, mtu: mtu)
        #expect(back == payload)
        #expect(!lastMF, "the last fragment of a whole packet has no More Fragments")
    }

    @Test("what must not or need not be cut is left alone: DF, fits, not IPv4, an MTU with no room, wrong length")
    func refusals() {
        let payload = PacketFactory.pattern(1480, seed: 3)
        #expect(Self.cut(PacketFactory.ipv4(dontFragment: true, payload: payload), mtu: 1400) == nil)
        #expect(Self.cut(PacketFactory.ipv4(dontFragment: false, payload: payload), mtu: 1500) == nil)
        #expect(Self.cut(PacketFactory.ipv4(dontFragment: false, payload: payload), mtu: 27) == nil)
        #expect(Self.cut(PacketFactory.ipv4(dontFragment: false, payload: payload), mtu: 28) != nil)
        var short = PacketFactory.ipv4(dontFragment: false, payload: payload)
        short[3] &-= 1  // the header claims one byte less than the packet has
        #expect(Self.cut(short, mtu: 1400) == nil)
        #expect(Self.cut(PacketFactory.ipv6(payload: payload), mtu: 1280) == nil)
    }

    @Test("a packet that was itself a fragment: offsets continue its own, and More Fragments stays on its last piece")
    func refragmentsAFragment() throws {
        let payload = PacketFactory.pattern(1600, seed: 5)
        for mf in [false, true] {
            var p = PacketFactory.ipv4(proto: 17, dontFragment: false, payload: payload)
            let field = (mf ? 0x2000 : 0) | 185  // offset 1480 bytes
            p[6] = UInt8(field >> 8)
            p[7] = UInt8(field & 0xff)
            p[10] = 0
            p[11] = 0
            let c = ~headerSum(p[0..<20])
            p[10] = UInt8(c >> 8)
            p[11] = UInt8(c & 0xff)
            let pieces = try #require(Self.cut(p, mtu: 1000))
            #expect((be16(pieces[0], 6) & 0x1fff) == 185)
            let (back, lastMF) = Self.reassemble(pieces, like: p, mtu: 1000)
            #expect(back == payload)
            #expect(lastMF == mf)
        }
    }

    @Test("options: the first fragment keeps all; the others keep the copied ones and No Operation for the rest")
    func options() throws {
        // Record Route (7, not copied, 7 bytes), a No Operation, Security-like copied option 0x82 (4 bytes),
        // End of Option List: 12 bytes of options.
        let opts: [UInt8] = [7, 7, 4, 0, 0, 0, 0, 1, 0x82, 4, 0xaa, 0xbb]
        let p = PacketFactory.ipv4(dontFragment: false, options: opts, payload: PacketFactory.pattern(1000, seed: 1))
        let pieces = try #require(Self.cut(p, mtu: 600))
        #expect(pieces.count == 2)
        #expect(Array(pieces[0][20..<32]) == opts)
        #expect(Array(pieces[1][20..<32]) == [1, 1, 1, 1, 1, 1, 1, 1, 0x82, 4, 0xaa, 0xbb])
        let (back, _) = Self.reassemble(pieces, like: p, mtu: 600)
        #expect(back == PacketFactory.pattern(1000, seed: 1))
    }

    @Test("a buffer without room for its fragment is refused, not overrun")
    func noRoom() throws {
        let p = PacketFactory.ipv4(dontFragment: false, payload: PacketFactory.pattern(3000, seed: 2))
        var buf = Self.pool.allocate()!
        defer { Self.pool.release(buf) }
        _ = buf.append(contentsOf: p)
        let plan = try #require(IPv4Fragmentation.plan(buf.data, count: buf.count, mtu: 2000))
        var full = Self.pool.allocate()!
        defer { Self.pool.release(full) }
        _ = full.append(full.tailroom - 100)
        let written = IPv4Fragmentation.writeFragment(1, of: buf.data, plan: plan, into: &full)
        #expect(!written)
    }
}
