import XFRMPacket

/// xfrm_address_t: 16 bytes, meaning given by a family beside it.
public struct XfrmAddress: Equatable, Hashable, Sendable {
    public var bytes: [UInt8]
    public init() { self.bytes = [UInt8](repeating: 0, count: 16) }
    public init(_ address: IPAddress) {
        var b = address.bytes
        b += [UInt8](repeating: 0, count: 16 - b.count)
        self.bytes = b
    }
    public init(bytes: [UInt8]) {
        precondition(bytes.count == 16)
        self.bytes = bytes
    }
    /// The address under `family` (AF_INET reads the first 4 bytes).
    public func ip(family: UInt16) -> IPAddress? {
        switch family {
        case AddressFamily.inet:
            return .v4(UInt32(self.bytes[0]) << 24 | UInt32(self.bytes[1]) << 16 | UInt32(self.bytes[2]) << 8
                | UInt32(self.bytes[3]))
        case AddressFamily.inet6:
            var hi: UInt64 = 0
            var lo: UInt64 = 0
            for i in 0..<8 { hi = hi << 8 | UInt64(self.bytes[i]) }
            for i in 8..<16 { lo = lo << 8 | UInt64(self.bytes[i]) }
            return .v6(hi, lo)
        default:
            return nil
        }
    }
    public var isZero: Bool { self.bytes.allSatisfy { $0 == 0 } }
    func encode(_ w: inout WireWriter) { w.raw(self.bytes) }
    static func decode(_ r: inout WireReader) throws(WireError) -> XfrmAddress {
        XfrmAddress(bytes: try r.raw(16, "address"))
    }
}

extension IPAddress {
    /// AF_INET or AF_INET6.
    public var family: UInt16 { self.version == 4 ? AddressFamily.inet : AddressFamily.inet6 }
}

/// struct xfrm_selector (56 bytes).
public struct XfrmSelector: Equatable, Hashable, Sendable {
    public var daddr = XfrmAddress()
    public var saddr = XfrmAddress()
    public var dport: UInt16 = 0
    public var dportMask: UInt16 = 0
    public var sport: UInt16 = 0
    public var sportMask: UInt16 = 0
    public var family: UInt16 = 0
    public var prefixlenD: UInt8 = 0
    public var prefixlenS: UInt8 = 0
    public var proto: UInt8 = 0
    public var ifindex: Int32 = 0
    public var user: UInt32 = 0
    public init() {}

