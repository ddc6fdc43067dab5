import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// `XFRMStack.process` protects a run of consecutive packets of one flow in one acquisition of their SA's lock.
/// A run may only save work: every packet must come out — verdict, bytes, xfrm_stat counters, the SA's curlft,
/// the events — exactly as if it had gone through the stack alone. Each test runs the same packets through two
/// identical pairs of hosts, one batch on one and one call per packet on the other, and compares everything.
@Suite("Batch runs: one SA lock for consecutive packets changes no packet's outcome")
struct BatchRunTests {
    /// One packet of a mixed batch: its bytes and the stage it enters (`.input` packets arrive on eth0).
    typealias Entry = (bytes: [UInt8], stage: PacketBatch.Stage)

    /// What a host shows after the packets: verdicts, bytes, counters, events and its SAs' state.
    struct Outcome: Equatable {
        var verdicts: [PacketBatch.Verdict] = []
        var bytes: [[UInt8]] = []
        var stat = ""
        var events: [String] = []
        var states: [String] = []
    }

    /// Runs `entries` through `h.a` (or `h.b`) as one batch (`batch`) or one call per packet, then reads the outcome.
    static func run(_ h: TwoHosts, _ entries: [Entry], batch: Bool, atB: Bool) -> Outcome {
        let (stack, events) = atB ? (h.b, h.eventsB) : (h.a, h.eventsA)
        _ = events.drain()
        // The SAs taken before the packets: one that expires meanwhile leaves the SAD, but its curlft still counts.
        var sas: [(UInt32, SecurityAssociation)] = []
        for spi: UInt32 in [0x1001, 0x2002, 0x3003, 0x5005] {
            for dst in ["192.0.2.1", "192.0.2.2"] {
                if let sa = stack.states.lookup(SAID(destination: IPAddress(dst)!, spi: spi)) { sas.append((spi, sa)) }
            }
        }
        var o = Outcome()
        if batch {
            let pool = PacketPool(count: entries.count, slotSize: 2048, headroom: 256)
            var b = PacketBatch(capacity: entries.count)
            for e in entries {
                var buffer = pool.allocate()!
                precondition(buffer.append(contentsOf: e.bytes))
                precondition(b.append(PacketBatch.Packet(buffer, stage: e.stage, ifindex: e.stage == .input ? 2 : 0)))
            }
            stack.process(&b)
            for i in 0..<b.count {
                o.verdicts.append(b[i].verdict)
                o.bytes.append(b[i].buffer.bytes)
                pool.release(b[i].buffer)
            }
        } else {
            for e in entries {
                let (verdict, bytes) = h.buffers.with(e.bytes) { buffer -> PacketBatch.Verdict in
                    if e.stage == .input {
                        var decapsulated = false
                        let r = stack.input(&buffer, ifindex: 2, decapsulated: &decapsulated)
                        return .input(r, decapsulated: decapsulated)
                    }
                    var transformed = false
                    let r = stack.output(&buffer, forwarded: e.stage == .forward, transformed: &transformed)
                    return .output(r, transformed: transformed)
                }
                o.verdicts.append(verdict)
                o.bytes.append(bytes)
            }
        }
        o.stat = stack.statistics.procText()
        o.events = events.drain().map { e in
            switch e {
            case .expire(let sa, let hard): "expire \(String(sa.id.spi, radix: 16)) hard=\(hard)"
            case .acquire(let state, _, _): "acquire to \(state.id.destination)"
            default: "\(e)"
            }
        }
        for (spi, sa) in sas {
            let c = sa.current
            let inSAD = stack.states.lookup(sa.id) === sa
            o.states.append("\(String(spi, radix: 16)) \(inSAD ? "" : "deleted ")\(sa.isDying ? "dying" : "live") "
                            + "bytes=\(c.bytes) packets=\(c.packets) used=\(c.useTime) stats=\(sa.stats)")
        }
        return o
    }

