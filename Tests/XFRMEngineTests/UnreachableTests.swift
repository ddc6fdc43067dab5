import Testing
import XFRMCore
@testable import XFRMEngine
import XFRMPacket
import XFRMTestKit

/// The daemon's answer to output nothing protects (`Dispatcher.Rules.unreachableWhenUnprotected`): ICMP unreachable to
/// the sender, as an XFRM interface answers traffic it has no policy for (xfrmi_xmit → dst_link_failure), never
/// for what RFC 1122 §3.2.2 / RFC 4443 §2.4(e) forbid answering, and rate-limited.
@Suite("Unprotected output is answered with ICMP unreachable")
struct UnreachableTests {
    /// A dispatcher with the daemon's rules on `stack` (errors from the destination, as xfrmd sets it), its local
    /// sink and counters.
    func daemon(_ p: EnginePair, _ stack: XFRMStack) -> (Dispatcher, RecordingSink, EngineCounters) {
        stack.icmpErrorsFromDestination.store(true, ordering: .relaxed)
        let counters = EngineCounters()
        let local = RecordingSink(pool: p.pool)
        let sinks = InterfaceSinks()
        sinks.set(RecordingSink(pool: p.pool), ifindex: 2)
        return (Dispatcher(stack: stack, pool: p.pool, rules: .daemon, counters: counters, interfaces: sinks,
                           local: local), local, counters)
    }

    /// UDP from 10.0.1.1 (A's protected side) to `destination` with `size` bytes of payload.
    func udp4(to destination: String = "10.9.9.9", size: Int = 100) -> [UInt8] {
        PacketFactory.ipv4(source: "10.0.1.1", destination: destination, proto: 17,
                           payload: PacketFactory.udp(payload: PacketFactory.pattern(size)))
    }

    func run(_ d: Dispatcher, _ p: EnginePair, _ packets: [[UInt8]]) {
        var batch = PacketBatch()
        for bytes in packets {
            var buf = p.pool.allocate()!
            let fits = buf.append(contentsOf: bytes)
            #expect(fits)
            batch.append(PacketBatch.Packet(buf, stage: .output))
        }
        d.run(&batch)
    }

