import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMTestKit

@Suite("Events and database rules (flush, duplicates, policy timers)")
struct EventRuleTests {
    @Test("flushing an empty SAD or SPD sends no event (xfrm_flush_sa / xfrm_flush_policy)")
    func emptyFlushSilent() throws {
        let h = try TwoHosts()
        _ = h.eventsA.drain()
        h.a.flushStates(proto: 0)
        h.a.flushPolicies()
        #expect(h.eventsA.drain().isEmpty)
        try h.tunnel()
        _ = h.eventsA.drain()
        h.a.flushStates(proto: 0)
        h.a.flushPolicies()
        #expect(h.eventsA.drain().count == 2)
    }

    @Test("the duplicate check uses the masked mark: an SA whose mark would take the new SA's traffic is EEXIST")
    func duplicateMaskedMark() throws {
        let h = try TwoHosts()
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig
        c.mark = Mark(value: 0x1, mask: 0xf)
        try h.a.addState(h.a.makeSA(c))
        c.mark = Mark(value: 0x11, mask: 0xff)  // 0x11 & 0xf == 0x1: the first SA matches it
        #expect(throws: StateDatabaseError(17, "File exists")) { try h.a.addState(h.a.makeSA(c)) }
        c.mark = Mark(value: 0x12, mask: 0xff)
        try h.a.addState(h.a.makeSA(c))
    }

    @Test("a policy's hard lifetime never deletes a replacement that reused its index")
    func timerSparesReplacement() throws {
        let h = try TwoHosts()
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        var l = LifetimeConfig()
        l.hardAddExpiresSeconds = 10
        let old = try h.a.addPolicy(Policy(selector: sel, direction: .outbound, lifetime: l), update: false)
        h.clock.advance(by: 9)
        // The replacement reuses the index (update keeps it) and has no lifetime.
        var p = Policy(selector: sel, direction: .outbound, index: old.index)
        p.priority = 5
        let new = try h.a.addPolicy(p, update: true)
        #expect(new.index == old.index)
        // The timer works from a snapshot taken before the update: its delete names the old policy's generation.
        #expect(throws: PolicyDatabaseError.self) {
            try h.a.policies.delete(index: old.index, direction: .outbound, generation: old.generation)
        }
        h.clock.advance(by: 5)
        h.a.runTimers()
        #expect(h.a.policies.get(index: old.index, direction: .outbound)?.priority == 5)
    }
}
