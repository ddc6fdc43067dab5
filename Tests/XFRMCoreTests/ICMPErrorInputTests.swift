import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// ICMP errors judged by the packet they quote, as Linux 6.8+ does (xfrm_in_fwd_icmp, and an SA's flag `icmp`
/// through xfrm_selector_inner_icmp_match).
@Suite("Input: ICMP errors judged by their quoted packet")
struct ICMPErrorInputTests {
    /// An ICMP destination unreachable from `from` to `to`, quoting a UDP packet `quotedFrom` → `quotedTo`.
    private func unreachable(from: String, to: String, quotedFrom: String, quotedTo: String) -> [UInt8] {
        let quoted = PacketFactory.ipv4(source: quotedFrom, destination: quotedTo, proto: 17,
                                        payload: PacketFactory.udp(sourcePort: 1111, destinationPort: 2222, payload: []))
        return PacketFactory.ipv4(source: from, destination: to, proto: 1, payload: [3, 1, 0, 0, 0, 0, 0, 0] + quoted)
    }

    @Test("a plaintext ICMP error about a protected flow meets that flow's FWD policy and is refused (xfrm_in_fwd_icmp)")
    func plaintextErrorAboutProtectedFlowIsRefused() throws {
        let h = try TwoHosts()
        try h.tunnel()
        // 10.0.2.5 (behind B) sent to 10.0.1.5 (behind A) through the tunnel; an error about it arrives in clear.
        let error = self.unreachable(from: "198.51.100.1", to: "10.0.2.5", quotedFrom: "10.0.2.5", quotedTo: "10.0.1.5")
        let before = h.b.statistics[.inTmplMismatch]
        #expect(h.receive(error).0 == .dropped(.inTmplMismatch))
        #expect(h.b.statistics[.inTmplMismatch] == before + 1)
        // About a flow no policy covers, it is forwarded as before; a non-error ICMP is not looked into.
        let other = self.unreachable(from: "198.51.100.1", to: "10.0.2.5", quotedFrom: "10.0.2.5", quotedTo: "203.0.113.9")
        #expect(h.receive(other).0 == .forward)
        var echo = error
        echo[20] = 8  // echo request: not an error
        #expect(h.receive(echo).0 == .forward)
    }

    @Test("through an SA with flag icmp, an error from a router outside its selector about the SA's own traffic is accepted; without the flag, or about other traffic, it is a selector mismatch")
    func saICMPFlag() throws {
        for icmp in [false, true] {
            let h = try TwoHosts()
            try h.narrowSA(flags: icmp ? SAConfig.icmpFlag : 0)
            // A router at 10.9.9.9 on A's side reports on 10.0.2.1's packet to 10.0.1.1.
            let about = self.unreachable(from: "10.9.9.9", to: "10.0.2.1", quotedFrom: "10.0.2.1", quotedTo: "10.0.1.1")
            let (out, wire) = h.send(about)
            #expect(out == .transmit(ifindex: 2))
            #expect(h.receive(wire).0 == (icmp ? .deliver : .dropped(.inStateMismatch)), "flag icmp \(icmp)")
            // The same twice: the first verdict was not cached for the error's own flow.
            let aboutOther = self.unreachable(from: "10.9.9.9", to: "10.0.2.1", quotedFrom: "10.0.2.1",
                                              quotedTo: "10.9.9.8")
            let (_, wire2) = h.send(aboutOther)
            #expect(h.receive(wire2).0 == .dropped(.inStateMismatch), "quoting traffic outside the selector")
        }
    }

