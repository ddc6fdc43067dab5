import Synchronization
import Testing
import XFRMCore
import XFRMEngine
import XFRMPacket
import XFRMTestKit

@Suite("Dispatcher: IPv4 without DF that ESP makes too big leaves as fragments (RFC 4303 §3.3.5)")
struct FragmentationTests {
    /// Puts the fragments back together (RFC 791's reassembly, written here plainly): the first one's header with
    /// the total length, no More Fragments and a fresh checksum, then every payload by offset.
    static func reassemble(_ fragments: [[UInt8]]) -> [UInt8] {
        let sorted = fragments.sorted { (Int($0[6] & 0x1f) << 8 | Int($0[7])) < (Int($1[6] & 0x1f) << 8 | Int($1[7])) }
        let hl = Int(sorted[0][0] & 0x0f) * 4
        var out = Array(sorted[0][0..<hl])
        for f in sorted { out += f[(Int(f[0] & 0x0f) * 4)...] }
        out[2] = UInt8(out.count >> 8)
        out[3] = UInt8(out.count & 0xff)
        out[6] &= 0x40
        out[7] = 0
        out.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: hl) }
        return out
    }

    static func setUp() throws -> (EnginePair, Dispatcher, RecordingSink, EngineCounters) {
        let p = try EnginePair(tunnels: 1)
        try p.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 1280 }
        let counters = EngineCounters()
        let wire = RecordingSink(pool: p.pool)
        let sinks = InterfaceSinks()
        sinks.set(wire, ifindex: 2)
        let d = Dispatcher(stack: p.a, pool: p.pool, rules: .daemon, counters: counters, interfaces: sinks,
                           local: RecordingSink(pool: p.pool))
        return (p, d, wire, counters)
    }

    static func big(_ p: EnginePair, size: Int, df: Bool) -> (PacketBuffer, [UInt8]) {
        var buf = p.pool.allocate()!
        let bytes = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.1.1.1", proto: 17, dontFragment: df,
                                       payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28, seed: 4)))
        _ = buf.append(contentsOf: bytes)
        return (buf, bytes)
    }

    @Test("the ESP packet is cut to the MTU, counted, and what the peer reassembles decrypts to the packet sent")
    func cutsAndThePeerDecrypts() throws {
        let (p, d, wire, counters) = try Self.setUp()
        for size in [1400, 1500, 1700] {
            let before = wire.count
            let (buf, sent) = Self.big(p, size: size, df: false)
            var batch = PacketBatch()
            batch.append(PacketBatch.Packet(buf, stage: .output))
            d.run(&batch)
            let pieces = wire.packets.withLock { Array($0[before...]) }
            #expect(pieces.count == 2)
            #expect(pieces.allSatisfy { $0.count <= 1280 && $0[9] == 50 })
            var back = p.pool.allocate()!
            _ = back.append(contentsOf: Self.reassemble(pieces))
            // B does not hold 10.1.1.1: it forwards what its FWD policy allows.
            #expect(p.b.input(&back, ifindex: 2) == .forward)
            // Forwarded: the TTL is one less (and the header checksum follows); the rest is the packet sent.
            let got = back.bytes
            #expect(got[8] == sent[8] - 1)
            #expect(Array(got[20...]) == Array(sent[20...]) && Array(got[0..<8]) == Array(sent[0..<8]),
                    "size \(size): the inner packet")
            p.pool.release(back)
        }
        #expect(counters.fragmented.load(ordering: .relaxed) == 3)
        #expect(counters.fragmentsCreated.load(ordering: .relaxed) == 6)
        #expect(counters.fragmentFailed.load(ordering: .relaxed) == 0)
        // With DF the sender hears of the MTU instead; nothing more is cut.
        let (df, _) = Self.big(p, size: 1400, df: true)
        var batch = PacketBatch()
        batch.append(PacketBatch.Packet(df, stage: .output))
        d.run(&batch)
        #expect(counters.fragmented.load(ordering: .relaxed) == 3)
        #expect(p.pool.available == p.pool.slotCount)
    }

    /// A kernel-rules dispatcher on `stack` whose eth0 (ifindex 2) goes to the returned sink.
    static func kernelHost(_ p: EnginePair, _ stack: XFRMStack) -> (Dispatcher, RecordingSink, EngineCounters) {
        let wire = RecordingSink(pool: p.pool)
        let sinks = InterfaceSinks()
        sinks.set(wire, ifindex: 2)
        let counters = EngineCounters()
        return (Dispatcher(stack: stack, pool: p.pool, rules: .kernel, counters: counters, interfaces: sinks,
                           local: RecordingSink(pool: p.pool)), wire, counters)
    }

    @Test("a packet with identification 0 gets one before it is cut: every fragment carries the same, non-zero")
    func identificationZero() throws {
        let p = try EnginePair(tunnels: 1)
        try p.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 576 }
        let (d, wire, _) = Self.kernelHost(p, p.a)
        var buf = p.pool.allocate()!
        _ = buf.append(contentsOf: PacketFactory.ipv4(
            source: "10.0.9.1", destination: "10.9.9.9", proto: 17, identification: 0, dontFragment: false,
            payload: PacketFactory.udp(payload: PacketFactory.pattern(1200))))
        var batch = PacketBatch()
        batch.append(PacketBatch.Packet(buf, stage: .output))
        d.run(&batch)
        let pieces = wire.packets.withLock { $0 }
        #expect(pieces.count == 3)
        let ids = Set(pieces.map { Int($0[4]) << 8 | Int($0[5]) })
        #expect(ids.count == 1 && !ids.contains(0))
        #expect(pieces.allSatisfy { ReassemblyTests.fixed($0) == $0 }, "header checksums")
        #expect(p.pool.available == p.pool.slotCount)
    }

    @Test("fragments passing through are forwarded as they are, not reassembled (only this host's are)")
    func transitFragmentsStayFragments() throws {
        let p = try EnginePair(tunnels: 1)
        try p.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 576 }
        let (a, aWire, _) = Self.kernelHost(p, p.a)
        var buf = p.pool.allocate()!
        _ = buf.append(contentsOf: PacketFactory.ipv4(
            source: "10.5.5.1", destination: "10.6.6.1", proto: 17, dontFragment: false,
            payload: PacketFactory.udp(payload: PacketFactory.pattern(1200))))
        var batch = PacketBatch()
        batch.append(PacketBatch.Packet(buf, stage: .output))
        a.run(&batch)
        let pieces = aWire.packets.withLock { $0 }
        #expect(pieces.count == 3)
        let (b, bWire, bCounters) = Self.kernelHost(p, p.b)
        for bytes in pieces {
            var f = p.pool.allocate()!
            _ = f.append(contentsOf: bytes)
            batch.append(PacketBatch.Packet(f, stage: .input, ifindex: 2))
        }
        b.run(&batch)
        let forwarded = bWire.packets.withLock { $0 }
        #expect(forwarded.count == 3, "forwarded one by one")
        #expect(zip(forwarded, pieces).allSatisfy { Array($0[20...]) == Array($1[20...]) && $0[8] == $1[8] - 1 })
        #expect(bCounters.reassembly.required.load(ordering: .relaxed) == 0)
        #expect(p.pool.available == p.pool.slotCount)
    }

    @Test("without buffers for every fragment the packet is dropped and counted, none half sent, no buffer lost")
    func dryPool() throws {
        let (p, d, wire, counters) = try Self.setUp()
        try p.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 600 }
        let (buf, _) = Self.big(p, size: 1700, df: false)  // three fragments: two more buffers, and only one is left
        var held: [PacketBuffer] = []
        while p.pool.available > 1, let b = p.pool.allocate() { held.append(b) }
        var batch = PacketBatch()
        batch.append(PacketBatch.Packet(buf, stage: .output))
        d.run(&batch)
        #expect(wire.count == 0)
        #expect(p.pool.available == 2, "the one fragment made was given back, and the packet's own buffer")
        #expect(counters.fragmentFailed.load(ordering: .relaxed) == 1)
        #expect(counters.fragmented.load(ordering: .relaxed) == 0)
        for b in held { p.pool.release(b) }
        #expect(p.pool.available == p.pool.slotCount)
    }
}

