import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Traffic routed into an XFRM interface (`process(_:cpu:ifID:)`, what xfrmd `--if-id` passes for its TUN): only
/// policies with that if_id protect it (≈ xfrmi_xmit's xfrm_lookup_with_ifid), through the per-packet path and the
/// batch runs alike, and the receiver's IN policy of the SA's if_id accepts what comes out.
@Suite("XFRM interfaces: a batch's if_id picks its policies")
struct XFRMInterfaceTests {
    /// Catch-all tunnel policies and SAs of if_id 42 between A and B (A's OUT, B's IN), nothing else.
    static func hosts() throws -> TwoHosts {
        let h = try TwoHosts()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let any = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("0.0.0.0/0")!)
        try h.a.addPolicy(Policy(selector: any, direction: .outbound, ifID: 42, templates: [t]), update: false)
        try h.b.addPolicy(Policy(selector: any, direction: .inbound, ifID: 42, templates: [t]), update: false)
        let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: TwoHosts.key, icvBits: 128)
        for s in [h.a, h.b] {
            try s.addState(s.makeSA(SAConfig(
                id: SAID(destination: IPAddress("192.0.2.2")!, spi: 0x4242), source: IPAddress("192.0.2.1")!,
                selector: .any(family: 0), reqid: 1, mode: .tunnel, replayWindow: 64, ifID: 42, crypto: crypto)))
        }
        return h
    }

    /// Runs 24 packets of one flow through A's `process` with `ifID`; their verdicts and bytes.
    static func run(_ h: TwoHosts, ifID: UInt32) -> [(PacketBatch.Verdict, [UInt8])] {
        let pool = PacketPool(count: 24, slotSize: 2048, headroom: 256)
        var batch = PacketBatch(capacity: 24)
        for _ in 0..<24 {
            var buffer = pool.allocate()!
            _ = buffer.append(contentsOf: h.packet(size: 200))
            batch.append(PacketBatch.Packet(buffer, stage: .output))
        }
        h.a.process(&batch, ifID: ifID)
        var out: [(PacketBatch.Verdict, [UInt8])] = []
        for i in 0..<batch.count {
            out.append((batch[i].verdict, batch[i].buffer.bytes))
            pool.release(batch[i].buffer)
        }
        return out
    }

    @Test("a batch routed into if_id 42 is protected by the if_id-42 policy, in runs under one lock; B's if_id-42 IN policy accepts it")
    func protectedWithItsIfID() throws {
        let h = try Self.hosts()
        let out = Self.run(h, ifID: 42)
        #expect(out.allSatisfy { $0.0 == .output(.transmit(ifindex: 2), transformed: true) })
        let sa = h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x4242))!
        #expect(sa.current.packets == 24)
        for (_, wire) in out {
            #expect(Array(wire[20..<24]) == [0, 0, 0x42, 0x42])
            let (r, back) = h.receive(wire)
            #expect(r == .deliver)
            #expect(back == h.packet(size: 200))
        }
    }

    @Test("the same packets with no if_id, or another, meet no policy: they leave the stack unprotected (xfrmd drops them as tun_no_policy)")
    func otherIfIDsUnprotected() throws {
        for ifID: UInt32 in [0, 7] {
            let h = try Self.hosts()
            let out = Self.run(h, ifID: ifID)
            #expect(out.allSatisfy { $0.0 == .output(.transmit(ifindex: 2), transformed: false) }, "if_id \(ifID)")
            #expect(out.allSatisfy { $0.1 == h.packet(size: 200) })
            #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x4242))!.current.packets == 0)
        }
    }

    @Test("on a host whose XFRM interfaces are known (xfrmd), decapsulated traffic keeps its SA's if_id only when an interface has it: else it is checked with 0 and its if_id-42 IN policy does not apply (XfrmInNoPols)")
    func inputIfIDOnlyWithTheInterface() throws {
        for (interface, delivered) in [(UInt32(42), true), (7, false), (0, false)] {
            let h = try Self.hosts()
            h.b.setXFRMInterface(ifID: interface)
            let out = Self.run(h, ifID: 42)
            for (_, wire) in out.prefix(3) {
                let (r, _) = h.receive(wire)
                #expect(r == (delivered ? .deliver : .dropped(.inNoPols)), "B's interface if_id \(interface)")
            }
            #expect(h.b.statistics[.inNoPols] == (delivered ? 0 : 3))
        }
    }

    @Test("a worker's affinity for outbound packets uses the if_id's OUT policy (its template's SA), not the packet's destination")
    func affinityUsesTheIfIDPolicy() throws {
        let h = try Self.hosts()
        let pool = PacketPool(count: 2, slotSize: 2048, headroom: 256)
        var keys: Set<UInt32> = []
        for dst in ["10.0.2.1", "10.0.2.77", "10.9.9.9", "172.16.0.1"] {
            var buffer = pool.allocate()!
            _ = buffer.append(contentsOf: h.packet(to: dst))
            keys.insert(h.a.affinity(of: buffer, stage: .output, ifID: 42))
            pool.release(buffer)
        }
        #expect(keys.count == 1, "one tunnel, one SA: one worker")
    }
}
