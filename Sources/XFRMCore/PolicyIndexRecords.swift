// The records of the SPD's lookup index (PolicyIndex): addresses as 128 left-aligned bits, radix-tree nodes with
// their priority bounds, the flat candidate a lookup checks per policy (≈ the fields xfrm_policy_match and
// xfrm_selector_match read), the per-prefix-pair leaves with their per-port lists, and the running best match.

import XFRMPacket

/// An address as 128 left-aligned bits (IPv4 in the top 32), so both families share one tree implementation.
struct AddressBits: Equatable, Sendable {
    var hi: UInt64
    var lo: UInt64

    static let zero = AddressBits(hi: 0, lo: 0)

    init(hi: UInt64, lo: UInt64) {
        self.hi = hi
        self.lo = lo
    }

    @inline(__always)
    init(_ address: IPAddress) {
        switch address {
        case .v4(let a):
            self.hi = UInt64(a) &<< 32
            self.lo = 0
        case .v6(let h, let l):
            self.hi = h
            self.lo = l
        }
    }

    /// Only the first `length` bits kept.
    @inline(__always)
    func masked(_ length: Int) -> AddressBits {
        if length <= 0 { return .zero }
        if length < 64 { return AddressBits(hi: self.hi & ~(UInt64.max &>> UInt64(length)), lo: 0) }
        if length == 64 { return AddressBits(hi: self.hi, lo: 0) }
        if length < 128 { return AddressBits(hi: self.hi, lo: self.lo & ~(UInt64.max &>> UInt64(length - 64))) }
        return self
    }

    /// Bit `i` (0 = most significant), for i < 128.
    @inline(__always)
    func bit(_ i: Int) -> Int {
        i < 64 ? Int(truncatingIfNeeded: (self.hi &>> UInt64(63 - i)) & 1)
            : Int(truncatingIfNeeded: (self.lo &>> UInt64(127 - i)) & 1)
    }

    /// How many leading bits the two share (128 when equal).
    @inline(__always)
    func commonPrefixLength(_ other: AddressBits) -> Int {
        let h = self.hi ^ other.hi
        if h != 0 { return h.leadingZeroBitCount }
        return 64 + (self.lo ^ other.lo).leadingZeroBitCount
    }
}

/// One radix-tree node: a prefix, two children and an optional payload (in a destination tree, the root node of a
/// source tree; in a source tree, a leaf id). -1 means none.
struct TrieNode: Equatable, Sendable {
    var bits: AddressBits
    var length: Int32
    var parent: Int32
    var child0: Int32
    var child1: Int32
    var payload: Int32
    /// In a destination tree: a lower bound of the priority values in the source tree (payload). Raised only when
    /// that tree is emptied, so after removals it may be lower than the true minimum (still a valid bound).
    var priorityBound: UInt32
    /// A lower bound of the priority values under this node (in a destination tree: in its own source tree and
    /// those of its descendants; in a source tree: in its list and its descendants'), kept the same way; a walk
    /// stops where nothing below can beat the best found so far.
    var subtreeBound: UInt32

    init(bits: AddressBits, length: Int, parent: Int32) {
        self.bits = bits
        self.length = Int32(length)
        self.parent = parent
        self.child0 = -1
        self.child1 = -1
        self.payload = -1
        self.priorityBound = .max
        self.subtreeBound = .max
    }

    @inline(__always) func child(_ b: Int) -> Int32 { b == 0 ? self.child0 : self.child1 }
    @inline(__always) mutating func setChild(_ b: Int, _ n: Int32) {
        if b == 0 { self.child0 = n } else { self.child1 = n }
    }
}

/// What the lookup checks of a policy once its prefixes are known to cover the flow, copied out of the Policy so
/// the hot path reads a small flat record.
struct PolicyCandidate: Equatable, Sendable {
    var priority: UInt32
    var slot: Int32
    var generation: UInt64
    var markValue: UInt32
    var markMask: UInt32
    var ifID: UInt32
    var ifindex: Int32
    var sourcePort: UInt16
    var sourcePortMask: UInt16
    var destinationPort: UInt16
    var destinationPortMask: UInt16
    var proto: UInt8
    /// A family-0 selector (matches a flow whatever its families).
    var anyFamily: Bool

    init(_ policy: Policy, slot: Int32) {
        self.priority = policy.priority
        self.slot = slot
        self.generation = policy.generation
        self.markValue = policy.mark.value
        self.markMask = policy.mark.mask
        self.ifID = policy.ifID
        self.ifindex = policy.selector.ifindex
        self.sourcePort = policy.selector.sourcePort
        self.sourcePortMask = policy.selector.sourcePortMask
        self.destinationPort = policy.selector.destinationPort
        self.destinationPortMask = policy.selector.destinationPortMask
        self.proto = policy.selector.proto
        self.anyFamily = policy.selector.family == 0
    }

    /// Strictly better than (priority, generation): lower priority value, or equal and older.
    @inline(__always)
    func precedes(_ priority: UInt32, _ generation: UInt64) -> Bool {
        self.priority < priority || (self.priority == priority && self.generation < generation)
    }

    /// The non-prefix half of Selector.matches plus Mark.matches and the if_id.
    @inline(__always)
    func matches(_ flow: Flow) -> Bool {
        (self.proto == 0 || self.proto == flow.proto)
            && (flow.destinationPort ^ self.destinationPort) & self.destinationPortMask == 0
            && (flow.sourcePort ^ self.sourcePort) & self.sourcePortMask == 0
            && (self.ifindex == 0 || self.ifindex == flow.ifindex)
            && flow.mark & self.markMask == self.markValue
            && self.ifID == flow.ifID  // ≈ xfrm_policy_match: pol->if_id != if_id → no match
    }
}

/// The candidate lists of one (destination, source) prefix pair: policies with an exact destination port (mask
/// 0xffff) are kept per port, the others in `general`.
struct PolicyLeaf: Equatable, Sendable {
    struct PortList: Equatable, Sendable {
        var port: UInt16
        var list: Int32
    }
    /// List id for the policies without an exact destination port, -1 if none.
    var general: Int32 = -1
    /// Sorted by port.
    var ports: ContiguousArray<PortList> = []

    var isEmpty: Bool { self.general < 0 && self.ports.isEmpty }

    /// The position of `port` in `ports`, or where it would go.
    @inline(__always)
    static func position(of port: UInt16, in ports: UnsafeBufferPointer<PortList>) -> Int {
        var lo = 0
        var hi = ports.count
        while lo < hi {
            let mid = (lo + hi) &>> 1
            if ports[mid].port < port { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}

/// The best candidate found so far by a lookup (slot -1: none).
struct LookupBest {
    var priority: UInt32 = .max
    var generation: UInt64 = .max
    var slot: Int32 = -1
}
