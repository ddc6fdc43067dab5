import XFRMPacket

/// Policy direction (≈ XFRM_POLICY_IN/OUT/FWD).
public enum PolicyDirection: UInt8, Sendable, CaseIterable {
    case inbound = 0
    case outbound = 1
    case forward = 2

    /// The iproute2 name: in, out, fwd.
    public var name: String {
        switch self {
        case .inbound: "in"
        case .outbound: "out"
        case .forward: "fwd"
        }
    }
}

/// Policy action (≈ XFRM_POLICY_ALLOW/BLOCK).
public enum PolicyAction: UInt8, Sendable {
    case allow = 0
    case block = 1
}

/// A mark and mask (≈ struct xfrm_mark): matches when `packetMark & mask == value`.
public struct Mark: Hashable, Sendable {
    public var value: UInt32
    public var mask: UInt32
    public init(value: UInt32 = 0, mask: UInt32 = 0) {
        self.value = value
        self.mask = mask
    }
    @inline(__always) public func matches(_ mark: UInt32) -> Bool { mark & self.mask == self.value }
}

/// Lifetime limits (≈ xfrm_lifetime_cfg). Byte/packet limits of `UInt64.max` are infinite; times of 0 are off.
public struct LifetimeConfig: Hashable, Sendable {
    public var softByteLimit: UInt64 = .max
    public var hardByteLimit: UInt64 = .max
    public var softPacketLimit: UInt64 = .max
    public var hardPacketLimit: UInt64 = .max
    public var softAddExpiresSeconds: UInt64 = 0
    public var hardAddExpiresSeconds: UInt64 = 0
    public var softUseExpiresSeconds: UInt64 = 0
    public var hardUseExpiresSeconds: UInt64 = 0
    public init() {}

    /// Whether a timer can end or warn about it (any of the four time limits set).
    public var hasTimeLimit: Bool {
        (self.softAddExpiresSeconds | self.hardAddExpiresSeconds | self.softUseExpiresSeconds
            | self.hardUseExpiresSeconds) != 0
    }
}

/// A policy's template: one transform the matching traffic must go through (≈ struct xfrm_tmpl).
public struct Template: Hashable, Sendable {
    /// Tunnel endpoints (tunnel mode) — destination may be nil in transport mode (taken from the flow).
    public var source: IPAddress?
    public var destination: IPAddress?
    /// 0 = any SPI.
    public var spi: UInt32
    /// IPPROTO_ESP (50), AH (51) or COMP (108).
    public var proto: UInt8
    /// 0 = transport, 1 = tunnel (XFRM_MODE_*).
    public var mode: UInt8
    /// 0 = any SA of the right kind.
    public var reqid: UInt32
    /// `level use`: optional — an absent SA does not block the packet.
    public var optional: Bool
    public var share: UInt8
    public var authAlgorithms: UInt32
    public var encryptionAlgorithms: UInt32
    public var compressionAlgorithms: UInt32
    /// The template's address family as configured (≈ xfrm_tmpl.encap_family: 4 or 6), kept for listings of
    /// templates without addresses; 0 = the family of its addresses or of the policy's selector.
    public var family: Int

    public init(source: IPAddress? = nil, destination: IPAddress? = nil, spi: UInt32 = 0, proto: UInt8 = 50,
                mode: UInt8 = 0, reqid: UInt32 = 0, optional: Bool = false, share: UInt8 = 0,
                authAlgorithms: UInt32 = ~0, encryptionAlgorithms: UInt32 = ~0, compressionAlgorithms: UInt32 = ~0,
                family: Int = 0) {
        self.family = family
        self.source = source
        self.destination = destination
        self.spi = spi
        self.proto = proto
        self.mode = mode
        self.reqid = reqid
        self.optional = optional
        self.share = share
        self.authAlgorithms = authAlgorithms
        self.encryptionAlgorithms = encryptionAlgorithms
        self.compressionAlgorithms = compressionAlgorithms
    }
}

/// A packet-offload binding of a policy to a device (≈ xfrm_dev_offload in a policy).
public struct PolicyOffload: Hashable, Sendable {
    public var ifindex: Int32
    public init(ifindex: Int32) { self.ifindex = ifindex }
}

/// A security policy (≈ struct xfrm_policy). Immutable once in the database, except its use time.
public struct Policy: Hashable, Sendable {
    public var selector: Selector
    public var direction: PolicyDirection
    public var action: PolicyAction
    /// Lower wins; ties go to the older policy.
    public var priority: UInt32
    /// Allocated by the database when 0 on insert; `index & 7` is the direction (as the kernel encodes it).
    public var index: UInt32
    public var mark: Mark
    public var ifID: UInt32
    public var flags: UInt8
    /// XFRM_POLICY_CPU_ACQUIRE (Linux 6.13, RFC 9611): resolution asks the key manager for an SA per CPU.
    public static let cpuAcquireFlag: UInt8 = 4
    /// XFRM_POLICY_ICMP: the policy also protects ICMP errors about the traffic it covers, found by their quoted
    /// packet (XFRM_LOOKUP_ICMP).
    public static let icmpFlag: UInt8 = 2
    public var templates: [Template]
    public var lifetime: LifetimeConfig
    /// Packet offload to a device, if any; such policies are consulted before every software policy.
    public var offload: PolicyOffload?
    /// Creation time in seconds on the stack's clock (curlft.add_time).
    public var addTime: UInt64
    /// Insertion order; older policies win priority ties.
    public var generation: UInt64

    public init(selector: Selector, direction: PolicyDirection, action: PolicyAction = .allow, priority: UInt32 = 0,
                index: UInt32 = 0, mark: Mark = Mark(), ifID: UInt32 = 0, flags: UInt8 = 0,
                templates: [Template] = [], lifetime: LifetimeConfig = LifetimeConfig(),
                offload: PolicyOffload? = nil, addTime: UInt64 = 0, generation: UInt64 = 0) {
        self.selector = selector
        self.direction = direction
        self.action = action
        self.priority = priority
        self.index = index
        self.mark = mark
        self.ifID = ifID
        self.flags = flags
        self.templates = templates
        self.lifetime = lifetime
        self.offload = offload
        self.addTime = addTime
        self.generation = generation
    }

    /// Two policies collide (EEXIST on add, replaced on update) when these are equal (≈ xfrm_policy_insert's
    /// duplicate test: type, direction, selector, mark, if_id; offloaded and software policies still collide).
    public struct Key: Hashable, Sendable {
        public var direction: PolicyDirection
        public var selector: Selector
        public var markValue: UInt32
        public var markMask: UInt32
        public var ifID: UInt32

        public init(direction: PolicyDirection, selector: Selector, markValue: UInt32 = 0, markMask: UInt32 = 0,
                    ifID: UInt32 = 0) {
            self.direction = direction
            self.selector = selector
            self.markValue = markValue
            self.markMask = markMask
            self.ifID = ifID
        }
    }

    public var key: Key {
        Key(direction: self.direction, selector: self.selector, markValue: self.mark.value, markMask: self.mark.mask,
            ifID: self.ifID)
    }
}
