import Synchronization
import Testing
import XFRMCore
import XFRMEngine
import XFRMPacket
import XFRMTestKit

@Suite("IPv6 fragments: ESP sealed for a too-small IPv6 path leaves in Fragment headers (RFC 8200 §4.5), put back before ESP",
       .serialized)  // the reassembly tests share a pool and check that all of it comes back
struct IPv6FragmentationTests {
    static let pool = PacketPool(count: 64, slotSize: 4096, headroom: 128)

    /// A's dispatcher (daemon rules: no reassembly of its own) with eth0 at `mtu` over IPv6, B's with kernel rules.
    static func setUp(mtu: Int) throws -> (EnginePair, Dispatcher, RecordingSink, EngineCounters) {
        let p = try EnginePair(tunnels: 1, outer6: true)
        try p.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = mtu }
        let counters = EngineCounters()
        let wire = RecordingSink(pool: p.pool)
        let sinks = InterfaceSinks()
        sinks.set(wire, ifindex: 2)
        let d = Dispatcher(stack: p.a, pool: p.pool, rules: .daemon, counters: counters, interfaces: sinks,
                           local: RecordingSink(pool: p.pool))
        return (p, d, wire, counters)
    }

    static func inner(_ p: EnginePair, size: Int, df: Bool = false) -> (PacketBuffer, [UInt8]) {
        var buf = p.pool.allocate()!
        let bytes = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.1.1.1", proto: 17, dontFragment: df,
                                       payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28, seed: 6)))
        _ = buf.append(contentsOf: bytes)
        return (buf, bytes)
    }

    static func be16(_ b: [UInt8], _ i: Int) -> Int { Int(b[i]) << 8 | Int(b[i + 1]) }

    @Test("each piece: the IPv6 header, a Fragment header naming ESP, one identification, offsets in 8-byte units; the peer host joins them and forwards the packet sent")
    func cutAndJoined() throws {
        let (p, d, wire, counters) = try Self.setUp(mtu: 1280)
        let (b, bWire, bCounters) = FragmentationTests.kernelHost(p, p.b)
        // B forwards the inner packets whole.
        try p.b.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 9000 }
        var ids: Set<[UInt8]> = []
        for (n, size) in [1300, 1500, 1700].enumerated() {
            let before = wire.count
            let (buf, sent) = Self.inner(p, size: size)
            var batch = PacketBatch()
            batch.append(PacketBatch.Packet(buf, stage: .output))
            d.run(&batch)
            let pieces = wire.packets.withLock { Array($0[before...]) }
            #expect(pieces.count == 2)
            for (i, f) in pieces.enumerated() {
                #expect(f.count <= 1280 && f[0] >> 4 == 6 && f[6] == 44 && f[40] == 50 && f[41] == 0)
                #expect(Self.be16(f, 4) == f.count - 40, "payload length")
                #expect(Array(f[8..<40]) == Array(pieces[0][8..<40]), "the same addresses")
                #expect(Array(f[44..<48]) == Array(pieces[0][44..<48]), "one identification")
                let field = Self.be16(f, 42)
                #expect(field & 1 == (i == 0 ? 1 : 0), "More Fragments on all but the last")
                #expect(field & 0xfff8 == (i == 0 ? 0 : pieces[0].count - 48), "the offset continues the data")
            }
            #expect((pieces[0].count - 48) % 8 == 0)
            ids.insert(Array(pieces[0][44..<48]))
            // B reassembles (the pieces in reverse order), decrypts and forwards the inner packet.
            let forwarded = bWire.count
            for bytes in pieces.reversed() {
                var f = p.pool.allocate()!
                _ = f.append(contentsOf: bytes)
                batch.append(PacketBatch.Packet(f, stage: .input, ifindex: 2))
            }
            b.run(&batch)
            let out = bWire.packets.withLock { Array($0[forwarded...]) }
            #expect(out.count == 1, "packet \(n)")
            if let got = out.first {
                #expect(got.count == sent.count && got[8] == sent[8] - 1)
                #expect(Array(got[20...]) == Array(sent[20...]), "size \(size): the inner packet")
            }
        }
        #expect(ids.count == 3, "every packet its own identification")
        #expect(counters.fragmented.load(ordering: .relaxed) == 3)
        #expect(counters.fragmentsCreated.load(ordering: .relaxed) == 6)
        #expect(counters.fragmentFailed.load(ordering: .relaxed) == 0)
        #expect(bCounters.reassembly.reassembled.load(ordering: .relaxed) == 3)
        #expect(bCounters.reassembly.joined.load(ordering: .relaxed) == 6)
        // An inner packet with DF hears of the MTU instead (ICMP back to its sender); nothing more is cut.
        let (df, _) = Self.inner(p, size: 1300, df: true)
        var batch = PacketBatch()
        batch.append(PacketBatch.Packet(df, stage: .output))
        d.run(&batch)
        #expect(counters.fragmented.load(ordering: .relaxed) == 3)
        #expect(p.pool.available == p.pool.slotCount)
    }

    /// The pieces of one IPv6 ESP packet of `size` bytes cut to `mtu`, with `id`, and the packet.
    static func pieces(size: Int, mtu: Int, id: UInt32, pool: PacketPool) -> (whole: [UInt8], pieces: [[UInt8]]) {
        let payload = PacketFactory.pattern(size - 40, seed: UInt8(truncatingIfNeeded: id))
        var whole: [UInt8] = [0x60, 0, 0, 0, UInt8((size - 40) >> 8), UInt8((size - 40) & 0xff), 50, 64]
        whole += [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [1]
        whole += [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [2]
        whole += payload
        return (whole, Self.cut(whole, mtu: mtu, id: id, pool: pool).pieces)
    }

    /// The IPv6 packet `whole` cut to `mtu` with `id` as the dispatcher cuts it, and the plan it followed.
    static func cut(_ whole: [UInt8], mtu: Int, id: UInt32, pool: PacketPool)
        -> (plan: IPv6Fragmentation.Plan, pieces: [[UInt8]])
    {
        var buf = pool.allocate()!
        _ = buf.append(contentsOf: whole)
        let plan = IPv6Fragmentation.plan(buf.data, count: buf.count, mtu: mtu, identification: id)!
        var out: [[UInt8]] = []
        for i in 1..<plan.count {
            var piece = pool.allocate()!
            let written = IPv6Fragmentation.writeFragment(i, of: buf.data, plan: plan, into: &piece)
            #expect(written)
            out.append(piece.bytes)
            pool.release(piece)
        }
        let made = IPv6Fragmentation.makeFirst(&buf, plan: plan)
        #expect(made)
        out.insert(buf.bytes, at: 0)
        pool.release(buf)
        return (plan, out)
    }

    static func feed(_ r: IPv4Reassembly, _ bytes: [UInt8], now: UInt64 = 100) -> [UInt8]? {
        r.feed(bytes, from: Self.pool, now: now)
    }

    static func count(_ a: borrowing Atomic<UInt64>) -> UInt64 { a.load(ordering: .relaxed) }

    @Test("reassembly: any order gives the packet back byte for byte; an overlap discards it (RFC 5722); a middle piece not a multiple of 8 bytes is refused; an atomic fragment (RFC 6946) just loses its header")
    func reassembly() {
        let pool = Self.pool
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: pool, counters: c)
        for (n, order) in [[0, 1, 2], [2, 1, 0], [1, 2, 0]].enumerated() {
            let (whole, pieces) = Self.pieces(size: 3000, mtu: 1280, id: UInt32(0x1000 + n), pool: pool)
            #expect(pieces.count == 3)
            var got: [UInt8]? = nil
            for (k, i) in order.enumerated() {
                let out = Self.feed(r, pieces[i])
                #expect((out == nil) == (k < 2), "only the last piece completes it")
                got = out ?? got
            }
            #expect(got == whole, "order \(order)")
        }
        #expect(Self.count(c.reassembled) == 3 && Self.count(c.failed) == 0 && r.heldFragments == 0)

        // Overlap: the second piece again, 8 bytes earlier.
        let (_, other) = Self.pieces(size: 3000, mtu: 1280, id: 77, pool: pool)
        #expect(Self.feed(r, other[0]) == nil)
        var shifted = other[1]
        let field = Self.be16(shifted, 42) - 8
        shifted[42] = UInt8(field >> 8)
        shifted[43] = UInt8(field & 0xff)
        #expect(Self.feed(r, shifted) == nil)
        #expect(Self.count(c.overlaps) == 1 && Self.count(c.failed) == 2 && r.heldFragments == 0)

        // A piece with More Fragments whose data is not a multiple of 8 bytes.
        var odd = other[1]
        odd.removeLast(3)
        odd[4] = UInt8((odd.count - 40) >> 8)
        odd[5] = UInt8((odd.count - 40) & 0xff)
        #expect(Self.feed(r, odd) == nil)
        #expect(Self.count(c.failed) == 3 && r.heldFragments == 0)

        // An atomic fragment: offset 0, no More Fragments.
        let (whole, _) = Self.pieces(size: 200, mtu: 150, id: 5, pool: pool)
        var atomic = Array(whole[0..<40]) + [50, 0, 0, 0, 0, 0, 0, 9] + Array(whole[40...])
        atomic[6] = 44
        atomic[4] = UInt8((atomic.count - 40) >> 8)
        atomic[5] = UInt8((atomic.count - 40) & 0xff)
        #expect(Self.feed(r, atomic) == whole)
        #expect(r.heldFragments == 0 && pool.available == pool.slotCount)
    }

    @Test("a Hop-by-Hop header stays in front of every piece, its Next Header naming the Fragment header, and comes back in the datagram naming ESP again")
    func hopByHopStaysInFront() {
        let pool = Self.pool
        let size = 2000
        var whole: [UInt8] = [0x60, 0, 0, 0, UInt8((size - 40) >> 8), UInt8((size - 40) & 0xff), 0, 64]
        whole += [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [1]
        whole += [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [2]
        whole += [50, 0, 1, 4, 0, 0, 0, 0]  // Hop-by-Hop: next ESP, PadN
        whole += PacketFactory.pattern(size - 48, seed: 3)
        let (plan, pieces) = Self.cut(whole, mtu: 1280, id: 0xabcd_0123, pool: pool)
        #expect(plan.unfragmentable == 48 && plan.nextHeaderOffset == 40 && plan.nextHeader == 50)
        #expect(pieces.count == 2)
        for (i, f) in pieces.enumerated() {
            #expect(f[6] == 0 && f[40] == 44 && Array(f[41..<48]) == [0, 1, 4, 0, 0, 0, 0], "piece \(i): the HBH")
            #expect(f[48] == 50 && Array(f[52..<56]) == [0xab, 0xcd, 0x01, 0x23], "piece \(i): the Fragment header")
            #expect(Self.be16(f, 50) == (i == 0 ? 1 : (1280 - 56) & ~7), "piece \(i): offset and M")
        }
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: pool, counters: c)
        #expect(Self.feed(r, pieces[1]) == nil)
        #expect(Self.feed(r, pieces[0]) == whole)
        #expect(r.heldFragments == 0 && pool.available == pool.slotCount)
    }

    @Test("an IPv6 datagram may take 60 s to arrive whole (ip6frag_time)")
    func timeouts() {
        let pool = Self.pool
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: pool, counters: c)
        let (_, pieces) = Self.pieces(size: 3000, mtu: 1280, id: 9, pool: pool)
        #expect(Self.feed(r, pieces[0], now: 100) == nil)
        r.sweep(now: 159)
        #expect(r.heldFragments == 1)
        r.sweep(now: 160)
        #expect(r.heldFragments == 0 && Self.count(c.timeouts) == 1 && pool.available == pool.slotCount)
    }
}
