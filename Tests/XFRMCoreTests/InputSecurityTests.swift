import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// What a peer can and cannot inject after decapsulation (≈ __xfrm_policy_check and xfrm_policy_ok).
@Suite("Input security: selectors, if_id, template check, defaults")
struct InputSecurityTests {
    @Test("an IPv4 header with a bad checksum is refused once on each path: at output before ESP, in ESP after decryption")
    func headerChecksumIsCheckedOncePerPath() throws {
        let h = try TwoHosts()
        try h.tunnel()
        var bad = h.packet()
        bad[10] ^= 0x5a  // the header checksum
        let (out, wire) = h.send(bad)
        #expect(out == .dropped(.outError))
        #expect(wire == bad, "nothing encrypted, nothing sent")
        // A's own SA, told the header was checked, seals the bad header; B's decapsulation must still refuse it.
        let peer = try TwoHosts()
        let sa = try peer.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: peer.a)
        let (sealed, esp) = h.buffers.with(bad) { b -> DropReason? in
            var layout = ESPLayout()
            return sa.transform!.encapsulate(&b, layout: &layout, innerHeaderChecked: true)
        }
        #expect(sealed == nil)
        let before = h.b.statistics[.inStateModeError]
        #expect(h.receive(esp).0 == .dropped(.inStateModeError))
        #expect(h.b.statistics[.inStateModeError] == before + 1)
    }

    @Test("an inner source outside the SA's selector is dropped as XfrmInStateMismatch although the policy allows it (__xfrm_policy_check)")
    func selectorMismatchDropped() throws {
        let h = try TwoHosts()
        try h.narrowSA()
        let (_, good) = h.send(h.packet(from: "10.0.1.1", to: "10.0.2.1"))
        #expect(h.receive(good).0 == .deliver)
        let (r, spoofed) = h.send(h.packet(from: "10.9.9.9", to: "10.0.2.1"))
        #expect(r == .transmit(ifindex: 2), "A's SA selector is any: A sends it")
        #expect(h.receive(spoofed).0 == .dropped(.inStateMismatch))
        let (_, forwarded) = h.send(h.packet(from: "10.9.9.9", to: "10.0.2.77"))
        #expect(h.receive(forwarded).0 == .dropped(.inStateMismatch), "forwarded traffic is checked too")
        #expect(h.b.statistics[.inStateMismatch] == 2)
    }

    @Test("an SA selector's dev is compared with the route's device, not the input interface (decode_session)")
    func selectorDevIsTheRouteDevice() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let lan = try #require(h.b.network.interface(named: "lan0")).index
        let wan = try #require(h.b.network.interface(named: "eth0")).index
        for (dev, expected) in [(lan, InputResult.deliver), (wan, .dropped(.inStateMismatch))] {
            var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.b).currentConfig
            c.selector = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!,
                                  ifindex: dev)
            try h.b.deleteState(c.id, mark: Mark())
            try h.b.addState(h.b.makeSA(c))
            let (_, wire) = h.send(h.packet(to: "10.0.2.1"))
            #expect(h.receive(wire).0 == expected, "selector dev \(dev)")
        }
    }

    @Test("a wildcard SA selector covers either inner family (6-in-4)")
    func wildcardSelectorCoversBothFamilies() {
        let any4 = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("0.0.0.0/0")!)
        let v6 = Flow(source: IPAddress("2001:db8:1::1")!, destination: IPAddress("2001:db8:2::1")!)
        #expect(any4.covers(v6))
        let narrow = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        #expect(!narrow.covers(v6))
        #expect(narrow.covers(Flow(source: IPAddress("10.0.1.5")!, destination: IPAddress("10.0.2.9")!)))
    }

    @Test("a policy with an if_id never captures ordinary traffic (xfrm_policy_match)")
    func ifIDPolicyIgnoresOrdinaryTraffic() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let all = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("0.0.0.0/0")!)
        try h.a.addPolicy(Policy(selector: all, direction: .outbound, ifID: 7, templates: [t]), update: false)
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig
        c.ifID = 7
        try h.a.addState(h.a.makeSA(c))
        #expect(h.send(h.packet()).0 == .transmit(ifindex: 2))
        let (plain, bytes) = h.send(h.packet())
        #expect(plain == .transmit(ifindex: 2) && bytes[9] == 17, "if_id 0 traffic leaves untouched")
        let (r, wire) = h.buffers.with(h.packet()) { h.a.output(&$0, ifID: 7) }
        #expect(r == .transmit(ifindex: 2) && wire[9] == 50, "if_id 7 traffic is protected")
        // An SA of another if_id is not used for the policy.
        let (r2, _) = h.buffers.with(h.packet()) { h.a.output(&$0, ifID: 8) }
        #expect(r2 == .transmit(ifindex: 2), "no policy for if_id 8")
    }

    @Test("an SA without the policy's if_id is not resolved for it (xfrm_state_find)")
    func ifIDStateResolution() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let all = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("0.0.0.0/0")!)
        try h.a.addPolicy(Policy(selector: all, direction: .outbound, ifID: 7, templates: [t]), update: false)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))  // if_id 0
        let (r, _) = h.buffers.with(h.packet()) { h.a.output(&$0, ifID: 7) }
        #expect(r == .dropped(.outNoStates))
    }

    @Test("output: the best SA for a template being a `dir in` one drops the packet as XfrmOutStateDirError, no acquire (xfrm_tmpl_resolve_one); a newer `dir out` SA is then taken")
    func inboundSAOnOutputRefused() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let all = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("0.0.0.0/0")!)
        try h.a.addPolicy(Policy(selector: all, direction: .outbound, templates: [t]), update: false)
        func sa(_ spi: UInt32, _ dir: SADirection) throws -> SecurityAssociation {
            try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: spi, on: h.a, direction: dir)
        }
        try h.a.addState(sa(0x1001, .inbound))
        let listener = h.a.events.subscribe()  // a key manager that answers ACQUIREs
        defer { h.a.events.unsubscribe(listener) }
        let (r, _) = h.buffers.with(h.packet()) { h.a.output(&$0) }
        #expect(r == .dropped(.outStateDirError))
        #expect(h.a.statistics[.outStateDirError] == 1)
        #expect(!listener.drain().contains { if case .acquire = $0 { true } else { false } })
        try h.a.addState(sa(0x1002, .outbound))
        let (r2, _) = h.buffers.with(h.packet()) { h.a.output(&$0) }
        #expect(r2 == .transmit(ifindex: 2))
        #expect(h.a.statistics[.outStateDirError] == 1)
    }

    @Test("inbound: decapsulated traffic takes the SA's if_id; only the policy with that if_id accepts it")
    func ifIDInbound() throws {
        let h = try TwoHosts()
        try h.tunnel()
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.b).currentConfig
        c.ifID = 7
        try h.b.deleteState(c.id, mark: Mark())
        try h.b.addState(h.b.makeSA(c))
        let (_, wire) = h.send(h.packet())
        // B's IN policy has if_id 0: it does not match if_id 7 traffic, and a tunnel SA without a policy is NoPols.
        #expect(h.receive(wire).0 == .dropped(.inNoPols))
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.b.addPolicy(Policy(selector: ab, direction: .inbound, ifID: 7, templates: [t]), update: false)
        let (_, wire2) = h.send(h.packet())
        #expect(h.receive(wire2).0 == .deliver)
    }

    @Test("xfrm_policy_ok: an optional transport template consumes nothing; an optional tunnel template may be absent")
    func optionalTemplates() throws {
        let h = try TwoHosts()
        try h.tunnel()
        let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let tunnel = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let optTransport = Template(mode: 0, reqid: 44, optional: true)
        let optTunnel = Template(source: IPAddress("192.0.2.9"), destination: IPAddress("192.0.2.2"), mode: 1,
                                 reqid: 45, optional: true)
        try h.b.deletePolicy(key: Policy(selector: ab, direction: .inbound).key)
        try h.b.addPolicy(Policy(selector: ab, direction: .inbound, templates: [optTransport, tunnel, optTunnel]),
                          update: false)
        let (_, wire) = h.send(h.packet())
        #expect(h.receive(wire).0 == .deliver)
        #expect(h.receive(h.packet()).0 == .dropped(.inTmplMismatch), "the required tunnel template is still required")
    }

    @Test("no IN policy with a blocking default is XfrmInNoPols (not XfrmInPolBlock)")
    func defaultBlockInbound() throws {
        let h = try TwoHosts()
        h.b.setDefault(.block, for: .inbound)
        #expect(h.receive(h.packet()).0 == .dropped(.inNoPols))
        #expect(h.b.statistics[.inNoPols] == 1 && h.b.statistics[.inPolBlock] == 0)
    }

    @Test("output blocked by the default policy moves no counter, and traffic to a local address is exempt")
    func defaultBlockOutbound() throws {
        let h = try TwoHosts()
        h.a.setDefault(.block, for: .outbound)
        #expect(h.send(h.packet()).0 == .dropped(nil))
        #expect(h.a.statistics[.outPolBlock] == 0)
        let local = h.packet(from: "10.0.1.1", to: "192.0.2.1")
        #expect(h.send(local).0 != .dropped(nil), "loopback traffic is not blocked by the default")
    }

    @Test("encryption without integrity is refused (RFC 8221 §5), a deliberate difference from Linux")
    func encryptionOnlyRefused() throws {
        let crypto = try ESPCryptoSpec.cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: nil,
                                              authKey: [], truncationBits: nil)
        let c = SAConfig(id: SAID(destination: IPAddress("192.0.2.2")!, spi: 1), source: IPAddress("192.0.2.1")!,
                         selector: .any(), crypto: crypto)
        #expect(throws: ESPConfigError(SecurityAssociation.noIntegrityMessage)) {
            _ = try SecurityAssociation(c, addTime: 0)
        }
    }
}