@Suite("IPv4 reassembly before the stack (RFC 4303 §3.4.1, ip_defrag): whole datagrams, overlaps and time limits",
       .serialized)  // the tests share a pool and check that all of it comes back
struct ReassemblyTests {
    static let pool = PacketPool(count: 64, slotSize: 4096, headroom: 128)

    /// `size` bytes of IPv4 (ID `id`) cut for `mtu` by the fragmenter, as byte arrays.
    static func fragments(size: Int, mtu: Int, id: UInt16 = 0x4242) -> (whole: [UInt8], pieces: [[UInt8]]) {
        let whole = PacketFactory.ipv4(proto: 50, identification: id, dontFragment: false,
                                       payload: PacketFactory.pattern(size - 20, seed: UInt8(truncatingIfNeeded: id)))
        var buf = Self.pool.allocate()!
        _ = buf.append(contentsOf: whole)
        let plan = IPv4Fragmentation.plan(buf.data, count: buf.count, mtu: mtu)!
        var pieces: [[UInt8]] = []
        for i in 1..<plan.count {
            var piece = Self.pool.allocate()!
            _ = IPv4Fragmentation.writeFragment(i, of: buf.data, plan: plan, into: &piece)
            pieces.append(piece.bytes)
            Self.pool.release(piece)
        }
        IPv4Fragmentation.makeFirst(&buf, plan: plan)
        pieces.insert(buf.bytes, at: 0)
        Self.pool.release(buf)
        return (whole, pieces)
    }

