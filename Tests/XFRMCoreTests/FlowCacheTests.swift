import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// The output bundle and input verdict caches only save lookups: no configuration change may be outlived by a
/// cached decision, and the security checks they skip are the ones the same flow and SA passed already.
@Suite("Per-flow caches follow the configuration")
struct FlowCacheTests {
    @Test("a flow's cached input verdict ends with its IN policy: the next packet is XfrmInNoPols")
    func inputVerdictFollowsPolicy() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for _ in 0..<3 { #expect(h.receive(h.send(h.packet()).1).0 == .deliver) }
        h.b.flushPolicies()
        #expect(h.receive(h.send(h.packet()).1).0 == .dropped(.inNoPols))
    }

    @Test("a cached input verdict is per flow: another inner source through the same SA is checked on its own")
    func inputVerdictIsPerFlow() throws {
        let h = try TwoHosts()
        try h.tunnel()
        #expect(h.receive(h.send(h.packet()).1).0 == .deliver)
        // 10.0.9.1 is outside the IN policy's selector: a template mismatch, even right after an allowed flow.
        let sel = Selector(family: 4, source: IPPrefix("10.0.9.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        let (r, _) = h.receive(h.send(h.packet(from: "10.0.9.1")).1)
        #expect(r == .dropped(.inNoPols))
        #expect(h.receive(h.send(h.packet()).1).0 == .deliver)
    }

    @Test("a cached output bundle ends with its SA: deleted, the next packet resolves again (no SA: ACQUIRE, drop)")
    func outputBundleFollowsSA() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for _ in 0..<3 { #expect(h.send(h.packet()).0 == .transmit(ifindex: 2)) }
        _ = try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        let (r, out) = h.send(h.packet())
        #expect(r == .dropped(.outNoStates))
        #expect(out.count < 200 || out[9] != 17, "nothing may leave in clear")
    }

    @Test("a deleted SA a cached bundle and verdict referred to is freed (with its keys) by the next timer run")
    func deletedSAIsNotKeptByTheCaches() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for _ in 0..<3 { #expect(h.receive(h.send(h.packet()).1).0 == .deliver) }
        weak let outbound = try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        weak let inbound = try h.b.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        _ = (h.eventsA.drain(), h.eventsB.drain())  // the delete events hold the SAs too
        h.a.runTimers()
        h.b.runTimers()
        #expect(outbound == nil && inbound == nil)
        // A second run at the same configuration skips the sweep; the caches still hand out nothing stale.
        h.a.runTimers()
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
    }

    @Test("a cached output bundle moves to the new SA after a rekey")
    func outputBundleFollowsRekey() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for _ in 0..<3 { #expect(h.send(h.packet()).0 == .transmit(ifindex: 2)) }
        let newer = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x3003, on: h.a)
        try h.a.addState(newer)
        let (r, wire) = h.send(h.packet())
        #expect(r == .transmit(ifindex: 2))
        #expect(wire[20..<24] == [0, 0, 0x30, 0x03], "the packet after the rekey uses the newer SA")
        #expect(newer.current.packets == 1)
    }

    @Test("a soft expiry hit on the cached path sends one EXPIRE and the packets still go")
    func softExpiryOnCachedPath() throws {
        let h = try TwoHosts()
        var l = LifetimeConfig()
        l.softPacketLimit = 5
        l.hardPacketLimit = 8
        try h.tunnel(lifetime: l)
        _ = h.eventsA.drain()
        var sent = 0
        for _ in 0..<10 where h.send(h.packet()).0 == .transmit(ifindex: 2) { sent += 1 }
        #expect(sent == 8)
        #expect(h.eventsA.expires().map(\.1) == [false, true])
    }
}
