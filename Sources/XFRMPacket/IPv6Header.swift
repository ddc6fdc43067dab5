/// IPv6 header and extension-header access on packet memory (RFC 8200).
public enum IPv6Header {
    /// IPv6's minimum link MTU (RFC 8200 §5): every link, tunnels included, carries packets of this size.
    public static let minimumMTU = 1280

    /// Result of walking an IPv6 packet's extension headers.
    public struct Info {
        /// Payload length from the fixed header (bytes after the 40-byte header).
        public var payloadLength: Int
        /// Offset of the first byte after the extension headers walked (the upper-layer or ESP header).
        public var upperOffset: Int
        /// The protocol found there.
        public var upperProtocol: UInt8
        /// Offset of the Next Header byte that names `upperProtocol` (6 for the fixed header).
        public var nextHeaderFieldOffset: Int
        /// True when a Fragment header was crossed.
        public var isFragment: Bool
    }

    /// True for the extension headers that are walked over on input (hop-by-hop, routing, fragment,
    /// destination options). The Mobility Header (135) is not walked over: it ends the chain as the upper layer
    /// (its payload proto is always 59, RFC 6275 §6.1.1), as ipv6_ext_hdr and the flow dissector have it, so the
    /// bytes behind it are never read as another protocol's header.
    @inline(__always)
    public static func isExtensionHeader(_ proto: UInt8) -> Bool {
        switch proto {
        case IPProtocolNumber.hopByHop, IPProtocolNumber.routing, IPProtocolNumber.fragment,
            IPProtocolNumber.destinationOptions:
            true
        default:
            false
        }
    }

    /// Validates the fixed header against `available` bytes and walks extension headers up to the first header
    /// that is not one (ESP, AH and upper-layer protocols stop the walk).
    @inline(__always)
    public static func parse(_ p: UnsafeMutableRawPointer, available: Int) -> Info? {
        guard available >= HeaderSize.ipv6, p.loadByte(at: 0) >> 4 == 6 else { return nil }
        let payload = Int(p.loadBE16(at: 4))
        guard HeaderSize.ipv6 + payload <= available else { return nil }
        let end = HeaderSize.ipv6 + payload
        var nh = p.loadByte(at: 6)
        var nhField = 6
        var off = HeaderSize.ipv6
        var fragment = false
        var hops = 0
        while isExtensionHeader(nh) {
            hops += 1
            guard hops <= 16, off + 8 <= end else { return nil }
            if nh == IPProtocolNumber.hopByHop && off != HeaderSize.ipv6 { return nil }
            let len: Int
            if nh == IPProtocolNumber.fragment {
                len = 8
                let fo = p.loadBE16(at: off + 2)
                if fo & 0xfff9 != 0 { fragment = true }  // offset != 0 or M flag
            } else {
                len = (Int(p.loadByte(at: off + 1)) + 1) * 8
            }
            guard off + len <= end else { return nil }
            nhField = off
            nh = p.loadByte(at: off)
            off += len
        }
        return Info(
            payloadLength: payload, upperOffset: off, upperProtocol: nh, nextHeaderFieldOffset: nhField,
            isFragment: fragment)
    }

    /// The offset at which transport-mode ESP is inserted on output (RFC 4303 §3.1.1; ≈ ip6_find_1stfragopt):
    /// after hop-by-hop, routing, and destination options not preceded by a routing header. Also returns the
    /// offset of the Next Header byte to rewrite. Nil when the headers are malformed.
    public static func transportInsertionPoint(_ p: UnsafeMutableRawPointer, available: Int)
        -> (offset: Int, nextHeaderField: Int)?
    {
        guard available >= HeaderSize.ipv6 else { return nil }
        var nh = p.loadByte(at: 6)
        var nhField = 6
        var off = HeaderSize.ipv6
        var sawRouting = false
        var hops = 0
        while true {
            hops += 1
            guard hops <= 16 else { return nil }
            switch nh {
            case IPProtocolNumber.hopByHop, IPProtocolNumber.routing:
                if nh == IPProtocolNumber.routing { sawRouting = true }
            case IPProtocolNumber.destinationOptions:
                // Destination options after a routing header go inside ESP; any before one (or without one) stay in
                // front of it, as ip6_find_1stfragopt skips them (and scapy's split_for_transport).
                if sawRouting { return (off, nhField) }
            default:
                return (off, nhField)
            }
            guard off + 2 <= available else { return nil }
            let len = (Int(p.loadByte(at: off + 1)) + 1) * 8
            guard off + len <= available else { return nil }
            nhField = off
            nh = p.loadByte(at: off)
            off += len
        }
    }

    /// Writes a 40-byte fixed header.
    @inline(__always)
    public static func write(
        _ p: UnsafeMutableRawPointer, trafficClass: UInt8, flowLabel: UInt32, payloadLength: Int,
        nextHeader: UInt8, hopLimit: UInt8, source: IPAddress, destination: IPAddress
    ) {
        p.storeBE32(6 << 28 | UInt32(trafficClass) << 20 | (flowLabel & 0xfffff), at: 0)
        p.storeBE16(UInt16(truncatingIfNeeded: payloadLength), at: 4)
        p.storeByte(nextHeader, at: 6)
        p.storeByte(hopLimit, at: 7)
        source.store(to: p, at: 8)
        destination.store(to: p, at: 24)
    }

    /// Traffic class of the header at `p`.
    @inline(__always)
    public static func trafficClass(_ p: UnsafeMutableRawPointer) -> UInt8 {
        UInt8(truncatingIfNeeded: p.loadBE32(at: 0) >> 20)
    }

    /// Replaces the traffic class of the header at `p`.
    @inline(__always)
    public static func setTrafficClass(_ p: UnsafeMutableRawPointer, _ tc: UInt8) {
        let w = p.loadBE32(at: 0)
        p.storeBE32(w & 0xf00f_ffff | UInt32(tc) << 20, at: 0)
    }
}

/// UDP (RFC 768) checksum with the IPv4 or IPv6 pseudo-header.
public enum UDPHeader {
    /// Computes the checksum of the UDP datagram at `udp` (header + payload, `length` bytes) between `source`
    /// and `destination`; returns 0xffff for a computed zero (RFC 768).
    public static func checksum(
        _ udp: UnsafeMutableRawPointer, length: Int, source: IPAddress, destination: IPAddress
    ) -> UInt16 {
        var sum: UInt64 = 0
        switch (source, destination) {
        case (.v4(let s), .v4(let d)):
            sum = UInt64(s) &+ UInt64(d) &+ UInt64(IPProtocolNumber.udp) &+ UInt64(length)
        case (.v6(let sh, let sl), .v6(let dh, let dl)):
            sum = (sh >> 32) &+ (sh & 0xffff_ffff) &+ (sl >> 32) &+ (sl & 0xffff_ffff)
            sum &+= (dh >> 32) &+ (dh & 0xffff_ffff) &+ (dl >> 32) &+ (dl & 0xffff_ffff)
            sum &+= UInt64(length) &+ UInt64(IPProtocolNumber.udp)
        default:
            return 0
        }
        let c = InternetChecksum.finish(InternetChecksum.partial(udp, count: length, initial: sum))
        return c == 0 ? 0xffff : c
    }
}
