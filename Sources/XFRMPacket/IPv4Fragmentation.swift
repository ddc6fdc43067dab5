/// Fragmentation of an IPv4 packet larger than its interface's MTU (RFC 791 §3.2, "Fragmentation";
/// ≈ ip_do_fragment's slow path). RFC 4303 §3.3.5: an ESP packet is fragmented after ESP processing, so this is
/// the last step before the wire, for packets without DF.
///
/// Each fragment carries a copy of the header, its payload a multiple of eight bytes but the last; the offset and
/// More Fragments flag continue those of a packet that was itself a fragment. The first fragment keeps every
/// option; the others keep only options whose copied flag is set, the rest overwritten with No Operation, so the
/// header length stays the same (≈ ip_options_fragment).
public enum IPv4Fragmentation {
    /// How a packet is cut.
    public struct Plan: Sendable, Equatable {
        /// Its header's length (every fragment has the same).
        public let headerLength: Int
        /// Its payload's length (the total length less the header).
        public let payloadLength: Int
        /// Payload bytes per fragment but the last: a multiple of 8.
        public let chunk: Int
        /// How many fragments.
        public let count: Int
        /// The packet's own fragment offset, in bytes, and whether it had More Fragments set.
        public let offset: Int
        public let moreFragments: Bool

        /// The payload length of fragment `i`.
        @inline(__always)
        public func payload(of i: Int) -> Int { i == self.count - 1 ? self.payloadLength - i * self.chunk : self.chunk }
    }

    /// The plan for the IPv4 packet at `p` (`count` bytes, its header already checked) to leave through an
    /// interface of `mtu` bytes; nil when it is not IPv4, has DF set, fits already, its lengths disagree, or the MTU
    /// leaves no room for eight bytes of payload after the header (ip_fragment's "mtu < 8" refusal).
    public static func plan(_ p: UnsafeRawPointer, count: Int, mtu: Int) -> Plan? {
        guard count >= 20, p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4 else { return nil }
        let headerLength = Int(p.load(fromByteOffset: 0, as: UInt8.self) & 0x0f) * 4
        let totalLength = Int(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self)))
        let flags = UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        guard headerLength >= 20, totalLength == count, totalLength > headerLength, count > mtu,
            flags & IPv4Header.flagDF == 0
        else { return nil }
        let chunk = (mtu - headerLength) & ~7
        guard chunk >= 8 else { return nil }
        let payloadLength = totalLength - headerLength
        let offset = Int(flags & IPv4Header.fragmentOffsetMask) * 8
        // The last fragment's offset must fit the 13-bit field.
        guard offset + payloadLength <= 65_535 else { return nil }
        return Plan(headerLength: headerLength, payloadLength: payloadLength, chunk: chunk,
                    count: (payloadLength + chunk - 1) / chunk, offset: offset,
                    moreFragments: flags & IPv4Header.flagMF != 0)
    }

    /// Writes fragment `i` (1 ≤ i < count) of the packet at `p` into `out`, an empty buffer: the header with the
    /// options not copied into fragments blanked, then its part of the payload. False when `out` has no room.
    public static func writeFragment(_ i: Int, of p: UnsafeRawPointer, plan: Plan, into out: inout PacketBuffer)
        -> Bool
    {
        precondition(i >= 1 && i < plan.count)
        let payload = plan.payload(of: i)
        guard out.tailroom >= plan.headerLength + payload else { return false }
        let h = out.append(plan.headerLength + payload)
        h.copyMemory(from: p, byteCount: plan.headerLength)
        Self.blankUncopiedOptions(h, headerLength: plan.headerLength)
        (h + plan.headerLength).copyMemory(from: p + plan.headerLength + i * plan.chunk, byteCount: payload)
        Self.finish(h, plan: plan, index: i)
        return true
    }

    /// Turns the packet into its first fragment, in place (fragment 0 keeps every option).
    public static func makeFirst(_ packet: inout PacketBuffer, plan: Plan) {
        packet.trimBack(packet.count - plan.headerLength - plan.chunk)
        Self.finish(packet.data, plan: plan, index: 0)
    }

    /// Total length, offset and flags, checksum.
    @inline(__always)
    private static func finish(_ h: UnsafeMutableRawPointer, plan: Plan, index i: Int) {
        let last = i == plan.count - 1
        h.storeBytes(of: UInt16(plan.headerLength + plan.payload(of: i)).bigEndian, toByteOffset: 2, as: UInt16.self)
        // Offset and More Fragments only: DF is clear in a packet that is cut, and the reserved bit is cleared (as
        // ip_do_fragment writes the field afresh).
        var field = UInt16((plan.offset + i * plan.chunk) / 8)
        if !last || plan.moreFragments { field |= IPv4Header.flagMF }
        h.storeBytes(of: field.bigEndian, toByteOffset: 6, as: UInt16.self)
        IPv4Header.updateChecksum(h, headerLength: plan.headerLength)
    }

    /// Overwrites with No Operation (1) every option whose copied flag (the type's high bit) is clear; stops at End
    /// of Option List (0) or at an option whose length does not fit (what is left is blanked too).
    static func blankUncopiedOptions(_ h: UnsafeMutableRawPointer, headerLength: Int) {
        var i = 20
        while i < headerLength {
            let type = h.load(fromByteOffset: i, as: UInt8.self)
            if type == 0 { return }
            if type == 1 {
                i += 1
                continue
            }
            let length = i + 1 < headerLength ? Int(h.load(fromByteOffset: i + 1, as: UInt8.self)) : 0
            guard length >= 2, i + length <= headerLength else {
                (h + i).initializeMemory(as: UInt8.self, repeating: 1, count: headerLength - i)
                return
            }
            if type & 0x80 == 0 { (h + i).initializeMemory(as: UInt8.self, repeating: 1, count: length) }
            i += length
        }
    }
}
