import Testing
import XFRMPacket

@Suite("IPv6 fragmentation plans (RFC 8200 §4.5, ip6_fragment)")
struct IPv6FragmentationPlanTests {
    /// An IPv6 packet of `size` bytes whose header chain is `headers` (type, 8-byte units after the first 8), then
    /// `upper` (the last Next Header) and a payload.
    static func packet(size: Int, headers: [(UInt8, Int)] = [], upper: UInt8 = 50) -> [UInt8] {
        var p: [UInt8] = [0x60, 0, 0, 0, UInt8((size - 40) >> 8), UInt8((size - 40) & 0xff), headers.first?.0 ?? upper, 64]
        p += [UInt8](repeating: 0x11, count: 16) + [UInt8](repeating: 0x22, count: 16)
        for (i, h) in headers.enumerated() {
            let next = i + 1 < headers.count ? headers[i + 1].0 : upper
            p += [next, UInt8(h.1)] + [UInt8](repeating: 0, count: 6 + 8 * h.1)
        }
        p += (0..<(size - p.count)).map { UInt8(truncatingIfNeeded: $0) }
        return p
    }

    static func plan(_ p: [UInt8], mtu: Int) -> IPv6Fragmentation.Plan? {
        p.withUnsafeBytes { IPv6Fragmentation.plan($0.baseAddress!, count: p.count, mtu: mtu, identification: 1) }
    }

    @Test("the unfragmentable part: Hop-by-Hop, Routing and Destination Options before Routing stay in front; Destination Options after Routing do not")
    func unfragmentablePart() throws {
        let plain = try #require(Self.plan(Self.packet(size: 1500), mtu: 1280))
        #expect(plain.unfragmentable == 40 && plain.nextHeaderOffset == 6 && plain.nextHeader == 50)
        #expect(plain.chunk == 1232 && plain.count == 2 && plain.payloadLength == 1460)
        let chain = try #require(Self.plan(Self.packet(size: 1500, headers: [(0, 0), (60, 1), (43, 0), (60, 0)]),
                                           mtu: 1280))
        // 40 + 8 (hop-by-hop) + 16 (destination) + 8 (routing): the last Destination Options header is fragmentable.
        #expect(chain.unfragmentable == 72 && chain.nextHeaderOffset == 64 && chain.nextHeader == 60)
        #expect(chain.chunk == (1280 - 72 - 8) & ~7)
        let dest = try #require(Self.plan(Self.packet(size: 1500, headers: [(60, 0)], upper: 17), mtu: 1280))
        #expect(dest.unfragmentable == 48 && dest.nextHeader == 17, "as ip6_find_1stfragopt, before any Routing")
    }

    @Test("no plan: a packet that fits, one already a fragment, a wrong payload length, a chain past the packet, an MTU with no room for 8 bytes")
    func refusals() {
        #expect(Self.plan(Self.packet(size: 1280), mtu: 1280) == nil)
        #expect(Self.plan(Self.packet(size: 1500, headers: [(44, 0)]), mtu: 1280) == nil)
        var wrong = Self.packet(size: 1500)
        wrong[5] &+= 1
        #expect(Self.plan(wrong, mtu: 1280) == nil)
        var past = Self.packet(size: 1500, headers: [(0, 0)])
        past[41] = 250  // 2,008 bytes of hop-by-hop options
        #expect(Self.plan(past, mtu: 1280) == nil)
        #expect(Self.plan(Self.packet(size: 1500), mtu: 55) == nil)
        #expect(Self.plan(Self.packet(size: 1500), mtu: 56) != nil)
    }

    @Test("the first fragment is made in place and needs 8 bytes of headroom; without them the packet is left as it was")
    func firstNeedsHeadroom() throws {
        let bytes = Self.packet(size: 1500)
        let storage = UnsafeMutableRawPointer.allocate(byteCount: 2048, alignment: 16)
        defer { storage.deallocate() }
        var none = PacketBuffer(storage: storage, capacity: 2048, headroom: 0)
        let appended = none.append(contentsOf: bytes)
        #expect(appended)
        let plan = try #require(Self.plan(bytes, mtu: 1280))
        let made = IPv6Fragmentation.makeFirst(&none, plan: plan)
        #expect(!made)
        #expect(none.bytes == bytes)
        var room = PacketBuffer(storage: storage, capacity: 2048, headroom: 8)
        let appended2 = room.append(contentsOf: bytes)
        #expect(appended2)
        let made2 = IPv6Fragmentation.makeFirst(&room, plan: plan)
        #expect(made2)
        let first = room.bytes
        #expect(first.count == 40 + 8 + 1232 && Array(first[8..<40]) == Array(bytes[8..<40]))
        #expect(first[6] == 44 && first[40] == 50 && first[42] == 0 && first[43] == 1)
        #expect(Array(first[48...]) == Array(bytes[40..<(40 + 1232)]))
    }
}