    public func encode(_ w: inout WireWriter) {
        self.daddr.encode(&w)
        self.saddr.encode(&w)
        w.be16(self.dport)
        w.be16(self.dportMask)
        w.be16(self.sport)
        w.be16(self.sportMask)
        w.u16(self.family)
        w.u8(self.prefixlenD)
        w.u8(self.prefixlenS)
        w.u8(self.proto)
        w.zeros(3)
        w.i32(self.ifindex)
        w.u32(self.user)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmSelector {
        var s = XfrmSelector()
        s.daddr = try .decode(&r)
        s.saddr = try .decode(&r)
        s.dport = try r.be16()
        s.dportMask = try r.be16()
        s.sport = try r.be16()
        s.sportMask = try r.be16()
        s.family = try r.u16()
        s.prefixlenD = try r.u8()
        s.prefixlenS = try r.u8()
        s.proto = try r.u8()
        try r.skip(3)
        s.ifindex = try r.i32()
        s.user = try r.u32()
        return s
    }
}

/// struct xfrm_id (24 bytes).
public struct XfrmID: Equatable, Hashable, Sendable {
    public var daddr = XfrmAddress()
    public var spi: UInt32 = 0
    public var proto: UInt8 = 0
    public init() {}
    public init(daddr: XfrmAddress, spi: UInt32, proto: UInt8) {
        self.daddr = daddr
        self.spi = spi
        self.proto = proto
    }
    public func encode(_ w: inout WireWriter) {
        self.daddr.encode(&w)
        w.be32(self.spi)
        w.u8(self.proto)
        w.zeros(3)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmID {
        var id = XfrmID()
        id.daddr = try .decode(&r)
        id.spi = try r.be32()
        id.proto = try r.u8()
        try r.skip(3)
        return id
    }
}

/// struct xfrm_lifetime_cfg (64 bytes).
public struct XfrmLifetimeCfg: Equatable, Sendable {
    public var softByteLimit = xfrmInfinity
    public var hardByteLimit = xfrmInfinity
    public var softPacketLimit = xfrmInfinity
    public var hardPacketLimit = xfrmInfinity
    public var softAddExpiresSeconds: UInt64 = 0
    public var hardAddExpiresSeconds: UInt64 = 0
    public var softUseExpiresSeconds: UInt64 = 0
    public var hardUseExpiresSeconds: UInt64 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        for v in [self.softByteLimit, self.hardByteLimit, self.softPacketLimit, self.hardPacketLimit,
                  self.softAddExpiresSeconds, self.hardAddExpiresSeconds, self.softUseExpiresSeconds,
                  self.hardUseExpiresSeconds] { w.u64(v) }
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmLifetimeCfg {
        var l = XfrmLifetimeCfg()
        l.softByteLimit = try r.u64()
        l.hardByteLimit = try r.u64()
        l.softPacketLimit = try r.u64()
        l.hardPacketLimit = try r.u64()
        l.softAddExpiresSeconds = try r.u64()
        l.hardAddExpiresSeconds = try r.u64()
        l.softUseExpiresSeconds = try r.u64()
        l.hardUseExpiresSeconds = try r.u64()
        return l
    }
}

/// struct xfrm_lifetime_cur (32 bytes).
public struct XfrmLifetimeCur: Equatable, Sendable {
    public var bytes: UInt64 = 0
    public var packets: UInt64 = 0
    public var addTime: UInt64 = 0
    public var useTime: UInt64 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        w.u64(self.bytes)
        w.u64(self.packets)
        w.u64(self.addTime)
        w.u64(self.useTime)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmLifetimeCur {
        var c = XfrmLifetimeCur()
        c.bytes = try r.u64()
        c.packets = try r.u64()
        c.addTime = try r.u64()
        c.useTime = try r.u64()
        return c
    }
}

/// struct xfrm_stats (12 bytes).
public struct XfrmStats: Equatable, Sendable {
    public var replayWindow: UInt32 = 0
    public var replay: UInt32 = 0
    public var integrityFailed: UInt32 = 0
    public init() {}
}

/// struct xfrm_usersa_info (224 bytes).
public struct XfrmUserSAInfo: Equatable, Sendable {
    public var sel = XfrmSelector()
    public var id = XfrmID()
    public var saddr = XfrmAddress()
    public var lft = XfrmLifetimeCfg()
    public var curlft = XfrmLifetimeCur()
    public var stats = XfrmStats()
    public var seq: UInt32 = 0
    public var reqid: UInt32 = 0
    public var family: UInt16 = 0
    public var mode: UInt8 = 0
    public var replayWindow: UInt8 = 0
    public var flags: UInt8 = 0
    public init() {}
    public static let size = 224

