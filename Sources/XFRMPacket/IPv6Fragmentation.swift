/// Fragmentation of an IPv6 packet by its source (RFC 8200 §4.5; ≈ ip6_fragment's slow path). Routers never
/// fragment IPv6, so this is only for packets this host builds: the outer packets of ESP, which Linux lets the IPv6
/// layer fragment (xfrm6_prepare_output sets ignore_df on them) and which RFC 4303 §3.3.5 fragments after ESP.
///
/// The packet is cut after its unfragmentable part — the IPv6 header and the extension headers that stay in front
/// (≈ ip6_find_1stfragopt: Hop-by-Hop Options, Routing, Destination Options before any Routing header). Each
/// fragment carries a copy of that part, an 8-byte Fragment header (RFC 8200 §4.5: the original next header, the
/// offset in 8-byte units, More Fragments, the identification) and its share of the rest, a multiple of 8 bytes but
/// the last; the Next Header byte that named the first fragmentable header names the Fragment header (44) instead.
public enum IPv6Fragmentation {
    /// The Fragment header's size and its Next Header value.
    public static let headerSize = 8
    public static let fragmentHeader: UInt8 = 44

    /// How a packet is cut.
    public struct Plan: Sendable, Equatable {
        /// The unfragmentable part's length (IPv6 header and the extension headers that stay in front).
        public let unfragmentable: Int
        /// Where the Next Header byte to rewrite is (6 for the IPv6 header's own).
        public let nextHeaderOffset: Int
        /// The header type that byte held: the Fragment header's Next Header.
        public let nextHeader: UInt8
        /// The fragmentable part's length.
        public let payloadLength: Int
        /// Fragmentable bytes per fragment but the last: a multiple of 8.
        public let chunk: Int
        /// How many fragments.
        public let count: Int
        /// The Fragment header's identification (network byte order is written).
        public let identification: UInt32

        /// The fragmentable bytes fragment `i` carries.
        @inline(__always)
        public func payload(of i: Int) -> Int { i == self.count - 1 ? self.payloadLength - i * self.chunk : self.chunk }

        /// Fragment `i`'s size on the wire.
        @inline(__always)
        public func size(of i: Int) -> Int { self.unfragmentable + IPv6Fragmentation.headerSize + self.payload(of: i) }
    }

    /// The plan for the IPv6 packet at `p` (`count` bytes) to leave through an interface of `mtu` bytes, with
    /// `identification`; nil when it is not IPv6, fits already, its payload length disagrees with `count`, it is
    /// already a fragment (or its headers run past it), or the MTU leaves no room for 8 bytes after the unfragmentable
    /// part and a Fragment header (ip6_fragment's fail_toobig).
    public static func plan(_ p: UnsafeRawPointer, count: Int, mtu: Int, identification: UInt32) -> Plan? {
        guard count >= 40, count > mtu, p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 6,
            Int(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))) + 40 == count
        else { return nil }
        guard let (unfragmentable, nextOffset) = Self.unfragmentablePart(p, count: count) else { return nil }
        let next = p.load(fromByteOffset: nextOffset, as: UInt8.self)
        let chunk = (mtu - unfragmentable - Self.headerSize) & ~7
        let payloadLength = count - unfragmentable
        guard chunk >= 8, payloadLength > 0 else { return nil }
        return Plan(unfragmentable: unfragmentable, nextHeaderOffset: nextOffset, nextHeader: next,
                    payloadLength: payloadLength, chunk: chunk, count: (payloadLength + chunk - 1) / chunk,
                    identification: identification)
    }

    /// The unfragmentable part's length and the offset of the Next Header byte that ends it; nil for a packet that
    /// already has a Fragment header or whose extension headers do not fit it. As ip6_find_1stfragopt: Hop-by-Hop
    /// and Routing headers stay in front, and so does a Destination Options header met before any Routing header;
    /// one after a Routing header (for the final destination) starts the fragmentable part.
    static func unfragmentablePart(_ p: UnsafeRawPointer, count: Int) -> (Int, Int)? {
        var offset = 40
        var nextOffset = 6
        var sawRouting = false
        while true {
            let next = p.load(fromByteOffset: nextOffset, as: UInt8.self)
            switch next {
            case 0, 43, 60:  // Hop-by-Hop, Routing, Destination Options: (8 + 8 × length) bytes
                if next == 60 && sawRouting { return (offset, nextOffset) }
                guard offset + 2 <= count else { return nil }
                let length = 8 + 8 * Int(p.load(fromByteOffset: offset + 1, as: UInt8.self))
                guard offset + length <= count else { return nil }
                if next == 43 { sawRouting = true }
                nextOffset = offset
                offset += length
            case Self.fragmentHeader:
                return nil
            default:
                return (offset, nextOffset)
            }
        }
    }

    /// Writes fragment `i` (1 ≤ i < count) of the packet at `p` into `out`, an empty buffer. False when `out` has no
    /// room.
    public static func writeFragment(_ i: Int, of p: UnsafeRawPointer, plan: Plan, into out: inout PacketBuffer)
        -> Bool
    {
        precondition(i >= 1 && i < plan.count)
        let payload = plan.payload(of: i)
        let size = plan.size(of: i)
        guard out.tailroom >= size else { return false }
        let h = out.append(size)
        h.copyMemory(from: p, byteCount: plan.unfragmentable)
        (h + plan.unfragmentable + Self.headerSize).copyMemory(from: p + plan.unfragmentable + i * plan.chunk,
                                                               byteCount: payload)
        Self.finish(h, plan: plan, index: i)
        return true
    }

    /// Turns the packet into its first fragment, in place: the unfragmentable part moves 8 bytes forward into the
    /// headroom to make room for the Fragment header. False (the packet unchanged) without 8 bytes of headroom.
    public static func makeFirst(_ packet: inout PacketBuffer, plan: Plan) -> Bool {
        guard packet.headroom >= Self.headerSize else { return false }
        let old = packet.data
        let h = packet.prepend(Self.headerSize)
        h.copyMemory(from: old, byteCount: plan.unfragmentable)  // forward overlap: memmove semantics
        packet.trimBack(packet.count - plan.size(of: 0))
        Self.finish(h, plan: plan, index: 0)
        return true
    }

    /// Payload length, the rewritten Next Header, the Fragment header.
    @inline(__always)
    private static func finish(_ h: UnsafeMutableRawPointer, plan: Plan, index i: Int) {
        let size = plan.size(of: i)
        h.storeBytes(of: UInt16(size - 40).bigEndian, toByteOffset: 4, as: UInt16.self)
        h.storeBytes(of: Self.fragmentHeader, toByteOffset: plan.nextHeaderOffset, as: UInt8.self)
        let f = h + plan.unfragmentable
        f.storeBytes(of: plan.nextHeader, toByteOffset: 0, as: UInt8.self)
        f.storeBytes(of: 0, toByteOffset: 1, as: UInt8.self)
        var field = UInt16(i * plan.chunk)  // offset in 8-byte units in the top 13 bits: bytes & ~7
        if i != plan.count - 1 { field |= 1 }
        f.storeBytes(of: field.bigEndian, toByteOffset: 2, as: UInt16.self)
        f.storeBytes(of: plan.identification.bigEndian, toByteOffset: 4, as: UInt32.self)
    }
}
