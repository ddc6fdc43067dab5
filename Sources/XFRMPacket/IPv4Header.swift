/// IPv4 header access on packet memory (RFC 791). Offsets are relative to the header's first byte.
public enum IPv4Header {
    public static let flagDF: UInt16 = 0x4000
    public static let flagMF: UInt16 = 0x2000
    public static let fragmentOffsetMask: UInt16 = 0x1fff

    /// Result of validating an IPv4 header in a packet.
    public struct Info {
        /// Header length in bytes (IHL × 4), options included.
        public var headerLength: Int
        /// Total length from the header.
        public var totalLength: Int
        public var proto: UInt8
        public var isFragment: Bool
    }

    /// Validates version, IHL, total length against `available` bytes, and the header checksum (unless
    /// `verifyChecksum` is false: a header this code verified or wrote a moment ago, on the same packet path).
    @inline(__always)
    public static func parse(_ p: UnsafeMutableRawPointer, available: Int, verifyChecksum: Bool = true) -> Info? {
        guard available >= HeaderSize.ipv4Minimum else { return nil }
        let vihl = p.loadByte(at: 0)
        guard vihl >> 4 == 4 else { return nil }
        let ihl = Int(vihl & 0x0f) * 4
        guard ihl >= HeaderSize.ipv4Minimum, ihl <= available else { return nil }
        let total = Int(p.loadBE16(at: 2))
        guard total >= ihl, total <= available else { return nil }
        guard !verifyChecksum || Self.checksumIsValid(p, headerLength: ihl) else { return nil }
        let frag = p.loadBE16(at: 6)
        return Info(
            headerLength: ihl, totalLength: total, proto: p.loadByte(at: 9),
            isFragment: frag & (flagMF | fragmentOffsetMask) != 0)
    }

    /// Writes a 20-byte header without options and its checksum.
    @inline(__always)
    public static func write(
        _ p: UnsafeMutableRawPointer, tos: UInt8, totalLength: Int, identification: UInt16, flags: UInt16,
        ttl: UInt8, proto: UInt8, source: UInt32, destination: UInt32
    ) {
        p.storeByte(0x45, at: 0)
        p.storeByte(tos, at: 1)
        p.storeBE16(UInt16(truncatingIfNeeded: totalLength), at: 2)
        p.storeBE16(identification, at: 4)
        p.storeBE16(flags, at: 6)
        p.storeByte(ttl, at: 8)
        p.storeByte(proto, at: 9)
        p.storeBE32(source, at: 12)
        p.storeBE32(destination, at: 16)
        // The checksum from the values in registers: summing the bytes just stored would load words that span
        // several smaller stores, which the CPU cannot forward (a stall on every packet).
        var sum = UInt64(0x4500 | UInt32(tos)) &+ UInt64(UInt16(truncatingIfNeeded: totalLength))
        sum &+= UInt64(identification) &+ UInt64(flags) &+ UInt64(UInt32(ttl) << 8 | UInt32(proto))
        sum &+= UInt64(source >> 16) &+ UInt64(source & 0xffff) &+ UInt64(destination >> 16)
        sum &+= UInt64(destination & 0xffff)
        p.storeBE16(InternetChecksum.finish(sum), at: 10)
    }

    /// Whether the header's checksum verifies (its ones'-complement sum is all ones). The usual 20-byte header as
    /// five word loads, no loop.
    @inline(__always)
    public static func checksumIsValid(_ p: UnsafeMutableRawPointer, headerLength: Int) -> Bool {
        guard headerLength == HeaderSize.ipv4Minimum else { return InternetChecksum.compute(p, count: headerLength) == 0 }
        var sum = UInt64(p.loadBE32(at: 0)) &+ UInt64(p.loadBE32(at: 4)) &+ UInt64(p.loadBE32(at: 8))
        sum &+= UInt64(p.loadBE32(at: 12)) &+ UInt64(p.loadBE32(at: 16))
        return InternetChecksum.finish(sum) == 0
    }

    /// Lowers the TTL by one and updates the checksum incrementally (RFC 1624; ≈ ip_decrease_ttl): the TTL is the
    /// high byte of the 16-bit word at offset 8, so the checksum grows by 0x0100 with the end-around carry.
    @inline(__always)
    public static func decrementTTL(_ p: UnsafeMutableRawPointer) {
        p.storeByte(p.loadByte(at: 8) &- 1, at: 8)
        let check = UInt32(p.loadBE16(at: 10)) + 0x0100
        p.storeBE16(UInt16(truncatingIfNeeded: check + (check >= 0xFFFF ? 1 : 0)), at: 10)
    }

    /// Recomputes the header checksum over `headerLength` bytes.
    @inline(__always)
    public static func updateChecksum(_ p: UnsafeMutableRawPointer, headerLength: Int) {
        p.storeBE16(0, at: 10)
        p.storeBE16(InternetChecksum.compute(p, count: headerLength), at: 10)
    }
}