    public func encode(_ w: inout WireWriter) {
        self.sel.encode(&w)
        self.id.encode(&w)
        self.saddr.encode(&w)
        self.lft.encode(&w)
        self.curlft.encode(&w)
        w.u32(self.stats.replayWindow)
        w.u32(self.stats.replay)
        w.u32(self.stats.integrityFailed)
        w.u32(self.seq)
        w.u32(self.reqid)
        w.u16(self.family)
        w.u8(self.mode)
        w.u8(self.replayWindow)
        w.u8(self.flags)
        w.zeros(7)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmUserSAInfo {
        var s = XfrmUserSAInfo()
        s.sel = try .decode(&r)
        s.id = try .decode(&r)
        s.saddr = try .decode(&r)
        s.lft = try .decode(&r)
        s.curlft = try .decode(&r)
        s.stats.replayWindow = try r.u32()
        s.stats.replay = try r.u32()
        s.stats.integrityFailed = try r.u32()
        s.seq = try r.u32()
        s.reqid = try r.u32()
        s.family = try r.u16()
        s.mode = try r.u8()
        s.replayWindow = try r.u8()
        s.flags = try r.u8()
        try r.skip(7)
        return s
    }
}

/// struct xfrm_userpolicy_info (168 bytes).
public struct XfrmUserPolicyInfo: Equatable, Sendable {
    public var sel = XfrmSelector()
    public var lft = XfrmLifetimeCfg()
    public var curlft = XfrmLifetimeCur()
    public var priority: UInt32 = 0
    public var index: UInt32 = 0
    public var dir: UInt8 = 0
    public var action: UInt8 = 0
    public var flags: UInt8 = 0
    public var share: UInt8 = 0
    public init() {}
    public static let size = 168

    public func encode(_ w: inout WireWriter) {
        self.sel.encode(&w)
        self.lft.encode(&w)
        self.curlft.encode(&w)
        w.u32(self.priority)
        w.u32(self.index)
        w.u8(self.dir)
        w.u8(self.action)
        w.u8(self.flags)
        w.u8(self.share)
        w.zeros(4)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmUserPolicyInfo {
        var p = XfrmUserPolicyInfo()
        p.sel = try .decode(&r)
        p.lft = try .decode(&r)
        p.curlft = try .decode(&r)
        p.priority = try r.u32()
        p.index = try r.u32()
        p.dir = try r.u8()
        p.action = try r.u8()
        p.flags = try r.u8()
        p.share = try r.u8()
        try r.skip(4)
        return p
    }
}

/// struct xfrm_user_tmpl (64 bytes).
public struct XfrmUserTmpl: Equatable, Sendable {
    public var id = XfrmID()
    public var family: UInt16 = 0
    public var saddr = XfrmAddress()
    public var reqid: UInt32 = 0
    public var mode: UInt8 = 0
    public var share: UInt8 = 0
    public var optional: UInt8 = 0
    public var aalgos: UInt32 = ~0
    public var ealgos: UInt32 = ~0
    public var calgos: UInt32 = ~0
    public init() {}
    public static let size = 64