    @Test("IPv4: host unreachable from the destination to the sender, quoting the header and 8 bytes; not for an ICMP error, a multicast or broadcast destination, a later fragment or a loopback source")
    func ipv4() throws {
        let p = try EnginePair(tunnels: 1)
        let (d, local, counters) = self.daemon(p, p.a)
        let udp = self.udp4()
        let echo = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.9.9.9", proto: 1,
                                      payload: [8, 0, 0, 0, 0, 1, 0, 1])
        var unanswerable = [
            PacketFactory.ipv4(source: "10.0.1.1", destination: "10.9.9.9", proto: 1, payload: [3, 1, 0, 0, 0, 0, 0, 0]),
            PacketFactory.ipv4(source: "10.0.1.1", destination: "224.0.0.5", proto: 17, payload: PacketFactory.udp(payload: [1])),
            PacketFactory.ipv4(source: "10.0.1.1", destination: "255.255.255.255", proto: 17, payload: PacketFactory.udp(payload: [1])),
            PacketFactory.ipv4(source: "127.0.0.1", destination: "10.9.9.9", proto: 17, payload: PacketFactory.udp(payload: [1])),
        ]
        var later = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.9.9.9", proto: 17, dontFragment: false,
                                       payload: PacketFactory.pattern(16))
        later[7] = 2  // fragment offset 16 bytes
        later[10] = 0
        later[11] = 0
        let sum = InternetChecksum.compute(Array(later[0..<20]))
        later[10] = UInt8(sum >> 8)
        later[11] = UInt8(sum & 0xff)
        unanswerable.append(later)
        self.run(d, p, [udp, echo] + unanswerable)
        #expect(counters.unprotected.load(ordering: .relaxed) == 7)
        #expect(counters.unreachable.load(ordering: .relaxed) == 2)
        #expect(counters.delivered.load(ordering: .relaxed) == 0, "an error is not a delivery")
        let got = local.packets.withLock { $0 }
        #expect(got.count == 2)
        for (error, original) in zip(got, [udp, echo]) {
            #expect(error.count == 20 + 8 + 28)
            #expect(error[9] == 1 && Array(error[12..<16]) == [10, 9, 9, 9] && Array(error[16..<20]) == [10, 0, 1, 1])
            #expect(InternetChecksum.compute(Array(error[0..<20])) == 0, "IP header checksum")
            #expect(error[20] == 3 && error[21] == 1, "type 3 code 1, host unreachable")
            #expect(InternetChecksum.compute(Array(error[20...])) == 0, "ICMP checksum")
            #expect(Array(error[28...]) == Array(original[0..<28]))
        }
        #expect(p.pool.available == p.pool.slotCount)
    }

    @Test("IPv6: address unreachable (type 1 code 3) from the destination with a valid checksum; not for an ICMPv6 error behind an extension header, nor a multicast destination")
    func ipv6() throws {
        let p = try EnginePair(tunnels: 1, outer6: true)
        let (d, local, counters) = self.daemon(p, p.a)
        let udp = PacketFactory.ipv6(source: "2001:db8:1::1", destination: "2001:db8:9::9",
                                     payload: PacketFactory.udp(payload: PacketFactory.pattern(100)))
        let hopByHop: [UInt8] = [58, 0, 1, 4, 0, 0, 0, 0]  // next header ICMPv6, PadN
        let error = PacketFactory.ipv6(source: "2001:db8:1::1", destination: "2001:db8:9::9", nextHeader: 58,
                                       extensionHeaders: hopByHop, firstNextHeader: 0, payload: [1, 3, 0, 0, 0, 0, 0, 0])
        let group = PacketFactory.ipv6(source: "2001:db8:1::1", destination: "ff02::1",
                                       payload: PacketFactory.udp(payload: [1]))
        self.run(d, p, [udp, error, group])
        #expect(counters.unprotected.load(ordering: .relaxed) == 3)
        let got = local.packets.withLock { $0 }
        #expect(got.count == 1)
        let e = try #require(got.first)
        #expect(e.count == 40 + 8 + udp.count && e[6] == 58)
        #expect(Array(e[8..<24]) == IPAddress("2001:db8:9::9")!.bytes && Array(e[24..<40]) == IPAddress("2001:db8:1::1")!.bytes)
        #expect(e[40] == 1 && e[41] == 3)
        let length = e.count - 40
        let pseudo = Array(e[8..<40]) + [0, 0, UInt8(length >> 8), UInt8(length & 0xff), 0, 0, 0, 58]
        #expect(InternetChecksum.compute(pseudo + Array(e[40...])) == 0, "ICMPv6 checksum over the pseudo-header")
        #expect(Array(e[48...]) == udp)
    }

    @Test("a sender that is not this host gets six answers, then one a second (icmp_ratelimit); this host's own senders only meet the global burst of 50; every packet is counted")
    func rateLimited() throws {
        let p = try EnginePair(tunnels: 1)
        let (d, local, counters) = self.daemon(p, p.a)
        for _ in 0..<4 { self.run(d, p, Array(repeating: self.udp4(size: 3), count: 30)) }
        #expect(counters.unprotected.load(ordering: .relaxed) == 120)
        #expect((6...7).contains(local.count), "\(local.count)")
        // From one of A's own addresses: no per-sender limit, as the kernel's loopback route is exempt.
        try p.a.network.addAddress(IPPrefix("10.0.1.1/32")!, device: "eth0")
        let before = local.count
        let start = ContinuousClock.now
        for _ in 0..<4 { self.run(d, p, Array(repeating: self.udp4(size: 3), count: 30)) }
        // The burst, and one more a millisecond (the coarse clock moves in steps of up to 4 ms).
        let ms = Int((ContinuousClock.now - start) / .milliseconds(1))
        let answered = local.count - before
        #expect(answered == Int(counters.unreachable.load(ordering: .relaxed)) - before)
        #expect((44...50 + ms + 4).contains(answered), "\(answered) in \(ms) ms")
        #expect(p.pool.available == p.pool.slotCount)
    }

    /// How many of `n` errors `limit` lets go at `now` to `peer`.
    func allowed(_ limit: inout ICMPRateLimit, _ n: Int, at now: UInt64, to peer: IPAddress? = nil) -> Int {
        var k = 0
        for _ in 0..<n where limit.allow(now: now, peer: peer) { k += 1 }
        return k
    }

    @Test("the global bucket: 50 at once, one a millisecond after, never more than 50 after an idle spell")
    func globalBucket() {
        let ms: UInt64 = 1_000_000
        var limit = ICMPRateLimit(now: 1_000 * ms)
        let first = self.allowed(&limit, 60, at: 1_000 * ms)
        let later = self.allowed(&limit, 20, at: 1_010 * ms)
        let idle = self.allowed(&limit, 200, at: 9_000 * ms)
        let halfTick = self.allowed(&limit, 1, at: 9_000 * ms + ms / 2)
        let tick = self.allowed(&limit, 1, at: 9_001 * ms)
        #expect(first == 50 && later == 10)
        #expect(idle == 50, "capped at the burst")
        #expect(halfTick == 0 && tick == 1)
    }

    @Test("per sender: six at once, then one a second; another sender has its own; the global bucket still bounds them")
    func perSender() {
        let s: UInt64 = 1_000_000_000
        var limit = ICMPRateLimit(now: 100 * s)
        let a = IPAddress("192.0.2.10")!
        let b = IPAddress("2001:db8::10")!
        let burstA = self.allowed(&limit, 20, at: 100 * s, to: a)
        let burstB = self.allowed(&limit, 20, at: 100 * s, to: b)
        let second = self.allowed(&limit, 20, at: 101 * s, to: a)
        let twoAndAHalf = self.allowed(&limit, 20, at: 103 * s + s / 2, to: a)
        #expect(burstA == 6 && burstB == 6 && second == 1 && twoAndAHalf == 2)
        #expect(limit.tokens == 50 - 2, "tokens taken only by what was allowed, refilled meanwhile")
        var tight = ICMPRateLimit(now: 100 * s)
        let senders = (1...20).map { IPAddress("192.0.2.\($0)")! }
        let all = senders.reduce(0) { sum, peer in sum + self.allowed(&tight, 6, at: 100 * s, to: peer) }
        #expect(all == 50, "twenty senders' bursts share the global 50")
        // Senders beyond the remembered ones push out the one heard from longest ago, never another (before, slots
        // by the process's random hash could make two senders share one).
        let ms: UInt64 = 1_000_000
        let t0 = 100 * s
        var many = ICMPRateLimit(now: t0)
        let burst = self.allowed(&many, 6, at: t0, to: a)
        for k in 1..<ICMPRateLimit.peerSlots {
            _ = self.allowed(&many, 1, at: t0 + UInt64(k) * ms, to: IPAddress("10.7.0.\(k)")!)
        }
        let spent = self.allowed(&many, 1, at: t0 + 100 * ms, to: a)
        _ = self.allowed(&many, 1, at: t0 + 200 * ms, to: IPAddress("10.8.0.1")!)  // pushes out 10.7.0.1, the oldest
        let stillSpent = self.allowed(&many, 1, at: t0 + 300 * ms, to: a)
        let anew = self.allowed(&many, 6, at: t0 + 400 * ms, to: IPAddress("10.7.0.1")!)
        #expect(burst == 6 && spent == 0 && stillSpent == 0, "a stays remembered with its burst spent")
        #expect(anew == 6, "the sender pushed out starts with a full burst")
    }

    @Test("through an XFRM interface (the dispatcher's if_id), a block policy's drop and an ACQUIRE's are answered too, as xfrmi_xmit2 answers its lookup's failures; without one they are not")
    func lookupFailuresThroughAnInterface() throws {
        for ifID: UInt32 in [42, 0] {
            let p = try EnginePair(tunnels: 1)
            let (d, local, counters) = self.daemon(p, p.a)
            d.ifID = ifID
            let blocked = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.7.7.0/24")!)
            let waiting = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.8.8.0/24")!)
            let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.9"), mode: 1, reqid: 77)
            try p.a.addPolicy(Policy(selector: blocked, direction: .outbound, action: .block, ifID: ifID),
                              update: false)
            try p.a.addPolicy(Policy(selector: waiting, direction: .outbound, ifID: ifID, templates: [t]),
                              update: false)
            self.run(d, p, [self.udp4(to: "10.7.7.7"), self.udp4(to: "10.8.8.8"), self.udp4(to: "10.8.8.8")])
            #expect(p.a.statistics[.outPolBlock] == 1 && p.a.statistics[.outNoStates] == 2)
            #expect(counters.unprotected.load(ordering: .relaxed) == 0, "protected by policy: not unprotected")
            let answered = ifID == 0 ? 0 : 3
            #expect(local.count == answered && counters.unreachable.load(ordering: .relaxed) == UInt64(answered))
            for e in local.packets.withLock({ $0 }) { #expect(e[20] == 3 && e[21] == 1) }
            #expect(p.pool.available == p.pool.slotCount)
        }
    }

    @Test("the PMTU error of a daemon's stack comes from the destination too (the kernel drops its own address coming in through the TUN)")
    func packetTooBigFromDestination() throws {
        let p = try EnginePair(tunnels: 1)
        let (d, local, _) = self.daemon(p, p.a)
        self.run(d, p, [self.udp4(to: "10.1.1.1", size: 1460)])
        let got = local.packets.withLock { $0 }
        let e = try #require(got.first)
        #expect(e[20] == 3 && e[21] == 4)
        #expect(Array(e[12..<16]) == [10, 1, 1, 1] && Array(e[16..<20]) == [10, 0, 1, 1])
    }
}