    /// The same packets through two identical pairs of hosts: batch and per packet must agree in everything.
    /// `warmup`: packets that go first, as a batch of their own (per packet on the other pair), so that the
    /// input cache already holds their flows' verdicts when the batch under test starts.
    static func expectSameOutcome(_ entries: [Entry], atB: Bool = false, warmup: [Entry] = [],
                                  setup: (TwoHosts) throws -> Void,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws -> Outcome {
        let batched = try TwoHosts()
        let single = try TwoHosts()
        try setup(batched)
        try setup(single)
        batched.clock.advance(by: 7)
        single.clock.advance(by: 7)
        if !warmup.isEmpty {
            let (wb, ws) = (Self.run(batched, warmup, batch: true, atB: atB), Self.run(single, warmup, batch: false, atB: atB))
            #expect(wb == ws, "the warm-up batch", sourceLocation: sourceLocation)
        }
        let b = Self.run(batched, entries, batch: true, atB: atB)
        let s = Self.run(single, entries, batch: false, atB: atB)
        #expect(b.verdicts == s.verdicts, sourceLocation: sourceLocation)
        // ESP's IVs differ between two SAs (each draws its own), so protected packets are compared by their
        // headers and what they decrypt to.
        let openers = try [b, s].map { _ in
            try ESPTransform(ESPConfig(
                spi: 0x1001, mode: .tunnel,
                crypto: ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: TwoHosts.key, icvBits: 128),
                tunnelSource: IPAddress("192.0.2.1"), tunnelDestination: IPAddress("192.0.2.2"), replayWindow: 4096))
        }
        for i in 0..<min(b.bytes.count, s.bytes.count) {
            var (x, y) = (b.bytes[i], s.bytes[i])
            if x.count > 28 && x.count == y.count && x[0] == 0x45 && x[9] == 50 && y[9] == 50 {
                #expect(x.prefix(28) == y.prefix(28), "packet \(i): outer header, SPI or sequence", sourceLocation: sourceLocation)
                (x, y) = (Self.open(x, with: openers[0]), Self.open(y, with: openers[1]))
            }
            if x != y { Issue.record("packet \(i): batch and per-packet bytes differ", sourceLocation: sourceLocation) }
        }
        #expect(b.stat == s.stat, sourceLocation: sourceLocation)
        #expect(b.events == s.events, sourceLocation: sourceLocation)
        #expect(b.states == s.states, sourceLocation: sourceLocation)
        return b
    }

    /// The inner packet of A's ESP packet to B (or an empty array when it does not open).
    static func open(_ wire: [UInt8], with opener: ESPTransform) -> [UInt8] {
        let buffers = TestBuffers()
        let (r, inner) = buffers.with(wire) { opener.decapsulate(&$0) }
        return r == .delivered ? inner : []
    }

    static func outbound(_ packets: [[UInt8]]) -> [Entry] { packets.map { ($0, .output) } }

    @Test("a run of one flow: the same ciphertext, curlft and use time as one packet at a time")
    func plainRun() throws {
        let h = try TwoHosts()
        let o = try Self.expectSameOutcome(Self.outbound(Array(repeating: h.packet(), count: 40))) { try $0.tunnel() }
        #expect(o.verdicts.allSatisfy { $0 == .output(.transmit(ifindex: 2), transformed: true) })
        #expect(o.states.contains { $0.hasPrefix("1001 live bytes=\(40 * 128) packets=40 used=1704067207 ") }, "\(o.states)")
    }

