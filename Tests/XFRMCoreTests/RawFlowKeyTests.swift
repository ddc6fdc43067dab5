import Testing
import XFRMPacket
import XFRMTestKit
@testable import XFRMCore

/// The input verdict memo recognizes the next packet of a flow by `RawFlowKey` instead of its parsed `Flow`: a key
/// that matched another flow would apply one flow's verdict to another and skip its selector and policy checks.
@Suite("Raw flow keys: equal keys only for equal flows")
struct RawFlowKeyTests {
    /// The flow as the policy check parses it (after a decapsulation: no header checksum), or nil.
    static func flow(_ bytes: [UInt8], mark: UInt32, ifindex: Int32) -> Flow? {
        var b = bytes
        return b.withUnsafeMutableBytes { Flow.parse($0.baseAddress!, count: $0.count, mark: mark, ifindex: ifindex,
                                                     verifyChecksum: false) }
    }

    static func key(_ bytes: [UInt8], mark: UInt32, ifindex: Int32) -> RawFlowKey? {
        var b = bytes
        return b.withUnsafeMutableBytes { RawFlowKey($0.baseAddress!, count: $0.count, mark: mark, ifindex: ifindex) }
    }

    @Test("20,000 mutated packets: a key exists only for IPv4 TCP/UDP packets that parse, and equal keys mean equal flows")
    func equalKeysMeanEqualFlows() {
        var rng = SplitMix(state: 0x5eed_2026_1201)
        let bases = [
            PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                               payload: PacketFactory.udp(payload: PacketFactory.pattern(20))),
            PacketFactory.ipv4(source: "10.0.1.2", destination: "10.0.2.1", proto: 6, payload: PacketFactory.pattern(40)),
            PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 1, payload: [8, 0, 0, 0, 1, 2]),
            PacketFactory.ipv6(payload: PacketFactory.udp(payload: PacketFactory.pattern(8))),
        ]
        var seen: [(RawFlowKey, Flow)] = []
        for _ in 0..<20_000 {
            var p = bases[Int.random(in: 0..<bases.count, using: &rng)]
            // Mutate a few bytes of the header and ports, sometimes the length.
            for _ in 0..<Int.random(in: 0...3, using: &rng) {
                let at = Int.random(in: 0..<min(p.count, 28), using: &rng)
                p[at] = [UInt8.random(in: 0...255, using: &rng), p[at] ^ 1, 0x45, 6, 17, 0][Int.random(in: 0..<6, using: &rng)]
            }
            if Bool.random(using: &rng) && Int.random(in: 0..<8, using: &rng) == 0 { p.removeLast(Int.random(in: 0...p.count, using: &rng)) }
            let mark = UInt32.random(in: 0...1, using: &rng)
            let ifindex = Int32.random(in: 1...2, using: &rng)
            guard let k = Self.key(p, mark: mark, ifindex: ifindex) else { continue }
            guard let f = Self.flow(p, mark: mark, ifindex: ifindex) else {
                Issue.record("a packet with a raw key does not parse: \(p.prefix(28))")
                continue
            }
            #expect(f.version == 4 && (f.proto == 6 || f.proto == 17))
            for (k2, f2) in seen where k2 == k {
                #expect(f2.sameFlow(f), "equal keys, different flows: \(f2) / \(f)")
            }
            if seen.count < 400 { seen.append((k, f)) } else { seen[Int.random(in: 0..<400, using: &rng)] = (k, f) }
        }
        #expect(seen.count == 400, "too few keyed packets to mean anything")
    }

    @Test("fragments, options, short packets, other protocols and trailing bytes have no key")
    func unusualPacketsHaveNoKey() {
        let udp = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(payload: PacketFactory.pattern(20)))
        #expect(Self.key(udp, mark: 0, ifindex: 1) != nil)
        var mf = udp
        mf[6] |= 0x20
        var offset = udp
        offset[7] = 1
        var options = udp
        options[0] = 0x46
        var longer = udp
        longer.append(0)
        var icmp = udp
        icmp[9] = 1
        for p in [mf, offset, options, longer, icmp, Array(udp.prefix(23))] {
            #expect(Self.key(p, mark: 0, ifindex: 1) == nil)
        }
        #expect(Self.key(udp, mark: 1, ifindex: 1) != Self.key(udp, mark: 0, ifindex: 1))
        #expect(Self.key(udp, mark: 0, ifindex: 2) != Self.key(udp, mark: 0, ifindex: 1))
    }
}