    static func feed(_ r: IPv4Reassembly, _ bytes: [UInt8], now: UInt64 = 100) -> [UInt8]? {
        r.feed(bytes, from: Self.pool, now: now)
    }

    static func count(_ a: borrowing Atomic<UInt64>) -> UInt64 { a.load(ordering: .relaxed) }

    @Test("fragments in any order give back the datagram, byte for byte; nothing is held after")
    func anyOrder() {
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: Self.pool, counters: c)
        for (n, order) in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]].enumerated() {
            let (whole, pieces) = Self.fragments(size: 1800, mtu: 576, id: UInt16(n + 1))
            #expect(pieces.count == 4)
            var got: [UInt8]? = nil
            for (k, i) in order.enumerated() {
                let out = Self.feed(r, pieces[i])
                #expect((out == nil) == (k < 3), "only the last fragment completes it")
                got = out ?? got
            }
            #expect(got == whole, "order \(order)")
        }
        #expect(Self.count(c.required) == 16 && Self.count(c.reassembled) == 4 && Self.count(c.failed) == 0)
        #expect(r.heldFragments == 0 && Self.pool.available == Self.pool.slotCount)
    }

    @Test("an exact duplicate is dropped alone; an overlap discards the whole datagram (RFC 5722)")
    func duplicatesAndOverlaps() {
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: Self.pool, counters: c)
        let (whole, pieces) = Self.fragments(size: 1800, mtu: 576)
        #expect(Self.feed(r, pieces[0]) == nil)
        #expect(Self.feed(r, pieces[0]) == nil)
        #expect(Self.count(c.duplicates) == 1)
        #expect(Self.feed(r, pieces[1]) == nil && Self.feed(r, pieces[2]) == nil)
        #expect(Self.feed(r, pieces[3]) == whole)
        // An overlapping fragment: the second piece again, but starting 8 bytes earlier.
        let (_, other) = Self.fragments(size: 1800, mtu: 576, id: 7)
        #expect(Self.feed(r, other[0]) == nil)
        var shifted = other[1]
        let field = (Int(shifted[6]) << 8 | Int(shifted[7])) - 1
        shifted[6] = UInt8(field >> 8)
        shifted[7] = UInt8(field & 0xff)
        shifted.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: 20) }
        #expect(Self.feed(r, shifted) == nil)
        #expect(Self.count(c.overlaps) == 1)
        #expect(Self.count(c.failed) == 2, "the overlapping fragment and the one it would have joined")
        // The rest of that datagram cannot complete it any more.
        for p in other[1...] { #expect(Self.feed(r, p) == nil) }
        r.releaseAll()
        #expect(Self.pool.available == Self.pool.slotCount)
    }

    @Test("a datagram not whole within 30 s is discarded and counted; a bound on held fragments drops the excess")
    func timeoutAndBound() {
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: Self.pool, counters: c, timeout: 30, maxHeld: 3)
        let (_, pieces) = Self.fragments(size: 1800, mtu: 576)
        #expect(Self.feed(r, pieces[0], now: 100) == nil && Self.feed(r, pieces[1], now: 110) == nil)
        r.sweep(now: 129)
        #expect(r.heldFragments == 2)
        r.sweep(now: 130)
        #expect(r.heldFragments == 0 && Self.count(c.timeouts) == 1 && Self.count(c.failed) == 2)
        // The remaining two alone never make a datagram; they too wait and go.
        for id in UInt16(1)...4 { #expect(Self.feed(r, Self.fragments(size: 1000, mtu: 576, id: id).pieces[0]) == nil) }
        #expect(r.heldFragments == 3 && Self.count(c.failed) == 3, "the fourth had no room")
        r.sweep(now: 200)
        #expect(r.heldFragments == 0 && Self.pool.available == Self.pool.slotCount)
        #expect(Self.count(c.required) == Self.count(c.failed), "every fragment taken is accounted for")
    }

    @Test("inconsistent fragments are refused: two different ends, data past the end, an empty fragment")
    func inconsistent() {
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: Self.pool, counters: c)
        let (_, pieces) = Self.fragments(size: 1800, mtu: 576)
        #expect(Self.feed(r, pieces[3]) == nil)
        let (_, longer) = Self.fragments(size: 2400, mtu: 576)
        #expect(Self.feed(r, longer[4]) == nil, "a second last fragment with another end discards the datagram")
        #expect(r.heldFragments == 0 && Self.count(c.failed) == 2)
        // Data past the end a last fragment set, even one dropped as a duplicate, discards the datagram.
        #expect(Self.feed(r, pieces[3]) == nil && Self.feed(r, pieces[3]) == nil)
        #expect(Self.count(c.duplicates) == 1)
        #expect(Self.feed(r, Self.fragment(id: 0x4242, offset: 1776, payload: PacketFactory.pattern(16), more: true))
                == nil)
        #expect(r.heldFragments == 0 && Self.count(c.failed) == 4)
        // A fragment with nothing in it discards its datagram (ip_frag_queue: end == offset).
        var empty = Array(pieces[1][0..<20])
        empty[3] = 20
        empty[2] = 0
        empty.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: 20) }
        #expect(Self.feed(r, pieces[0]) == nil && Self.feed(r, empty) == nil)
        #expect(r.heldFragments == 0 && Self.count(c.failed) == 6)
        #expect(Self.pool.available == Self.pool.slotCount)
    }

    @Test("kernel rules: fragments from the wire are joined before the stack, which decrypts and forwards the packet")
    func dispatcherJoinsBeforeTheStack() throws {
        let p = try EnginePair(tunnels: 1)
        try p.a.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.mtu = 600 }
        let aWire = RecordingSink(pool: p.pool)
        let aSinks = InterfaceSinks()
        aSinks.set(aWire, ifindex: 2)
        let a = Dispatcher(stack: p.a, pool: p.pool, rules: .kernel, counters: EngineCounters(), interfaces: aSinks,
                           local: RecordingSink(pool: p.pool))
        let (buf, sent) = FragmentationTests.big(p, size: 1500, df: false)
        var batch = PacketBatch()
        batch.append(PacketBatch.Packet(buf, stage: .output))
        a.run(&batch)
        let pieces = aWire.packets.withLock { $0 }
        #expect(pieces.count == 3)
        let bCounters = EngineCounters()
        let bWire = RecordingSink(pool: p.pool)
        let bSinks = InterfaceSinks()
        bSinks.set(bWire, ifindex: 2)
        let b = Dispatcher(stack: p.b, pool: p.pool, rules: .kernel, counters: bCounters, interfaces: bSinks,
                           local: RecordingSink(pool: p.pool))
        // In reverse, with a plain packet between them.
        for bytes in pieces.reversed() + [PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2",
                                                             payload: PacketFactory.udp(payload: [1]))] {
            var b1 = p.pool.allocate()!
            _ = b1.append(contentsOf: bytes)
            batch.append(PacketBatch.Packet(b1, stage: .input, ifindex: 2))
        }
        b.run(&batch)
        let forwarded = bWire.packets.withLock { $0 }
        #expect(forwarded.count == 1)
        #expect(forwarded.first.map { Array($0[20...]) } == Array(sent[20...]), "the inner packet, forwarded")
        #expect(bCounters.reassembly.reassembled.load(ordering: .relaxed) == 1)
        #expect(p.b.statistics[.inHdrError] == 0)
        #expect(p.pool.available == p.pool.slotCount)
    }

    /// `bytes` with its header checksum made valid again.
    static func fixed(_ bytes: [UInt8]) -> [UInt8] {
        var b = bytes
        b.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: Int($0[0] & 0x0f) * 4) }
        return b
    }

    /// A fragment at `offset` bytes with `payload`, More Fragments as told, header options of `options` bytes.
    static func fragment(id: UInt16 = 0x77, offset: Int, payload: [UInt8], more: Bool, options: Int = 0,
                         tos: UInt8 = 0) -> [UInt8] {
        var f = PacketFactory.ipv4(proto: 50, tos: tos,
                                   identification: id, dontFragment: false,
                                   options: [UInt8](repeating: 1, count: options), payload: payload)
        let field = (more ? 0x2000 : 0) | offset / 8
        f[6] = UInt8(field >> 8)
        f[7] = UInt8(field & 0xff)
        return Self.fixed(f)
    }

    @Test("a datagram past 65,535 bytes (a long first header, short later ones) is discarded, not a crash")
    func oversize() {
        let big = PacketPool(count: 64, slotSize: 65_536 + 1024, headroom: 128)
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: big, counters: c)
        func feed(_ bytes: [UInt8]) -> PacketBuffer? {
            var b = big.allocate()!
            _ = b.append(contentsOf: bytes)
            return r.take(b, now: 1)
        }
        // A 60-byte first header, 20-byte later ones: 65,515 bytes of data fit each fragment's own limit.
        #expect(feed(Self.fragment(offset: 0, payload: PacketFactory.pattern(1480), more: true, options: 40)) == nil)
        var offset = 1480
        while offset + 1480 < 65_512 {
            #expect(feed(Self.fragment(offset: offset, payload: PacketFactory.pattern(1480), more: true)) == nil)
            offset += 1480
        }
        #expect(feed(Self.fragment(offset: offset, payload: PacketFactory.pattern(65_515 - offset), more: false))
                == nil)
        #expect(c.failed.load(ordering: .relaxed) == c.required.load(ordering: .relaxed))
        #expect(r.heldFragments == 0 && big.available == big.slotCount)
    }

    @Test("ECN: CE on any fragment makes the datagram CE; Not-ECT mixed with ECT drops it (RFC 3168 §5.3)")
    func ecn() {
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: Self.pool, counters: c)
        let data = PacketFactory.pattern(16)
        #expect(Self.feed(r, Self.fragment(id: 1, offset: 0, payload: Array(data[0..<8]), more: true, tos: 0x02))
                == nil)
        let ce = Self.feed(r, Self.fragment(id: 1, offset: 8, payload: Array(data[8...]), more: false, tos: 0x03))
        #expect(ce.map { $0[1] & 0x03 } == 0x03)
        #expect(Self.feed(r, Self.fragment(id: 2, offset: 0, payload: Array(data[0..<8]), more: true, tos: 0x00))
                == nil)
        #expect(Self.feed(r, Self.fragment(id: 2, offset: 8, payload: Array(data[8...]), more: false, tos: 0x02))
                == nil)
        #expect(c.failed.load(ordering: .relaxed) == 2 && r.heldFragments == 0)
        #expect(Self.pool.available == Self.pool.slotCount)
    }

    @Test("a fragment inside data already queued is a duplicate; a non-final one is cut to a multiple of 8")
    func containedAndTrimmed() {
        let c = IPv4ReassemblyCounters()
        let r = IPv4Reassembly(pool: Self.pool, counters: c)
        let data = PacketFactory.pattern(64, seed: 8)
        #expect(Self.feed(r, Self.fragment(offset: 0, payload: Array(data[0..<32]), more: true)) == nil)
        // Bytes 8..<24 again, differently: inside the first fragment, so dropped alone (not an overlap).
        #expect(Self.feed(r, Self.fragment(offset: 8, payload: [UInt8](repeating: 0xee, count: 16), more: true))
                == nil)
        #expect(c.duplicates.load(ordering: .relaxed) == 1 && c.failed.load(ordering: .relaxed) == 0)
        // 32..<45 with More Fragments: cut to 32..<40; then 40..<64 completes it.
        #expect(Self.feed(r, Self.fragment(offset: 32, payload: Array(data[32..<45]), more: true)) == nil)
        let whole = Self.feed(r, Self.fragment(offset: 40, payload: Array(data[40...]), more: false))
        #expect(whole.map { Array($0[20...]) } == data)
        #expect(c.joined.load(ordering: .relaxed) == 3)
        #expect(c.required.load(ordering: .relaxed) == c.joined.load(ordering: .relaxed)
                + c.duplicates.load(ordering: .relaxed) + c.failed.load(ordering: .relaxed))
        #expect(Self.pool.available == Self.pool.slotCount)
    }

    @Test("random fragments, shuffled, duplicated, shifted, cut short or mixed across datagrams: no crash, every fragment accounted for, no buffer lost, only whole datagrams come out")
    func randomizedStream() {
        let pool = PacketPool(count: 96, slotSize: 4096, headroom: 64)
        var rng = SplitMix(state: 0xf4a6_2026_1201)
        for round in 0..<300 {
            let c = IPv4ReassemblyCounters()
            let r = IPv4Reassembly(pool: pool, counters: c, timeout: 30, maxHeld: 1 + Int(rng.next() % 64))
            var originals: Set<[UInt8]> = []
            var stream: [[UInt8]] = []
            for d in 0..<(1 + Int(rng.next() % 4)) {
                let size = 29 + Int(rng.next() % 3000)
                let mtu = 68 + Int(rng.next() % 1500)
                let options = 4 * Int(rng.next() % 3)
                let whole = PacketFactory.ipv4(
                    source: "192.0.2.1", destination: "192.0.2.2", proto: 50, tos: UInt8(rng.next() % 4),
                    identification: UInt16(d + 1), dontFragment: false,
                    options: [UInt8](repeating: 1, count: options),
                    payload: PacketFactory.pattern(size - 20 - options, seed: UInt8(truncatingIfNeeded: rng.next())))
                var buf = pool.allocate()!
                _ = buf.append(contentsOf: whole)
                guard let plan = IPv4Fragmentation.plan(buf.data, count: buf.count, mtu: mtu) else {
                    pool.release(buf)
                    continue
                }
                originals.insert(whole)
                for i in 1..<plan.count {
                    var piece = pool.allocate()!
                    _ = IPv4Fragmentation.writeFragment(i, of: buf.data, plan: plan, into: &piece)
                    stream.append(piece.bytes)
                    pool.release(piece)
                }
                IPv4Fragmentation.makeFirst(&buf, plan: plan)
                stream.append(buf.bytes)
                pool.release(buf)
            }
            // Mischief: duplicates, shifted offsets, cut lengths, flipped More Fragments, a changed byte.
            let mischief = Int(rng.next() % 4)
            for _ in 0..<mischief where !stream.isEmpty {
                let i = Int(rng.next() % UInt64(stream.count))
                var f = stream[i]
                switch rng.next() % 5 {
                case 0: stream.append(f)
                case 1: f[7] = f[7] &+ UInt8(1 + rng.next() % 3)
                case 2: f.removeLast(min(f.count - Int(f[0] & 0x0f) * 4, Int(rng.next() % 9)))
                    f[2] = UInt8(f.count >> 8)
                    f[3] = UInt8(f.count & 0xff)
                case 3: f[6] ^= 0x20
                default: f[f.count - 1] ^= 0xff
                }
                stream[i] = Self.fixed(f)
            }
            stream.shuffle(using: &rng)
            var out: [[UInt8]] = []
            for f in stream {
                guard pool.available > 0 else { break }
                var b = pool.allocate()!
                _ = b.append(contentsOf: f)
                if let whole = r.take(b, now: 1_000 + UInt64(round)) {
                    out.append(whole.bytes)
                    pool.release(whole)
                }
            }
            let held = UInt64(r.heldFragments)
            #expect(c.required.load(ordering: .relaxed) == c.joined.load(ordering: .relaxed)
                    + c.failed.load(ordering: .relaxed) + c.duplicates.load(ordering: .relaxed) + held,
                    "round \(round): every fragment joined, failed, a duplicate or held")
            if mischief == 0 {
                // Nothing disturbed and room for all: every datagram sent comes out, exactly, and nothing else.
                if stream.count <= r.maxHeld {
                    #expect(Set(out) == originals, "round \(round): every datagram, whole")
                } else {
                    #expect(out.allSatisfy { originals.contains($0) }, "round \(round): only datagrams that were sent")
                }
            }
            r.releaseAll()
            #expect(pool.available == pool.slotCount, "round \(round): every buffer back")
        }
    }
}

