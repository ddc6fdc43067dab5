import Testing
@testable import XFRMCore
import XFRMESP
import XFRMPacket

@Suite("What an SA keeps of its configuration")
struct SAConfigTests {
    @Test("currentConfig is the configuration as it stands: an update's lifetime and if_id, the numbers sent and received and the window; an SA made from it goes on from there")
    func currentConfig() throws {
        let h = try TwoHosts()
        try h.tunnel()
        for n in 1...5 {
            let (r, bytes) = h.send(h.packet())
            #expect(r == .transmit(ifindex: 2))
            if n != 4 { _ = h.receive(bytes) }  // the fourth is lost on the way
        }
        let id = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)
        #expect(try #require(h.a.states.lookup(id)).currentConfig.outboundSequence == 5)
        let received = try #require(h.b.states.lookup(id))
        var l = LifetimeConfig()
        l.softAddExpiresSeconds = 100
        l.hardAddExpiresSeconds = 200
        var u = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: l, on: h.b).currentConfig
        u.ifID = 9
        try h.b.updateState(h.b.makeSA(u))
        let c = received.currentConfig
        #expect(c.inboundSequence == 5 && c.lifetime == l && c.ifID == 9 && c.reqid == 1 && c.mode == .tunnel)
        let copy = try SecurityAssociation(c, addTime: 0)
        let window = try #require(copy.transform).replay
        #expect(window.top == 5 && Array(window.receivedBits.prefix(5)) == [true, false, true, true, true])
        #expect(copy.lifetime == l)
    }

    @Test("an output mark of value and mask 0 is none, as xfrm_smark_put lists only a mark with either set")
    func zeroOutputMark() throws {
        let h = try TwoHosts()
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig
        c.outputMark = Mark(value: 0, mask: 0)
        #expect(try h.a.makeSA(c).outputMark == nil)
        c.outputMark = Mark(value: 0, mask: 0xffff_ffff)
        #expect(try h.a.makeSA(c).outputMark == Mark(value: 0, mask: 0xffff_ffff))
        #expect(try h.a.makeSA(c).currentConfig.outputMark == Mark(value: 0, mask: 0xffff_ffff))
    }

    /// One SA in 100,000: these are the layouts `xfrm-bench scale` measured under 2 KiB per SA with (README, issue 9).
    @Test("what every SA holds packs without holes: its parameters in 232 bytes, its locked state in 176, an offload binding in 16")
    func footprint() {
        #expect(MemoryLayout<SAParameters>.size <= 232)
        #expect(MemoryLayout<SecurityAssociation.Mutable>.stride <= 176)
        #expect(MemoryLayout<StateOffload?>.stride <= 16)
    }
}