    @Test("soft and hard packet limits crossed inside a run: the EXPIREs and the drops land on the same packets")
    func limitsInsideARun() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softPacketLimit = 10
        l.hardPacketLimit = 25
        let o = try Self.expectSameOutcome(Self.outbound(Array(repeating: h.packet(), count: 40))) {
            try $0.tunnel(lifetime: l)
        }
        #expect(o.verdicts.prefix(25).allSatisfy { $0 == .output(.transmit(ifindex: 2), transformed: true) })
        #expect(o.verdicts[25] == .output(.dropped(.outStateExpired), transformed: false))
        #expect(o.events.prefix(2) == ["expire 1001 hard=false", "expire 1001 hard=true"])
    }

    @Test("soft and hard byte limits crossed inside a run")
    func byteLimitsInsideARun() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softByteLimit = 1_000
        l.hardByteLimit = 3_000
        let sizes = [100, 20, 300, 64, 900, 5, 100, 100, 100, 400, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64]
        _ = try Self.expectSameOutcome(Self.outbound(sizes.map { h.packet(size: $0) })) { try $0.tunnel(lifetime: l) }
    }

    @Test("the sequence number running out inside a run: the same packets leave, the rest count XfrmOutStateSeqError")
    func sequenceOverflowInsideARun() throws {
        let h = try TwoHosts()
        let o = try Self.expectSameOutcome(Self.outbound(Array(repeating: h.packet(), count: 30))) { h in
            try h.tunnel()
            let sa = h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001))!
            #expect(sa.transform!.setOutboundSequence(0xffff_fff0))
        }
        #expect(o.verdicts.prefix(15).allSatisfy { $0 == .output(.transmit(ifindex: 2), transformed: true) })
        #expect(o.verdicts[15] != .output(.transmit(ifindex: 2), transformed: true))
        #expect(o.stat.contains("XfrmOutStateSeqError    \t15\n"))
    }

    @Test("oversized packets between small ones: DF gets the ICMP error, no DF is dropped, the run resumes after")
    func oversizedPacketsBreakTheRun() throws {
        let h = try TwoHosts()
        let small = h.packet()
        let bigDF = h.packet(size: 1_460)
        let big = h.packet(size: 1_460, df: false)
        let o = try Self.expectSameOutcome(Self.outbound([small, small, bigDF, small, small, big, small, bigDF, bigDF,
                                                          small])) { try $0.tunnel() }
        #expect(o.verdicts[2] == .output(.icmpError, transformed: false))
        #expect(o.verdicts[9] == .output(.transmit(ifindex: 2), transformed: true))
    }

    @Test("output runs take only the memo's flow: another port or protocol, fragment bits, a bad checksum or options end them")
    func outputRunsRecognizeOnlyTheirFlow() throws {
        let h = try TwoHosts()
        func with(_ p: [UInt8], checksum: Bool = true, _ change: (inout [UInt8]) -> Void) -> [UInt8] {
            var q = p
            change(&q)
            if checksum { q.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: Int($0[0] & 0xf) * 4) } }
            return q
        }
        let f = h.packet(size: 80)
        let otherPort = with(f) { $0[23] ^= 1 }
        let tcp = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 6,
                                     payload: Array(PacketFactory.udp(payload: PacketFactory.pattern(80)).prefix(8)) + PacketFactory.pattern(92))
        let mf = with(f) { $0[6] |= 0x20 }
        let offset = with(f) { $0[7] = 3 }
        let badChecksum = with(f, checksum: false) { $0[10] ^= 0x01 }
        let noDF = h.packet(size: 80, df: false)
        let options = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17, options: [1, 1, 1, 0],
                                         payload: PacketFactory.udp(payload: PacketFactory.pattern(80)))
        let batch = [f, f, otherPort, f, f, tcp, f, mf, f, offset, f, badChecksum, f, f, noDF, f, options, f, f]
        let o = try Self.expectSameOutcome(Self.outbound(batch)) { try $0.tunnel() }
        #expect(o.verdicts[11] == .output(.dropped(.outError), transformed: false), "a bad header checksum")
        #expect(o.verdicts.filter { $0 == .output(.transmit(ifindex: 2), transformed: true) }.count >= 15)
    }

    @Test("flows, stages and SAs interleaved in one batch: every packet as if alone")
    func mixedBatch() throws {
        let h = try TwoHosts()
        try h.tunnel()
        // B's replies to A through SA 0x2002, for A's input.
        var replies: [[UInt8]] = []
        for i in 0..<6 {
            let reply = PacketFactory.ipv4(source: "10.0.2.1", destination: "10.0.1.\(1 + i % 2)", proto: 17,
                                           payload: PacketFactory.udp(payload: PacketFactory.pattern(60 + i)))
            let (r, wire) = h.send(reply, from: h.b)
            #expect(r == .transmit(ifindex: 2))
            replies.append(wire)
        }
        let a = h.packet()
        let other = h.packet(from: "10.0.1.7", size: 300)
        let outside = h.packet(to: "10.0.3.1")  // no policy: leaves in clear (not transformed)
        let entries: [Entry] = [(a, .output), (a, .output), (replies[0], .input), (a, .output), (other, .output),
                                (other, .forward), (a, .forward), (a, .output), (outside, .output), (a, .output),
                                (replies[1], .input), (replies[2], .input), (a, .output), (a, .output),
                                (replies[2], .input), (a, .output), (other, .output), (other, .output)]
        let o = try Self.expectSameOutcome(entries) { h in
            try h.tunnel()
            try h.a.network.addRoute(IPPrefix("10.0.3.0/24")!, device: "eth0", via: IPAddress("192.0.2.2"))
        }
        #expect(o.verdicts[2] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[14] == .input(.dropped(.inStateSeqError), decapsulated: false), "the replayed reply")
    }

    @Test("one IPv6 flow sent and forwarded in turns: a policy on `dev eth0` blocks only the forwarded packets, runs take only their own stage")
    func localAndForwardedIPv6() throws {
        let sel6 = Selector(family: 6, source: IPPrefix("2001:db8:a::/64")!, destination: IPPrefix("2001:db8:b::/64")!)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let setup: (TwoHosts) throws -> Void = { h in
            try h.tunnel()
            try h.a.network.addAddress(IPPrefix("2001:db8::1/64")!, device: "eth0")
            try h.a.network.addRoute(IPPrefix("2001:db8:b::/64")!, device: "eth0", via: IPAddress("2001:db8::2"))
            let eth0 = h.a.network.egress(to: IPAddress("2001:db8:b::1")!)!.ifindex
            var onEth0 = sel6
            onEth0.ifindex = eth0
            // A local IPv6 packet's flow has no interface (flowi6_oif 0): only forwarded packets meet this policy.
            try h.a.addPolicy(Policy(selector: onEth0, direction: .outbound, action: .block, priority: 1), update: false)
            try h.a.addPolicy(Policy(selector: sel6, direction: .outbound, priority: 5, templates: [t]), update: false)
        }
        let p = PacketFactory.ipv6(source: "2001:db8:a::1", destination: "2001:db8:b::1",
                                   payload: PacketFactory.udp(payload: PacketFactory.pattern(40)))
        let stages: [PacketBatch.Stage] = [.output, .output, .output, .forward, .forward, .output, .output, .forward]
        let o = try Self.expectSameOutcome(stages.map { (p, $0) }, setup: setup)
        for (i, stage) in stages.enumerated() {
            let expected: PacketBatch.Verdict = stage == .forward
                ? .output(.dropped(.outPolBlock), transformed: false) : .output(.transmit(ifindex: 2), transformed: true)
            #expect(o.verdicts[i] == expected, "packet \(i) (\(stage))")
        }
    }

    // MARK: - Input runs (at B, packets A sent through SA 0x1001)

    /// A's ESP packets for `inner`, from a separate pair of hosts with the same keys.
    static func sent(_ inner: [[UInt8]], lifetime: LifetimeConfig = LifetimeConfig(), natt: Bool = false,
                     setup: (TwoHosts) throws -> Void = { _ in }) throws -> [[UInt8]] {
        let sender = try TwoHosts()
        try setup(sender)  // first: its policies outrank the tunnel's at the same priority
        try sender.tunnel(lifetime: LifetimeConfig(), natt: natt)
        return inner.map { p in
            let (r, wire) = sender.send(p)
            #expect(r == .transmit(ifindex: 2))
            return wire
        }
    }

    static func inbound(_ packets: [[UInt8]]) -> [Entry] { packets.map { ($0, .input) } }

    @Test("a run of received packets: delivered and forwarded as one at a time, the same curlft and counters")
    func plainInputRun() throws {
        let h = try TwoHosts()
        let wire = try Self.sent((0..<40).map { h.packet(to: $0 % 10 == 9 ? "10.0.2.5" : "10.0.2.1", size: 50 + $0) })
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { try $0.tunnel() }
        #expect(o.verdicts[0] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[9] == .input(.forward, decapsulated: true))
        #expect(o.verdicts.filter { $0 == .input(.deliver, decapsulated: true) }.count == 36)
    }

    @Test("with the flows' verdicts cached, runs deliver, forward, decrement TTLs and drop TTL 1 as one at a time")
    func runsWithCachedVerdicts() throws {
        let h = try TwoHosts()
        let f = h.packet(size: 60)  // delivered (10.0.2.1 is B's)
        let g = h.packet(to: "10.0.2.5", size: 70)  // forwarded
        let gLast = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.5", proto: 17, ttl: 1,
                                       payload: PacketFactory.udp(payload: PacketFactory.pattern(70)))
        let gOtherPort = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.5", proto: 17,
                                            payload: PacketFactory.udp(destinationPort: 5679, payload: PacketFactory.pattern(70)))
        // Inner UDP to 4500 carrying what looks like ESP of an unknown SPI: the run must end after it.
        let natt = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                      payload: PacketFactory.udp(sourcePort: 4500, destinationPort: 4500,
                                                                 payload: [0, 0, 0x77, 0x77] + PacketFactory.pattern(12)))
        let inner = [f, g] + [f, f, f, g, g, gOtherPort, natt, g, g, gLast, g, f, f, gLast, natt, f]
        let wire = try Self.sent(inner)
        let o = try Self.expectSameOutcome(Self.inbound(Array(wire.dropFirst(2))), atB: true,
                                           warmup: Self.inbound(Array(wire.prefix(2)))) { try $0.tunnel() }
        #expect(o.verdicts[0] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[3] == .input(.forward, decapsulated: true))
        #expect(o.verdicts[9] == .input(.dropped(nil), decapsulated: true), "TTL 1 is not forwarded")
        #expect(o.bytes[3][8] == 63, "the forwarded packet's TTL")
        #expect(o.verdicts.filter { $0 == .input(.forward, decapsulated: true) }.count == 6)
    }

    @Test("NAT-T: packets from a moved endpoint inside input runs are delivered and told (XFRM_MSG_MAPPING) as one at a time")
    func nattMappingInRuns() throws {
        let h = try TwoHosts()
        let wire = try Self.sent((0..<12).map { h.packet(size: 40 + $0) }, natt: true)
        let moved = wire.enumerated().map { i, w in
            (3...5).contains(i) || i == 9 ? NATMappingTests.natted(w, port: 31337) : w
        }
        let o = try Self.expectSameOutcome(Self.inbound(moved), atB: true) { try $0.tunnel(natt: true) }
        #expect(o.verdicts.allSatisfy { $0 == .input(.deliver, decapsulated: true) }, "\(o.verdicts)")
        #expect(o.events.filter { $0.hasPrefix("mapping") }.count == 4, "\(o.events)")
    }

    @Test("ESP in UDP 4500: runs with replays, a corrupted ICV, IKE, a keepalive, raw ESP and a bad UDP length between them, as one at a time")
    func nattInputRun() throws {
        let h = try TwoHosts()
        var wire = try Self.sent((0..<16).map { h.packet(size: 40 + $0) }, natt: true)
        #expect(wire[0][9] == 17 && wire[0][22] == 0x11 && wire[0][23] == 0x94, "not ESP in UDP 4500")
        var corrupt = wire[5]
        corrupt[corrupt.count - 1] ^= 0x40
        let ike = PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 17, payload:
            PacketFactory.udp(sourcePort: 4500, destinationPort: 4500, payload: [0, 0, 0, 0] + PacketFactory.pattern(20)))
        let keepalive = PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 17,
                                           payload: PacketFactory.udp(sourcePort: 4500, destinationPort: 4500, payload: [0xff]))
        // The same ESP as raw ESP: the SA wants UDP, so an encapsulation mismatch.
        var raw = Array(wire[8].prefix(20)) + Array(wire[8].dropFirst(28))
        raw[9] = 50
        raw[2] = UInt8(raw.count >> 8)
        raw[3] = UInt8(raw.count & 0xff)
        raw.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: 20) }
        var shortUDP = wire[10]  // a UDP length 4 bytes short of the packet: classify trims, the ICV then fails
        shortUDP[25] -= 4
        wire = [wire[0], wire[1], wire[2], wire[1], wire[3], wire[4], corrupt, wire[5], ike, wire[6], keepalive,
                wire[7], raw, wire[9], shortUDP, wire[11], wire[12], wire[13], wire[14], wire[15]]
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { try $0.tunnel(natt: true) }
        #expect(o.verdicts[0] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[3] == .input(.dropped(.inStateSeqError), decapsulated: false))
        #expect(o.verdicts[8] == .input(.ike, decapsulated: false))
        #expect(o.verdicts[12] == .input(.dropped(.inStateMismatch), decapsulated: false), "raw ESP for a UDP SA")
        #expect(o.verdicts.filter { $0 == .input(.deliver, decapsulated: true) }.count == 14)
    }

    @Test("replays, a corrupted ICV and a short packet inside a run: each dropped and counted as alone")
    func inputDropsInsideARun() throws {
        let h = try TwoHosts()
        var wire = try Self.sent((0..<12).map { _ in h.packet() })
        var corrupt = wire[6]
        corrupt[corrupt.count - 1] ^= 0x40
        var short = wire[8]
        short.removeLast(30)
        short[2] = UInt8((short.count >> 8) & 0xff)
        short[3] = UInt8(short.count & 0xff)
        wire = [wire[0], wire[1], wire[2], wire[1], wire[3], wire[4], corrupt, wire[6], wire[5], short, wire[7],
                wire[0], wire[9], wire[10], wire[11], wire[11]]
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { try $0.tunnel() }
        #expect(o.verdicts[3] == .input(.dropped(.inStateSeqError), decapsulated: false))
        #expect(o.verdicts[6] == .input(.dropped(.inStateProtoError), decapsulated: false))
        #expect(o.verdicts[7] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[15] == .input(.dropped(.inStateSeqError), decapsulated: false))
    }

    @Test("soft and hard packet limits crossed inside an input run: the EXPIREs and drops land on the same packets")
    func inputLimitsInsideARun() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softPacketLimit = 7
        l.hardPacketLimit = 19
        let wire = try Self.sent((0..<30).map { _ in h.packet() })
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { try $0.tunnel(lifetime: l) }
        #expect(o.verdicts.prefix(19).allSatisfy { $0 == .input(.deliver, decapsulated: true) })
        #expect(o.verdicts[19] == .input(.dropped(.inStateExpired), decapsulated: false))
        #expect(o.events.prefix(2) == ["expire 1001 hard=false", "expire 1001 hard=true"])
    }

    @Test("flows outside B's policy, another SA, another outer destination and plain packets inside input runs")
    func mixedInputBatch() throws {
        let h = try TwoHosts()
        let t3 = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 3)
        let narrow = Selector(family: 4, source: IPPrefix("10.0.1.9/32")!, destination: IPPrefix("10.0.2.0/24")!)
        let outside = Selector(family: 4, source: IPPrefix("10.0.7.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let addSA3: (TwoHosts) throws -> Void = { h in
            try h.a.addPolicy(Policy(selector: narrow, direction: .outbound, templates: [t3]), update: false)
            try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x3003, reqid: 3, on: h.a))
            let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
            try h.a.addPolicy(Policy(selector: outside, direction: .outbound, templates: [t]), update: false)
        }
        let inner = [h.packet(), h.packet(), h.packet(from: "10.0.7.1"), h.packet(), h.packet(from: "10.0.1.9"),
                     h.packet(), h.packet(from: "10.0.1.9"), h.packet(from: "10.0.1.9"), h.packet(),
                     h.packet(from: "10.0.7.1"), h.packet(from: "10.0.7.1"), h.packet()]
        let wire = try Self.sent(inner, setup: addSA3)
        #expect(wire.map { BatchMemoTests.spi($0) } == inner.map { $0[15] == 9 ? 0x3003 : 0x1001 })
        // A clear packet to B and an ESP packet for another outer address in the middle of runs.
        let clear = h.packet(from: "192.0.2.1", to: "192.0.2.2")
        var elsewhere = wire[1]
        elsewhere[19] = 9  // 192.0.2.9: not B's, so forwarded as transit (no route: dropped)
        elsewhere[10] = 0
        elsewhere[11] = 0
        let sum = InternetChecksum.compute(Array(elsewhere.prefix(20)))
        elsewhere[10] = UInt8(sum >> 8)
        elsewhere[11] = UInt8(sum & 0xff)
        let entries = Self.inbound([wire[0], wire[1], wire[2], wire[3], clear, wire[4], wire[5], elsewhere, wire[6],
                                    wire[7], wire[8], wire[9], wire[10], wire[11]])
        let o = try Self.expectSameOutcome(entries, atB: true) { h in
            try h.tunnel()
            try h.b.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x3003, reqid: 3, on: h.b))
        }
        #expect(o.verdicts[1] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[2] != .input(.deliver, decapsulated: true), "10.0.7.1 is outside B's IN policy")
        #expect(o.verdicts[12] != .input(.deliver, decapsulated: true))
        #expect(o.verdicts[13] == .input(.deliver, decapsulated: true))
    }

    // MARK: - Run boundaries

    @Test("64 packets of 1,400 bytes each way: runs split at the byte limit, every packet as if alone")
    func runsSplitAtTheByteLimit() throws {
        let h = try TwoHosts()
        let big = Array(repeating: h.packet(size: 1_372), count: 64)
        #expect(big[0].count == 1_400)
        let out = try Self.expectSameOutcome(Self.outbound(big)) { try $0.tunnel() }
        #expect(out.verdicts.allSatisfy { $0 == .output(.transmit(ifindex: 2), transformed: true) })
        let wire = try Self.sent(big)
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { try $0.tunnel() }
        #expect(o.verdicts.allSatisfy { $0 == .input(.deliver, decapsulated: true) })
        #expect(o.states.contains { $0.hasPrefix("1001 live bytes=\(64 * 1_400) packets=64 ") }, "\(o.states)")
    }

    @Test("transport mode both ways: curlft counts the payload, as one packet at a time")
    func transportModeRuns() throws {
        let transport: (TwoHosts) throws -> Void = { h in
            let sel = Selector(family: 4, source: IPPrefix("192.0.2.1/32")!, destination: IPPrefix("192.0.2.2/32")!)
            let t = Template(source: nil, destination: nil, mode: 0, reqid: 5)
            try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
            try h.b.addPolicy(Policy(selector: sel, direction: .inbound, templates: [t]), update: false)
            for s in [h.a, h.b] {
                try s.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x5005, mode: .transport, reqid: 5, on: s))
            }
        }
        let h = try TwoHosts()
        let packets = (0..<20).map { h.packet(from: "192.0.2.1", to: "192.0.2.2", size: 40 + $0) }
        let out = try Self.expectSameOutcome(Self.outbound(packets), setup: transport)
        #expect(out.verdicts.allSatisfy { $0 == .output(.transmit(ifindex: 2), transformed: true) }, "\(out.verdicts)")
        let wire = try Self.sent(packets, setup: transport)
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true, setup: transport)
        #expect(o.verdicts.allSatisfy { $0 == .input(.deliver, decapsulated: true) }, "\(o.verdicts)")
    }

    @Test("ESP inside ESP through the same SA: the inner layer is checked before the next outer packet opens")
    func nestedLayerBeforeTheNextOuterPacket() throws {
        // A's SA 0x1001 also tunnels A's own ESP packets to B (192.0.2.1 → 192.0.2.2), so a packet's inner layer goes
        // through the same SA as its outer one. After a plain packet (sequence 1, which starts a run), the inner
        // packet is sealed (2) and its ICV then damaged; the outer packet around it gets 3, and the next outer
        // packet 64: past a 32-packet window from 2. One packet at a time, the inner layer is checked before 64
        // arrives, so it fails its ICV (XfrmInStateProtoError); checked after, it would be too old (SeqError).
        let h = try TwoHosts()
        let nested: (TwoHosts) throws -> Void = { h in
            let sel = Selector(family: 4, source: IPPrefix("192.0.2.1/32")!, destination: IPPrefix("192.0.2.2/32")!)
            let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
            try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        }
        let sender = try TwoHosts()
        try nested(sender)
        try sender.tunnel()
        let plain = sender.send(h.packet()).1
        var inner = sender.send(h.packet()).1
        inner[inner.count - 1] ^= 1
        let (r1, first) = sender.send(inner)
        #expect(r1 == .transmit(ifindex: 2))
        for _ in 0..<60 { _ = sender.send(h.packet()) }
        let (r2, far) = sender.send(h.packet())
        #expect(r2 == .transmit(ifindex: 2))
        #expect(Array(far[24..<28]) == [0, 0, 0, 64])
        let o = try Self.expectSameOutcome(Self.inbound([plain, first, far, far]), atB: true) { try $0.tunnel() }
        #expect(o.verdicts[0] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[1] == .input(.dropped(.inStateProtoError), decapsulated: false))
        #expect(o.verdicts[2] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[3] == .input(.dropped(.inStateSeqError), decapsulated: false))
    }

    @Test("a crypto-offload bundle takes no run: every packet is left for the device, as one at a time")
    func cryptoOffloadBundlesTakeNoRun() throws {
        let cryptoOffload: (TwoHosts) throws -> Void = { h in
            try h.a.attachDevice(FakeOffloadDevice(), ifindex: 2)
            try h.tunnel()
            let id = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)
            let config = h.a.states.lookup(id)!.currentConfig
            try h.a.deleteState(id, mark: Mark())
            try h.a.addState(try h.a.makeSA(config), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        }
        let h = try TwoHosts()
        let o = try Self.expectSameOutcome(Self.outbound(Array(repeating: h.packet(), count: 20)), setup: cryptoOffload)
        for v in o.verdicts {
            guard case .output(.offload(ifindex: 2, _), transformed: true) = v else {
                Issue.record("expected crypto offload, got \(v)")
                continue
            }
        }
    }

    @Test("IPv6 inside the IPv4 tunnel: TCP, ICMPv6, UDP, UDP to the NAT-T port, extension headers, as one at a time")
    func ipv6InnerPacketsInRuns() throws {
        let sel6 = Selector(family: 6, source: IPPrefix("2001:db8:a::/64")!, destination: IPPrefix("2001:db8:b::/64")!)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let v6: (TwoHosts) throws -> Void = { h in
            try h.a.addPolicy(Policy(selector: sel6, direction: .outbound, templates: [t]), update: false)
            for d in [PolicyDirection.inbound, .forward] {
                try h.b.addPolicy(Policy(selector: sel6, direction: d, templates: [t]), update: false)
            }
            try h.b.network.addAddress(IPPrefix("2001:db8:b::1/64")!, device: "lan0")
        }
        func ip6(_ nh: UInt8, to: String = "2001:db8:b::1", ext: [UInt8] = [], payload: [UInt8]) -> [UInt8] {
            PacketFactory.ipv6(source: "2001:db8:a::1", destination: to, nextHeader: nh, extensionHeaders: ext,
                               firstNextHeader: ext.isEmpty ? nil : 0, payload: payload)
        }
        let tcp = ip6(6, payload: PacketFactory.pattern(60))
        let icmp = ip6(58, to: "2001:db8:b::9", payload: [128, 0, 0, 0] + PacketFactory.pattern(20))
        let udp = ip6(17, payload: PacketFactory.udp(payload: PacketFactory.pattern(30)))
        let natt = ip6(17, payload: PacketFactory.udp(sourcePort: 4500, destinationPort: 4500, payload: [0, 0, 0x10, 1]
                                                      + PacketFactory.pattern(30)))
        let hopByHop = ip6(17, ext: [17, 0, 1, 4, 0, 0, 0, 0], payload: PacketFactory.udp(payload: PacketFactory.pattern(8)))
        let empty = ip6(6, payload: [])  // payload length 0
        let inner = [tcp, tcp, icmp, udp, tcp, natt, tcp, tcp, hopByHop, udp, udp, empty, icmp, tcp]
        let wire = try Self.sent(inner, setup: v6)
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { h in
            try v6(h)
            try h.tunnel()
        }
        #expect(o.verdicts[1] == .input(.deliver, decapsulated: true), "\(o.verdicts)")
        #expect(o.verdicts[2] == .input(.forward, decapsulated: true), "\(o.verdicts)")
    }

    @Test("after an allowed flow, the same SA carries flows differing only in port, protocol or fragment bits")
    func memoizedVerdictIsPerFlow() throws {
        // B refuses UDP to port 9999 and TCP from 10.0.1.0/24 (block policies ahead of the tunnel's IN policy).
        let blocks: (TwoHosts) throws -> Void = { h in
            let base = (IPPrefix("10.0.1.0/24")!, IPPrefix("10.0.2.0/24")!)
            for sel in [Selector(family: 4, source: base.0, destination: base.1, proto: 17, destinationPort: 9999,
                                 destinationPortMask: 0xffff),
                        Selector(family: 4, source: base.0, destination: base.1, proto: 6)] {
                try h.b.addPolicy(Policy(selector: sel, direction: .inbound, action: .block), update: false)
            }
        }
        let h = try TwoHosts()
        let allowed = h.packet()
        let otherPort = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                           payload: PacketFactory.udp(destinationPort: 9999, payload: PacketFactory.pattern(100)))
        let tcp = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 6,
                                     payload: [0x04, 0xd2, 0x16, 0x2e] + PacketFactory.pattern(100))
        var fragment = allowed  // the same ports, MF set: no raw key, decided by its parsed flow
        fragment[6] |= 0x20
        (fragment[10], fragment[11]) = (0, 0)
        let sum = InternetChecksum.compute(Array(fragment.prefix(20)))
        (fragment[10], fragment[11]) = (UInt8(sum >> 8), UInt8(sum & 0xff))
        let inner = [allowed, allowed, allowed, otherPort, allowed, allowed, tcp, allowed, fragment, allowed, otherPort]
        let wire = try Self.sent(inner)
        let o = try Self.expectSameOutcome(Self.inbound(wire), atB: true) { h in
            try blocks(h)
            try h.tunnel()
        }
        #expect(o.verdicts[2] == .input(.deliver, decapsulated: true))
        #expect(o.verdicts[3] != .input(.deliver, decapsulated: true), "UDP to 9999 is blocked")
        #expect(o.verdicts[6] != .input(.deliver, decapsulated: true), "TCP is blocked")
        #expect(o.verdicts[10] != .input(.deliver, decapsulated: true), "UDP to 9999 is blocked")
        #expect(o.verdicts[9] == .input(.deliver, decapsulated: true))
    }
}
