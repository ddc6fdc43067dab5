import XFRMPacket

/// An address prefix (address and prefix length); bits beyond the length are ignored when matching.
public struct IPPrefix: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var length: UInt8

    public init(_ address: IPAddress, length: UInt8) {
        self.address = address
        self.length = length
    }

    /// The whole address space of a family (0.0.0.0/0 or ::/0).
    public static func any(version: Int) -> IPPrefix {
        version == 4 ? IPPrefix(.v4(0), length: 0) : IPPrefix(.v6(0, 0), length: 0)
    }

    /// Parses "ADDR" (full length) or "ADDR/LEN".
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let a = IPAddress(parts[0]) else { return nil }
        let maxLen = a.version == 4 ? 32 : 128
        var len = maxLen
        if parts.count == 2 {
            guard let l = Int(parts[1]), l >= 0, l <= maxLen else { return nil }
            len = l
        }
        self.init(a, length: UInt8(len))
    }

    /// True when the first `length` bits of `other` equal ours (same family required).
    @inline(__always)
    public func contains(_ other: IPAddress) -> Bool {
        switch (self.address, other) {
        case (.v4(let a), .v4(let b)):
            if self.length == 0 { return true }
            let mask: UInt32 = self.length >= 32 ? ~0 : ~(UInt32.max >> UInt32(self.length))
            return a & mask == b & mask
        case (.v6(let ah, let al), .v6(let bh, let bl)):
            let l = Int(self.length)
            if l == 0 { return true }
            if l <= 64 {
                let mask: UInt64 = l == 64 ? ~0 : ~(UInt64.max >> UInt64(l))
                return ah & mask == bh & mask
            }
            let mask: UInt64 = l >= 128 ? ~0 : ~(UInt64.max >> UInt64(l - 64))
            return ah == bh && al & mask == bl & mask
        default:
            return false
        }
    }

    public var description: String { "\(self.address)/\(self.length)" }
}

/// The traffic a packet belongs to (≈ struct flowi): addresses, upper protocol and ports. For ICMP and ICMPv6 the
/// type is carried as the source port and the code as the destination port, as the kernel does.
public struct Flow: Hashable, Sendable {
    public var source: IPAddress
    public var destination: IPAddress
    public var proto: UInt8
    public var sourcePort: UInt16
    public var destinationPort: UInt16
    /// The packet's mark (skb->mark) and input/output interface index.
    public var mark: UInt32
    public var ifindex: Int32
    /// The XFRM interface id the traffic belongs to (≈ the if_id of an xfrmi device); 0 for ordinary traffic.
    /// Policies match only traffic with exactly their if_id (xfrm_policy_match).
    public var ifID: UInt32

    public init(source: IPAddress, destination: IPAddress, proto: UInt8 = 0, sourcePort: UInt16 = 0,
                destinationPort: UInt16 = 0, mark: UInt32 = 0, ifindex: Int32 = 0, ifID: UInt32 = 0) {
        self.ifID = ifID
        self.source = source
        self.destination = destination
        self.proto = proto
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
        self.mark = mark
        self.ifindex = ifindex
    }

    /// 4 or 6.
    public var version: Int { self.destination.version }

    /// `==`, inlined into the per-packet memo checks (the synthesized one is an out-of-line call); the cheap integer
    /// fields first.
    @inline(__always)
    func sameFlow(_ o: Flow) -> Bool {
        let same = self.sourcePort == o.sourcePort && self.destinationPort == o.destinationPort && self.proto == o.proto
            && self.mark == o.mark && self.ifindex == o.ifindex && self.ifID == o.ifID
            && self.destination == o.destination && self.source == o.source
        assert(same == (self == o), "Flow gained a field sameFlow does not compare")
        return same
    }
}

/// Which traffic a policy or SA applies to (≈ struct xfrm_selector; matching ≈ xfrm_selector_match).
public struct Selector: Hashable, Sendable {
    /// 4, 6, or 0 for "either family" (AF_UNSPEC with zero-length prefixes).
    public var family: Int
    public var source: IPPrefix
    public var destination: IPPrefix
    /// Upper protocol, 0 = any.
    public var proto: UInt8
    /// Ports (ICMP: type in source, code in destination) and their masks; a mask of 0 matches any.
    public var sourcePort: UInt16
    public var sourcePortMask: UInt16
    public var destinationPort: UInt16
    public var destinationPortMask: UInt16
    /// Interface index, 0 = any.
    public var ifindex: Int32
    /// The selector's user field (uid), kept for listings.
    public var user: UInt32

    public init(family: Int, source: IPPrefix, destination: IPPrefix, proto: UInt8 = 0, sourcePort: UInt16 = 0,
                sourcePortMask: UInt16 = 0, destinationPort: UInt16 = 0, destinationPortMask: UInt16 = 0,
                ifindex: Int32 = 0, user: UInt32 = 0) {
        self.family = family
        self.source = source
        self.destination = destination
        self.proto = proto
        self.sourcePort = sourcePort
        self.sourcePortMask = sourcePortMask
        self.destinationPort = destinationPort
        self.destinationPortMask = destinationPortMask
        self.ifindex = ifindex
        self.user = user
    }

    /// Matches everything of one family (or both, with family 0).
    public static func any(family: Int = 0) -> Selector {
        let v = family == 6 ? 6 : 4
        return Selector(family: family, source: .any(version: v), destination: .any(version: v))
    }

    /// ≈ xfrm_selector_match as __xfrm_policy_check applies it to each SA of the secpath: the flow's family decides,
    /// so a selector with zero-length prefixes covers either family (an SA's selector of a 6-in-4 tunnel);
    /// a prefix of another family never covers the flow.
    @inline(__always)
    public func covers(_ flow: Flow) -> Bool {
        var s = self
        if s.source.length == 0 && s.destination.length == 0 {
            s.family = 0
        } else {
            guard s.source.address.version == flow.version, s.destination.address.version == flow.version else {
                return false
            }
            s.family = flow.version
        }
        return s.matches(flow)
    }

    /// True when `flow` is covered by this selector.
    @inline(__always)
    public func matches(_ flow: Flow) -> Bool {
        if self.family != 0 && self.family != flow.version { return false }
        if self.family == 0 {
            // AF_UNSPEC selectors only make sense with zero-length prefixes: they match either family.
            if self.source.length != 0 && !self.source.contains(flow.source) { return false }
            if self.destination.length != 0 && !self.destination.contains(flow.destination) { return false }
        } else {
            if !self.destination.contains(flow.destination) || !self.source.contains(flow.source) { return false }
        }
        if self.proto != 0 && self.proto != flow.proto { return false }
        if (flow.destinationPort ^ self.destinationPort) & self.destinationPortMask != 0 { return false }
        if (flow.sourcePort ^ self.sourcePort) & self.sourcePortMask != 0 { return false }
        if self.ifindex != 0 && self.ifindex != flow.ifindex { return false }
        return true
    }
}