    @Test("the quoted flow is read reversed, ports swapped, from a quote cut short; IPv6 too")
    func quotedReverseParsing() throws {
        let v4 = self.unreachable(from: "198.51.100.1", to: "10.0.2.5", quotedFrom: "10.0.2.5", quotedTo: "10.0.1.5")
        let f4 = try #require(v4.withUnsafeBytes { r in
            Flow.parse(UnsafeMutableRawPointer(mutating: r.baseAddress!), count: r.count) })
        #expect(f4.isICMPError)
        let q4 = try #require(v4.withUnsafeBytes { r in
            f4.quotedReverse(UnsafeMutableRawPointer(mutating: r.baseAddress!), count: r.count) })
        #expect(q4.source == IPAddress("10.0.1.5")! && q4.destination == IPAddress("10.0.2.5")!)
        #expect(q4.proto == 17 && q4.sourcePort == 2222 && q4.destinationPort == 1111)
        let quoted6 = PacketFactory.ipv6(source: "2001:db8:2::5", destination: "2001:db8:1::5", nextHeader: 6,
                                         payload: [0x04, 0x57, 0x08, 0xae, 0, 0, 0, 1])  // TCP 1111 → 2222, cut
        let v6 = PacketFactory.ipv6(source: "2001:db8:9::1", destination: "2001:db8:2::5", nextHeader: 58,
                                    payload: [2, 0, 0, 0, 0, 0, 0x05, 0x00] + quoted6)  // packet too big
        let f6 = try #require(v6.withUnsafeBytes { r in
            Flow.parse(UnsafeMutableRawPointer(mutating: r.baseAddress!), count: r.count) })
        let q6 = try #require(v6.withUnsafeBytes { r in
            f6.quotedReverse(UnsafeMutableRawPointer(mutating: r.baseAddress!), count: r.count) })
        #expect(q6.source == IPAddress("2001:db8:1::5")! && q6.destination == IPAddress("2001:db8:2::5")!)
        #expect(q6.proto == 6 && q6.sourcePort == 2222 && q6.destinationPort == 1111)
        // Not an error, or a quote shorter than an IP header: nothing.
        #expect(v4.withUnsafeBytes { r in
            f4.quotedReverse(UnsafeMutableRawPointer(mutating: r.baseAddress!), count: 40) } == nil)
    }
}

/// ICMP errors on output (≈ icmp_route_lookup / xfrm_out_fwd_icmp with XFRM_LOOKUP_ICMP).
@Suite("Output: ICMP errors protected by the policy of the flow they quote")
struct ICMPErrorOutputTests {
    private func unreachable(quotedFrom: String, quotedTo: String, quotedProto: UInt8 = 17) -> [UInt8] {
        let quoted = PacketFactory.ipv4(source: quotedFrom, destination: quotedTo, proto: quotedProto,
                                        payload: PacketFactory.udp(sourcePort: 1111, destinationPort: 2222, payload: []))
        return PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.5", proto: 1,
                                  payload: [3, 4, 0, 0, 0, 0, 0x05, 0x78] + quoted)
    }

    @Test("an ICMP error no policy takes goes through the policy of its quoted flow when that policy has flag icmp; without the flag, or for another quote, in clear; never cached")
    func quotedFlowProtectsTheError() throws {
        for flagged in [false, true] {
            let h = try TwoHosts()
            let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
            // Only UDP from 10.0.1.0/24 to 10.0.2.0/24 is protected: the ICMP error's own flow is not covered.
            let udp = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!,
                               proto: 17)
            try h.a.addPolicy(Policy(selector: udp, direction: .outbound, flags: flagged ? Policy.icmpFlag : 0,
                                     templates: [t]), update: false)
            try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))
            // 10.0.2.5 sent UDP to 10.0.1.5 through the tunnel; A reports on it to 10.0.2.5.
            let aboutTunnelTraffic = self.unreachable(quotedFrom: "10.0.2.5", quotedTo: "10.0.1.5")
            let aboutOther = self.unreachable(quotedFrom: "10.0.2.5", quotedTo: "203.0.113.7")
            for (error, protected) in [(aboutOther, false), (aboutTunnelTraffic, flagged), (aboutOther, false),
                                       (aboutTunnelTraffic, flagged)] {
                let (r, wire) = h.send(error)
                #expect(r == .transmit(ifindex: 2))
                #expect(wire[9] == (protected ? 50 : 1), "flag icmp \(flagged), protected \(protected)")
            }
        }
    }
}