    public func encode(_ w: inout WireWriter) {
        self.id.encode(&w)
        w.u16(self.family)
        w.zeros(2)
        self.saddr.encode(&w)
        w.u32(self.reqid)
        w.u8(self.mode)
        w.u8(self.share)
        w.u8(self.optional)
        w.zeros(1)
        w.u32(self.aalgos)
        w.u32(self.ealgos)
        w.u32(self.calgos)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmUserTmpl {
        var t = XfrmUserTmpl()
        t.id = try .decode(&r)
        t.family = try r.u16()
        try r.skip(2)
        t.saddr = try .decode(&r)
        t.reqid = try r.u32()
        t.mode = try r.u8()
        t.share = try r.u8()
        t.optional = try r.u8()
        try r.skip(1)
        t.aalgos = try r.u32()
        t.ealgos = try r.u32()
        t.calgos = try r.u32()
        return t
    }
}

/// struct xfrm_usersa_id (24 bytes).
public struct XfrmUserSAID: Equatable, Sendable {
    public var daddr = XfrmAddress()
    public var spi: UInt32 = 0
    public var family: UInt16 = 0
    public var proto: UInt8 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        self.daddr.encode(&w)
        w.be32(self.spi)
        w.u16(self.family)
        w.u8(self.proto)
        w.zeros(1)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmUserSAID {
        var s = XfrmUserSAID()
        s.daddr = try .decode(&r)
        s.spi = try r.be32()
        s.family = try r.u16()
        s.proto = try r.u8()
        try r.skip(1)
        return s
    }
}

/// struct xfrm_aevent_id (48 bytes): XFRM_MSG_NEWAE / GETAE, the SA's id, source, the XFRM_AE_* flags and reqid.
public struct XfrmAEventID: Equatable, Sendable {
    public var saID = XfrmUserSAID()
    public var saddr = XfrmAddress()
    public var flags: UInt32 = 0
    public var reqid: UInt32 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        self.saID.encode(&w)
        self.saddr.encode(&w)
        w.u32(self.flags)
        w.u32(self.reqid)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmAEventID {
        var a = XfrmAEventID()
        a.saID = try .decode(&r)
        a.saddr = try .decode(&r)
        a.flags = try r.u32()
        a.reqid = try r.u32()
        return a
    }
}

/// enum xfrm_ae_ftype_t: what an XFRM_MSG_NEWAE carries or asks for.
public enum XfrmAEFlag {
    public static let replayThreshold: UInt32 = 1
    public static let replayValue: UInt32 = 2
    public static let lifetimeValue: UInt32 = 4
    public static let timerThreshold: UInt32 = 8
    public static let causeReplay: UInt32 = 16
    public static let causeTimer: UInt32 = 32
    public static let causeUpdate: UInt32 = 64
}

/// struct xfrm_user_mapping (64 bytes): XFRM_MSG_MAPPING, a NAT-T peer seen at a new address or port.
public struct XfrmUserMapping: Equatable, Sendable {
    public var id = XfrmUserSAID()
    public var reqid: UInt32 = 0
    public var oldSaddr = XfrmAddress()
    public var newSaddr = XfrmAddress()
    /// Ports in host order (network order on the wire).
    public var oldSport: UInt16 = 0
    public var newSport: UInt16 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        self.id.encode(&w)
        w.u32(self.reqid)
        self.oldSaddr.encode(&w)
        self.newSaddr.encode(&w)
        w.be16(self.oldSport)
        w.be16(self.newSport)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmUserMapping {
        var m = XfrmUserMapping()
        m.id = try .decode(&r)
        m.reqid = try r.u32()
        m.oldSaddr = try .decode(&r)
        m.newSaddr = try .decode(&r)
        m.oldSport = try r.be16()
        m.newSport = try r.be16()
        return m
    }
}

/// struct xfrm_userpolicy_id (64 bytes).
public struct XfrmUserPolicyID: Equatable, Sendable {
    public var sel = XfrmSelector()
    public var index: UInt32 = 0
    public var dir: UInt8 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        self.sel.encode(&w)
        w.u32(self.index)
        w.u8(self.dir)
        w.zeros(3)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmUserPolicyID {
        var p = XfrmUserPolicyID()
        p.sel = try .decode(&r)
        p.index = try r.u32()
        p.dir = try r.u8()
        try r.skip(3)
        return p
    }
}

/// struct xfrm_algo / xfrm_algo_auth / xfrm_algo_aead: a name, a key length in bits, a key, and for auth the
/// truncation and for AEAD the ICV length in bits.
public struct XfrmAlgorithm: Equatable, Sendable {
    public var name: String
    public var key: [UInt8]
    /// Truncation (auth-trunc) or ICV length (aead) in bits; unused for plain enc/auth.
    public var lengthBits: UInt32
    public init(name: String, key: [UInt8], lengthBits: UInt32 = 0) {
        self.name = name
        self.key = key
        self.lengthBits = lengthBits
    }
    public func encode(_ w: inout WireWriter, withLength: Bool) {
        w.cString(self.name, size: 64)
        w.u32(UInt32(self.key.count * 8))
        if withLength { w.u32(self.lengthBits) }
        w.raw(self.key)
    }
    public static func decode(_ bytes: [UInt8], withLength: Bool) throws(WireError) -> XfrmAlgorithm {
        var r = WireReader(bytes)
        let name = try r.cString(size: 64, "algorithm name")
        let bits = try r.u32("key length")
        let len = withLength ? try r.u32("ICV/truncation length") : 0
        let key = try r.raw((Int(bits) + 7) / 8, "key")
        return XfrmAlgorithm(name: name, key: key, lengthBits: len)
    }
}

/// struct xfrm_encap_tmpl (24 bytes).
public struct XfrmEncapTmpl: Equatable, Sendable {
    public var type: UInt16 = XfrmEncapType.espInUDP
    public var sport: UInt16 = 4500
    public var dport: UInt16 = 4500
    public var oa = XfrmAddress()
    public init() {}
    public func encode(_ w: inout WireWriter) {
        w.u16(self.type)
        w.be16(self.sport)
        w.be16(self.dport)
        w.zeros(2)
        self.oa.encode(&w)
    }
    public static func decode(_ r: inout WireReader) throws(WireError) -> XfrmEncapTmpl {
        var e = XfrmEncapTmpl()
        e.type = try r.u16()
        e.sport = try r.be16()
        e.dport = try r.be16()
        try r.skip(2)
        e.oa = try .decode(&r)
        return e
    }
}

/// struct xfrm_replay_state_esn (24 bytes + 4 per bitmap word); also carries the legacy xfrm_replay_state.
public struct XfrmReplayStateESN: Equatable, Sendable {
    public var oseq: UInt32 = 0
    public var seq: UInt32 = 0
    public var oseqHi: UInt32 = 0
    public var seqHi: UInt32 = 0
    public var replayWindow: UInt32 = 0
    public var bitmap: [UInt32] = []
    public init() {}
    public func encode(_ w: inout WireWriter) {
        w.u32(UInt32(self.bitmap.count))
        w.u32(self.oseq)
        w.u32(self.seq)
        w.u32(self.oseqHi)
        w.u32(self.seqHi)
        w.u32(self.replayWindow)
        for b in self.bitmap { w.u32(b) }
    }
    public static func decode(_ bytes: [UInt8]) throws(WireError) -> XfrmReplayStateESN {
        var r = WireReader(bytes)
        var s = XfrmReplayStateESN()
        let n = try r.u32("bmp_len")
        guard n <= 128 else { throw WireError("ESN bitmap length must be <= 128") }
        s.oseq = try r.u32()
        s.seq = try r.u32()
        s.oseqHi = try r.u32()
        s.seqHi = try r.u32()
        s.replayWindow = try r.u32()
        if bytes.count == 24 {
            // The header alone stands for a zero bitmap of bmp_len words (≈ verify_replay, which accepts exactly
            // sizeof(struct xfrm_replay_state_esn), and xfrm_alloc_replay_state_esn, which zero-fills the rest):
            // iproute2's `ip xfrm state add … flag esn` sends it so.
            s.bitmap = [UInt32](repeating: 0, count: Int(n))
            return s
        }
        for _ in 0..<n { s.bitmap.append(try r.u32("bitmap")) }
        return s
    }
}

/// struct xfrm_replay_state (12 bytes, legacy).
public struct XfrmReplayState: Equatable, Sendable {
    public var oseq: UInt32 = 0
    public var seq: UInt32 = 0
    public var bitmap: UInt32 = 0
    public init() {}
    public func encode(_ w: inout WireWriter) {
        w.u32(self.oseq)
        w.u32(self.seq)
        w.u32(self.bitmap)
    }
    public static func decode(_ bytes: [UInt8]) throws(WireError) -> XfrmReplayState {
        var r = WireReader(bytes)
        var s = XfrmReplayState()
        s.oseq = try r.u32()
        s.seq = try r.u32()
        s.bitmap = try r.u32()
        return s
    }
}

/// struct xfrm_mark.
public struct XfrmMark: Equatable, Sendable {
    public var value: UInt32
    public var mask: UInt32
    public init(value: UInt32, mask: UInt32) {
        self.value = value
        self.mask = mask
    }
}

/// struct xfrm_user_offload (8 bytes).
public struct XfrmUserOffload: Equatable, Sendable {
    public var ifindex: Int32
    public var flags: UInt8
    public init(ifindex: Int32, flags: UInt8) {
        self.ifindex = ifindex
        self.flags = flags
    }
}
