import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// How output templates find their SAs (≈ xfrm_tmpl_resolve_one and xfrm_state_find).
@Suite("Output resolution: reqid, marks, addresses, optional templates, acquire")
struct OutputResolutionTests {
    let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)

    @Test("a template's reqid matches an SA's exactly: reqid 0 takes only reqid-0 SAs")
    func reqidExact() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 0)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, reqid: 5, on: h.a))
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1002, reqid: 0, on: h.a))
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(Array(wire[20..<24]) == [0, 0, 0x10, 0x02])
    }

    @Test("an SA with flag wildrecv is never chosen for output (xfrm_state_find)")
    func wildRecvNotForOutput() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig
        c.flags = SAConfig.wildRecvFlag
        try h.a.addState(h.a.makeSA(c))
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1002, on: h.a))
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(Array(wire[20..<24]) == [0, 0, 0x10, 0x02])
    }

    @Test("the SA's mark is compared with the policy's mark (value & mask), not the packet's")
    func markFromPolicy() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, mark: Mark(value: 0x10, mask: 0xf0),
                                 templates: [t]), update: false)
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig
        c.mark = Mark(value: 0x10, mask: 0xff)
        try h.a.addState(h.a.makeSA(c))
        // The packet's mark 0x17 matches the policy (0x17 & 0xf0 == 0x10) but not the SA (0x17 & 0xff != 0x10);
        // the kernel compares the SA with the policy's 0x10 & 0xf0 = 0x10, which matches.
        let (r, wire) = h.buffers.with(h.packet()) { h.a.output(&$0, mark: 0x17) }
        #expect(r == .transmit(ifindex: 2))
        #expect(wire[9] == 50)
    }

    @Test("a tunnel template without a source takes the route's source address (xfrm_get_saddr)")
    func tunnelSourceFromRoute() throws {
        let h = try TwoHosts()
        let t = Template(destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a))
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(Array(wire[12..<16]) == [192, 0, 2, 1])
    }

    @Test("an SA with a wildcard source serves a template when no SA has the exact source")
    func wildcardSource() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try h.a.addState(h.sa(from: "0.0.0.0", to: "192.0.2.2", spi: 0x1001, on: h.a))
        #expect(h.send(h.packet()).0 != .dropped(.outNoStates))
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1002, on: h.a))
        let (_, wire) = h.send(h.packet())
        #expect(Array(wire[20..<24]) == [0, 0, 0x10, 0x02], "the exact source is preferred")
    }

    @Test("an SA whose selector is the wildcard of the outer family serves inner traffic of the other (4in6)")
    func wildcardSelectorAcrossFamilies() throws {
        let h = try TwoHosts()
        try h.a.network.addAddress(IPPrefix("2001:db8::1/64")!, device: "eth0")
        let t = Template(source: IPAddress("2001:db8::1"), destination: IPAddress("2001:db8::2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        var c = try h.sa(from: "2001:db8::1", to: "2001:db8::2", spi: 0x1001, on: h.a).currentConfig
        c.selector = .any(family: 6)  // what an SA added without `sel` gets (copy_from_user_state)
        try h.a.addState(h.a.makeSA(c))
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(wire[0] >> 4 == 6 && wire[6] == 50, "IPv4 inside IPv6 ESP")
    }

    @Test("a transport template after a tunnel template takes the tunnel's endpoints")
    func transportAfterTunnel() throws {
        let h = try TwoHosts()
        let tunnel = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 6)
        let transport = Template(mode: 0, reqid: 5)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [tunnel, transport]), update: false)
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x6006, reqid: 6, on: h.a))
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x5005, mode: .transport, reqid: 5, on: h.a))
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(Array(wire[20..<24]) == [0, 0, 0x50, 0x05], "transport ESP between the tunnel endpoints, outermost")
    }

    @Test("an optional template without an SA sends an ACQUIRE and the packet goes on without that transform")
    func optionalAcquires() throws {
        let h = try TwoHosts()
        let opt = Template(mode: 0, reqid: 9, optional: true)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [opt]), update: false)
        _ = h.eventsA.drain()
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(wire[9] == 17, "sent without the optional transform")
        let acquires = h.eventsA.drain().filter { if case .acquire = $0 { return true } else { return false } }
        #expect(acquires.count == 1)
    }

    @Test("the larval SA of an acquire is dir out, with port masks 0xffff, the output interface, the policy's mark and if_id")
    func larvalShape() throws {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 9)
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound, mark: Mark(value: 3, mask: 0xff),
                                 templates: [t]), update: false)
        #expect(h.buffers.with(h.packet()) { h.a.output(&$0, mark: 3) }.0 == .dropped(.outNoStates))
        let larval = try #require(h.a.states.list().first)
        #expect(larval.state == .acquiring)
        #expect(larval.config.direction == .outbound)
        #expect(larval.config.selector.sourcePortMask == 0xffff && larval.config.selector.destinationPortMask == 0xffff)
        #expect(larval.config.selector.ifindex == h.a.network.egress(to: IPAddress("10.0.2.1")!)!.ifindex)
        #expect(larval.config.mark == Mark(value: 3, mask: 0xff))
    }

    @Test("a local IPv6 packet's flow has no output interface (flowi6_oif 0): a `dev` selector takes it only forwarded, and its larval SA has no dev; IPv4's has the route's")
    func ipv6LocalOutputHasNoInterface() throws {
        let h = try TwoHosts()
        try h.a.network.addAddress(IPPrefix("2001:db8::1/64")!, device: "eth0")
        try h.a.network.addRoute(IPPrefix("2001:db8:2::/64")!, device: "eth0", via: IPAddress("2001:db8::2"))
        let eth0 = try #require(h.a.network.egress(to: IPAddress("2001:db8:2::1")!)).ifindex
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 9)
        let six = Selector(family: 6, source: IPPrefix("2001:db8:1::/64")!, destination: IPPrefix("2001:db8:2::/64")!,
                           ifindex: eth0)
        try h.a.addPolicy(Policy(selector: six, direction: .outbound, action: .block), update: false)
        let packet6 = PacketFactory.ipv6(payload: PacketFactory.udp(payload: PacketFactory.pattern(20)))
        #expect(h.buffers.with(packet6) { h.a.output(&$0) }.0 == .transmit(ifindex: eth0),
                "local: the policy on dev eth0 does not apply")
        #expect(h.buffers.with(packet6) { h.a.output(&$0, forwarded: true) }.0 == .dropped(.outPolBlock),
                "forwarded: it does")
        // Without `dev`, the policy takes local IPv6 traffic; the larval SA's selector is the flow, ifindex 0.
        try h.a.addPolicy(Policy(selector: Selector(family: 6, source: six.source, destination: six.destination),
                                 direction: .outbound, templates: [t]), update: false)
        _ = h.eventsA.drain()
        #expect(h.buffers.with(packet6) { h.a.output(&$0) }.0 == .dropped(.outNoStates))
        var larval = h.a.states.list().filter { $0.state == .acquiring }
        #expect(larval.count == 1 && larval.first?.config.selector.ifindex == 0)
        #expect(larval.first?.config.selector.sourcePort == 1234)
        // IPv4's route lookup writes the device into the flow: its larval SA has it, and so would a `dev` selector.
        try h.a.addPolicy(Policy(selector: ab, direction: .outbound,
                                 templates: [Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"),
                                                      mode: 1, reqid: 10)]), update: false)
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        larval = h.a.states.list().filter { $0.state == .acquiring && $0.config.reqid == 10 }
        #expect(larval.count == 1 && larval.first?.config.selector.ifindex == eth0)
    }

    @Test("no larval SA is created when nobody listens for ACQUIRE (km_query fails)")
    func noListenerNoLarval() throws {
        let clock = ManualClock()
        let s = XFRMStack(clock: clock)
        try s.network.addInterface(name: "eth0", kind: "dummy")
        try s.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try s.network.addAddress(IPPrefix("192.0.2.1/24")!, device: "eth0")
        try s.network.addRoute(IPPrefix("10.0.2.0/24")!, device: "eth0", via: IPAddress("192.0.2.2"))
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 9)
        try s.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        let monitor = s.events.subscribe(acquire: false)
        let buffers = TestBuffers()
        let pkt = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", payload: PacketFactory.pattern(20))
        #expect(buffers.with(pkt) { s.output(&$0) }.0 == .dropped(.outNoStates))
        #expect(s.states.count == 0)
        #expect(!monitor.drain().contains { if case .acquire = $0 { return true } else { return false } })
        let km = s.events.subscribe()
        #expect(buffers.with(pkt) { s.output(&$0) }.0 == .dropped(.outNoStates))
        #expect(s.states.count == 1)
        #expect(km.drain().count == 1)
    }

    @Test("a subscriber that lost events is told how many (≈ ENOBUFS, so the key manager resyncs)")
    func lostEventsReported() {
        let bus = EventBus()
        let sub = bus.subscribe(capacity: 2)
        for _ in 0..<5 { bus.publish(.policiesFlushed) }
        let (events, lost) = sub.drainReportingLoss()
        #expect(events.count == 2 && lost == 3)
        #expect(sub.drainReportingLoss().lost == 0)
    }
}
