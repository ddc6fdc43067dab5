import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// The SAD's output index (≈ state_bydst): resolution through it must pick exactly what a scan of every SA picks.
@Suite("SAD output index")
struct StateIndexTests {
    /// The rules of xfrm_state_find as a plain scan of every SA, newest first (the pre-index implementation).
    private func reference(_ all: [SecurityAssociation], _ template: Template, flow: Flow, source: IPAddress,
                           destination: IPAddress) -> UInt32? {
        var wildcard: SecurityAssociation? = nil
        for sa in all.reversed() {
            let exact = sa.config.source == source
            guard sa.id.proto == template.proto, sa.id.destination == destination,
                exact || sa.config.source.isUnspecified, sa.config.reqid == template.reqid,
                sa.config.mode == (template.mode == 1 ? .tunnel : .transport), sa.config.selector.covers(flow)
            else { continue }
            if exact { return sa.id.spi }
            if wildcard == nil { wildcard = sa }
        }
        return wildcard?.id.spi
    }

    @Test("among 20,000 SAs the indexed resolution picks what a full scan picks, also after deletes")
    func indexAgreesWithScan() throws {
        let stack = XFRMStack(clock: ManualClock())
        let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
        var rng = SystemRandomNumberGenerator()
        var added: [SecurityAssociation] = []
        let sources = ["192.0.2.1", "192.0.2.9", "0.0.0.0"].map { IPAddress($0)! }
        for i in 0..<20_000 {
            let destination = IPAddress.v4(0xc633_6400 | UInt32(i % 200))  // 198.51.100.0–199
            let selector: Selector = Int.random(in: 0..<4, using: &rng) == 0
                ? Selector(family: 4, source: IPPrefix("10.9.0.0/16")!, destination: IPPrefix("10.9.0.0/16")!)
                : .any(family: 4)
            let sa = try stack.makeSA(SAConfig(
                id: SAID(destination: destination, spi: UInt32(0x10000 + i)), source: sources.randomElement(using: &rng)!,
                selector: selector, reqid: UInt32.random(in: 0..<3, using: &rng),
                mode: Bool.random(using: &rng) ? .tunnel : .transport, crypto: crypto))
            try stack.addState(sa)
            added.append(sa)
        }
        func check(_ live: [SecurityAssociation]) {
            for _ in 0..<2_000 {
                let destination = IPAddress.v4(0xc633_6400 | UInt32.random(in: 0..<210, using: &rng))
                let source = sources[Int.random(in: 0..<2, using: &rng)]
                let t = Template(source: source, destination: destination, mode: UInt8.random(in: 0...1, using: &rng),
                                 reqid: UInt32.random(in: 0..<3, using: &rng))
                let flow = Flow(source: IPAddress("10.1.0.1")!, destination: IPAddress("10.2.0.1")!, proto: 17)
                let got: UInt32?
                switch stack.states.resolve(t, flow: flow, source: source, destination: destination, policyMark: 0) {
                case .found(let sa): got = sa.id.spi
                default: got = nil
                }
                #expect(got == self.reference(live, t, flow: flow, source: source, destination: destination))
            }
        }
        check(added)
        var live: [SecurityAssociation] = []
        for (i, sa) in added.enumerated() {
            if i % 3 == 0 { stack.states.remove(sa) } else { live.append(sa) }
        }
        check(live)
    }
}
