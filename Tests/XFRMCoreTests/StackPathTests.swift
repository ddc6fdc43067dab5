import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

@Suite("Output and input paths")
struct StackPathTests {
    @Test("tunnel traffic is encrypted by A, decrypted and accepted by B, and back")
    func tunnelRoundTrip() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet()
        let (r, wire) = h.send(inner)
        #expect(r == .transmit(ifindex: 2))
        #expect(wire[9] == 50)
        #expect(Array(wire[12..<20]) == [192, 0, 2, 1, 192, 0, 2, 2])
        let (r2, back) = h.receive(wire)
        #expect(r2 == .deliver)
        #expect(back == inner)
        let reply = h.packet(from: "10.0.2.1", to: "10.0.1.1")
        let (r3, wire2) = h.send(reply, from: h.b)
        #expect(r3 == .transmit(ifindex: 2))
        #expect(Array(wire2[20..<24]) == [0, 0, 0x20, 0x02])
        let (r4, back2) = h.receive(wire2, at: h.a)
        #expect(r4 == .deliver)
        #expect(back2 == reply)
    }

    @Test("a decrypted packet for the host itself is delivered after the IN template check")
    func localDelivery() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet(to: "10.0.2.1")
        let (_, wire) = h.send(inner)
        let (r, back) = h.receive(wire)
        #expect(r == .deliver)
        #expect(back == inner)
        #expect(h.b.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001))!.current.packets == 1)
    }

    @Test("a forwarded packet passes the FWD policy and has its TTL decremented")
    func forwarded() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let inner = h.packet(to: "10.0.2.77")
        let (_, wire) = h.send(inner)
        let (r, back) = h.receive(wire)
        #expect(r == .forward)
        #expect(back[8] == inner[8] - 1)
        #expect(InternetChecksum.compute(Array(back[0..<20])) == 0)
    }

    @Test("a packet that needed protection but arrived in clear is dropped as XfrmInTmplMismatch")
    func clearWhereProtectionRequired() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let (r, _) = h.receive(h.packet(to: "10.0.2.1"))
        #expect(r == .dropped(.inTmplMismatch))
        #expect(h.b.statistics[.inTmplMismatch] == 1)
    }

    @Test("a tunnel-mode SA with no inbound policy is XfrmInNoPols")
    func noPolicy() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let (_, wire) = h.send(h.packet())
        h.b.flushPolicies()
        let (r, _) = h.receive(wire)
        #expect(r == .dropped(.inNoPols))
    }

    @Test("block policies drop with XfrmOutPolBlock/XfrmInPolBlock; blocking defaults as the kernel counts them")
    func blocking() throws {
        let h = try TwoHosts()
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, action: .block), update: false)
        #expect(h.send(h.packet()).0 == .dropped(.outPolBlock))
        h.a.flushPolicies()
        #expect(h.send(h.packet()).0 == .transmit(ifindex: 2))
        // Default actions (xfrm_lookup_with_ifid, __xfrm_policy_check): EPERM without a counter on output,
        // XfrmInNoPols on input.
        h.a.setDefault(.block, for: .outbound)
        #expect(h.send(h.packet()).0 == .dropped(nil))
        h.b.setDefault(.block, for: .inbound)
        #expect(h.receive(h.packet(to: "10.0.2.1")).0 == .dropped(.inNoPols))
        #expect(h.a.statistics[.outPolBlock] == 1)
    }

    @Test("no SA: ACQUIRE once, a larval SA, the packet dropped (never sent in clear); it expires after 30 s with EXPIRE")
    func acquire() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 9)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        _ = h.eventsA.drain()
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        let acquires = h.eventsA.drain().filter { if case .acquire = $0 { return true } else { return false } }
        #expect(acquires.count == 1)
        #expect(h.a.states.count == 1)
        #expect(h.a.states.list()[0].state == .acquiring)
        #expect(h.a.statistics[.outNoStates] == 2)
        h.clock.advance(by: 29)
        h.a.runTimers()
        #expect(h.a.states.count == 1)
        h.clock.advance(by: 1)
        h.a.runTimers()
        #expect(h.a.states.count == 0)
        #expect(h.eventsA.expires().map { $0.0 } == [0], "a larval SA that times out sends EXPIRE hard=1 with SPI 0")
    }

    @Test("adding the real SA replaces the larval entry and traffic flows")
    func acquireThenAdd() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        _ = h.send(h.packet())
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))
        #expect(h.a.states.count == 1)
        #expect(h.send(h.packet()).0 == .transmit(ifindex: 2))
    }

    @Test("nested templates apply innermost first and the receiver's template check accepts the bundle")
    func nested() throws {
        let h = try TwoHosts()
        let inner = Template(destination: nil, mode: 0, reqid: 5)  // transport ESP end to end
        let outer = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 6)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [inner, outer]), update: false)
        try h.b.addPolicy(Policy(selector: sel, direction: .inbound, templates: [inner, outer]), update: false)
        for s in [h.a, h.b] {
            try s.addState(h.sa(from: "10.0.1.1", to: "10.0.2.1", spi: 0x5005, mode: .transport, reqid: 5, on: s))
            try s.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x6006, reqid: 6, on: s))
        }
        let pkt = h.packet()
        let (r, wire) = h.send(pkt)
        #expect(r == .transmit(ifindex: 2))
        #expect(Array(wire[20..<24]) == [0, 0, 0x60, 0x06], "the outer (tunnel) ESP is outermost")
        let (r2, back) = h.receive(wire)
        #expect(r2 == .deliver)
        #expect(back == pkt)
        // Only the outer SA: the inner template is missing → mismatch.
        try h.b.deletePolicy(key: Policy(selector: sel, direction: .inbound).key)
        try h.b.addPolicy(Policy(selector: sel, direction: .inbound, templates: [outer]), update: false)
        let (_, wire2) = h.send(pkt)
        #expect(h.receive(wire2).0 == .deliver, "a transport SA the policy does not list is tolerated")
    }

    @Test("tunnel mode with DF: an oversize packet gets ICMP fragmentation-needed carrying the usable MTU")
    func pmtu() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let big = h.packet(size: 1460)
        let (r, icmp) = h.send(big)
        #expect(r == .icmpError)
        #expect(icmp[9] == 1)
        #expect(icmp[20] == 3 && icmp[21] == 4)
        let mtu = Int(icmp[26]) << 8 | Int(icmp[27])
        #expect(mtu < 1500 - 20 - 8 - 8 - 16 && mtu > 1400)
        #expect(Array(icmp[16..<20]) == [10, 0, 1, 1])
        let fits = h.packet(size: mtu - 28)
        #expect(h.send(fits).0 == .transmit(ifindex: 2))
        #expect(h.send(h.packet(size: mtu - 27)).0 == .icmpError)
    }

    @Test("without DF, an IPv4 packet ESP makes larger than the MTU is handed on whole, to be cut into fragments")
    func fragmentVerdict() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for size in [1460, 1472] {
            let (r, wire) = h.send(h.packet(size: size, df: false))
            #expect(r == .fragment(ifindex: 2, mtu: 1500))
            #expect(wire.count > 1500 && wire[9] == 50 && wire[6] & 0x40 == 0, "sealed ESP, outer DF clear")
        }
        // Transport mode: the packet's own header, DF clear, is the outer one.
        let t = try TwoHosts()
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.1/32")!, destination: IPPrefix("10.0.2.1/32")!)
        try t.a.addPolicy(Policy(selector: sel, direction: .outbound,
                                 templates: [Template(source: nil, destination: nil, mode: 0, reqid: 5)]), update: false)
        try t.a.addState(t.sa(from: "10.0.1.1", to: "10.0.2.1", spi: 0x5005, mode: .transport, reqid: 5, on: t.a))
        #expect(t.send(t.packet(size: 1480, df: false)).0 == .fragment(ifindex: 2, mtu: 1500))
        #expect(h.a.statistics[.outError] == 0 && t.a.statistics[.outError] == 0)
    }

    @Test("transport mode: a DF packet over the bundle's MTU gets ICMP with it (xfrm_mtu), through both paths; one without DF is cut")
    func transportPacketTooBig() throws {
        let t = try TwoHosts()
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.1/32")!, destination: IPPrefix("10.0.2.1/32")!)
        try t.a.addPolicy(Policy(selector: sel, direction: .outbound,
                                 templates: [Template(source: nil, destination: nil, mode: 0, reqid: 5)]), update: false)
        try t.a.addState(t.sa(from: "10.0.1.1", to: "10.0.2.1", spi: 0x5005, mode: .transport, reqid: 5, on: t.a))
        // ((1500 - 8 ESP - 8 IV - 16 ICV - 20 net_adj) & ~3) + 20 - 2 (GCM: 4-byte alignment).
        let limit = 1466
        for pass in 0..<2 {  // the first resolves the bundle; the second goes through the flow's cached one
            let (small, _) = t.send(t.packet(size: limit - 28, df: true))
            #expect(small == .transmit(ifindex: 2), "pass \(pass): a packet at the limit leaves whole")
            let big = t.packet(size: limit - 28 + 1, df: true)
            let (r, icmp) = t.send(big)
            #expect(r == .icmpError, "pass \(pass)")
            // ICMP type 3 code 4 to the sender, with the bundle's MTU, quoting the plaintext header and 8 bytes.
            #expect(icmp.count >= 28 + 28 && icmp[20] == 3 && icmp[21] == 4, "pass \(pass)")
            #expect(Int(icmp[26]) << 8 | Int(icmp[27]) == limit, "pass \(pass)")
            #expect(Array(icmp[16..<20]) == Array(big[12..<16]), "pass \(pass): back to the sender")
            #expect(Array(icmp[48..<56]) == Array(big[20..<28]), "pass \(pass): the sender's own UDP header")
            #expect(t.send(t.packet(size: limit - 28 + 1, df: false)).0 == .fragment(ifindex: 2, mtu: 1500))
        }
        #expect(t.a.statistics[.outError] == 0 && t.a.statistics[.outStateModeError] == 0)
    }

    @Test("an outbound-direction SA found by SPI on input is XfrmInStateDirError")
    func directionError() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let (_, wire) = h.send(h.packet())
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.b).currentConfig
        c.direction = .outbound
        c.replayWindow = 0
        try h.b.deleteState(c.id, mark: Mark())
        try h.b.addState(h.b.makeSA(c))
        #expect(h.receive(wire).0 == .dropped(.inStateDirError))
    }

    @Test("a replayed packet counts in the SA's stats and XfrmInStateSeqError")
    func replayCounted() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let (_, wire) = h.send(h.packet())
        #expect(h.receive(wire).0 == .deliver)
        #expect(h.receive(wire).0 == .dropped(.inStateSeqError))
        let sa = h.b.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001))!
        #expect(sa.stats.replay == 1)
        #expect(h.b.statistics[.inStateSeqError] == 1)
        #expect(h.b.statistics.drops[.replayDuplicate] == 1)
    }

    @Test("unknown SPI is XfrmInNoStates")
    func noStates() throws {
        let h = try TwoHosts()
        let (r, _) = h.receive(PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 50,
                                                   payload: [0, 0, 9, 9, 0, 0, 0, 1] + PacketFactory.pattern(40)))
        #expect(r == .dropped(.inNoStates))
    }

    @Test("xfrm_stat prints the 32 counters in the kernel's order and format")
    func procFormat() {
        let s = XfrmStatistics()
        s.increment(.inNoStates, by: 3)
        let lines = s.procText().split(separator: "\n")
        #expect(lines.count == 32)
        #expect(lines[0] == "XfrmInError             \t0")
        #expect(lines[3] == "XfrmInNoStates          \t3")
        #expect(lines[26] == "XfrmOutStateInvalid     \t0")
        #expect(lines[31] == "XfrmOutNoQueueSpace     \t0")
    }
}
