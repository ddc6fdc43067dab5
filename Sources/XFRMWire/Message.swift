// One XFRM netlink message: nlmsghdr, a fixed body chosen by the message type, then attributes (≈ xfrm_user.c's
// xfrm_msg_min[] and xfrma_policy[]). The same encoder serves an in-process stack, a daemon's Unix socket and,
// unchanged, the kernel's NETLINK_XFRM.

/// struct xfrm_user_acquire (280 bytes).
public struct XfrmUserAcquire: Equatable, Sendable {
    public var id = XfrmID()
    public var saddr = XfrmAddress()
    public var sel = XfrmSelector()
    public var policy = XfrmUserPolicyInfo()
    public var aalgos: UInt32 = 0
    public var ealgos: UInt32 = 0
    public var calgos: UInt32 = 0
    public var seq: UInt32 = 0
    public init() {}
}

/// struct xfrm_userspi_info (232 bytes).
public struct XfrmUserSPIInfo: Equatable, Sendable {
    public var info = XfrmUserSAInfo()
    public var min: UInt32 = 0
    public var max: UInt32 = 0
    public init() {}
}

/// xfrmu_spdinfo counts (XFRMA_SPD_INFO) and the SAD count, for `count`.
public struct XfrmSPDInfo: Equatable, Sendable {
    public var inCount: UInt32 = 0
    public var outCount: UInt32 = 0
    public var fwdCount: UInt32 = 0
    public var inSocketCount: UInt32 = 0
    public var outSocketCount: UInt32 = 0
    public var fwdSocketCount: UInt32 = 0
    public init() {}
}

/// The fixed part of a message.
public enum XfrmBody: Equatable, Sendable {
    case saInfo(XfrmUserSAInfo)
    case saID(XfrmUserSAID)
    /// XFRM_MSG_NEWAE / GETAE.
    case aevent(XfrmAEventID)
    case policyInfo(XfrmUserPolicyInfo)
    case policyID(XfrmUserPolicyID)
    case spiInfo(XfrmUserSPIInfo)
    case expire(XfrmUserSAInfo, hard: Bool)
    case policyExpire(XfrmUserPolicyInfo, hard: Bool)
    case acquire(XfrmUserAcquire)
    /// XFRM_MSG_MAPPING.
    case mapping(XfrmUserMapping)
    case flushSA(proto: UInt8)
    case flushPolicy
    case policyDefault(inbound: UInt8, forward: UInt8, outbound: UInt8)
    /// GETSADINFO/NEWSADINFO: the SA count (XFRMA_SAD_CNT) and hash info.
    case sadInfo(count: UInt32, buckets: UInt32, maxBuckets: UInt32)
    /// GETSPDINFO/NEWSPDINFO.
    case spdInfo(XfrmSPDInfo)
    /// A request without a body (GETSADINFO/GETSPDINFO/GETDEFAULT requests, dumps with no filter).
    case empty
    /// NLMSG_ERROR: 0 is an ACK; otherwise -errno with the extack text.
    case error(errno: Int32, message: String)
    /// NLMSG_DONE, ending a dump, with its status (≈ netlink_dump_done's dump_done_errno): 0, or the -errno a dump
    /// failed with after it started, and then the extack text (NLMSGERR_ATTR_MSG, under NLM_F_ACK_TLVS).
    case done(status: Int32, message: String)
    /// GETSADINFO / GETSPDINFO request: a u32 of flags (iproute2 sends 0xffffffff).
    case infoRequest(flags: UInt32)
}

/// An attribute (struct nlattr + payload).
public enum XfrmAttribute: Equatable, Sendable {
    case algAuth(XfrmAlgorithm)
    case algAuthTrunc(XfrmAlgorithm)
    case algCrypt(XfrmAlgorithm)
    case algAEAD(XfrmAlgorithm)
    case encap(XfrmEncapTmpl)
    case templates([XfrmUserTmpl])
    case sa(XfrmUserSAInfo)
    case policy(XfrmUserPolicyInfo)
    case replay(XfrmReplayState)
    case replayESN(XfrmReplayStateESN)
    case coAddress(XfrmAddress)
    case lastUsed(UInt64)
    case policyType(UInt8)
    case mark(XfrmMark)
    case tfcPad(UInt32)
    case extraFlags(UInt32)
    case offloadDevice(XfrmUserOffload)
    case ifID(UInt32)
    case saDir(UInt8)
    /// XFRMA_SA_PCPU (u32): the CPU a per-CPU SA serves (RFC 9611), or on an ACQUIRE the CPU that asks for one.
    case saPCPU(UInt32)
    /// XFRMA_MTIMER_THRESH (u32 seconds): at most one XFRM_MSG_MAPPING per this many seconds for the same new port
    /// of a NAT-T input SA (x->mapping_maxage).
    case mappingMaxAge(UInt32)
    /// XFRMA_LTIME_VAL: an SA's current lifetime (curlft), on NEWAE and on NEWSA (a key manager moving an SA).
    case lifetimeValue(XfrmLifetimeCur)
    /// XFRMA_REPLAY_THRESH (u32): x->replay_maxdiff.
    case replayThreshold(UInt32)
    /// XFRMA_ETIMER_THRESH (u32): x->replay_maxage.
    case timerThreshold(UInt32)
    case proto(UInt8)
    case unknown(type: UInt16, payload: [UInt8])

    /// The attribute's XFRMA_* number.
    public var type: UInt16 {
        switch self {
        case .algAuth: XfrmAttributeType.algAuth.rawValue
        case .algAuthTrunc: XfrmAttributeType.algAuthTrunc.rawValue
        case .algCrypt: XfrmAttributeType.algCrypt.rawValue
        case .algAEAD: XfrmAttributeType.algAEAD.rawValue
        case .encap: XfrmAttributeType.encap.rawValue
        case .templates: XfrmAttributeType.tmpl.rawValue
        case .sa: XfrmAttributeType.sa.rawValue
        case .policy: XfrmAttributeType.policy.rawValue
        case .replay: XfrmAttributeType.replayVal.rawValue
        case .replayESN: XfrmAttributeType.replayESNVal.rawValue
        case .coAddress: XfrmAttributeType.coAddr.rawValue
        case .lastUsed: XfrmAttributeType.lastUsed.rawValue
        case .policyType: XfrmAttributeType.policyType.rawValue
        case .mark: XfrmAttributeType.mark.rawValue
        case .tfcPad: XfrmAttributeType.tfcPad.rawValue
        case .extraFlags: XfrmAttributeType.saExtraFlags.rawValue
        case .offloadDevice: XfrmAttributeType.offloadDev.rawValue
        case .ifID: XfrmAttributeType.ifID.rawValue
        case .saDir: XfrmAttributeType.saDir.rawValue
        case .saPCPU: XfrmAttributeType.saPCPU.rawValue
        case .mappingMaxAge: XfrmAttributeType.mtimerThresh.rawValue
        case .lifetimeValue: XfrmAttributeType.ltimeVal.rawValue
        case .replayThreshold: XfrmAttributeType.replayThresh.rawValue
        case .timerThreshold: XfrmAttributeType.etimerThresh.rawValue
        case .proto: XfrmAttributeType.proto.rawValue
        case .unknown(let t, _): t
        }
    }

    func payload() -> [UInt8] {
        var w = WireWriter()
        switch self {
        case .algAuth(let a), .algCrypt(let a): a.encode(&w, withLength: false)
        case .algAuthTrunc(let a), .algAEAD(let a): a.encode(&w, withLength: true)
        case .encap(let e): e.encode(&w)
        case .templates(let ts): for t in ts { t.encode(&w) }
        case .sa(let s): s.encode(&w)
        case .policy(let p): p.encode(&w)
        case .replay(let r): r.encode(&w)
        case .replayESN(let r): r.encode(&w)
        case .coAddress(let a): w.raw(a.bytes)
        case .lastUsed(let t): w.u64(t)
        case .policyType(let t):
            w.u8(t)
            w.zeros(5)
        case .mark(let m):
            w.u32(m.value)
            w.u32(m.mask)
        case .tfcPad(let v), .extraFlags(let v), .ifID(let v), .saPCPU(let v), .mappingMaxAge(let v),
            .replayThreshold(let v), .timerThreshold(let v):
            w.u32(v)
        case .lifetimeValue(let c): c.encode(&w)
        case .offloadDevice(let o):
            w.i32(o.ifindex)
            w.u8(o.flags)
            w.zeros(3)
        case .saDir(let d), .proto(let d): w.u8(d)
        case .unknown(_, let p): w.raw(p)
        }
        return w.bytes
    }

    static func decode(type: UInt16, payload p: [UInt8]) throws(WireError) -> XfrmAttribute {
        var r = WireReader(p)
        guard let t = XfrmAttributeType(rawValue: type) else { return .unknown(type: type, payload: p) }
        switch t {
        case .algAuth: return .algAuth(try .decode(p, withLength: false))
        case .algCrypt: return .algCrypt(try .decode(p, withLength: false))
        case .algAuthTrunc: return .algAuthTrunc(try .decode(p, withLength: true))
        case .algAEAD: return .algAEAD(try .decode(p, withLength: true))
        case .encap: return .encap(try .decode(&r))
        case .tmpl:
            guard p.count % XfrmUserTmpl.size == 0 else { throw WireError("XFRMA_TMPL: length \(p.count) not a multiple of 64") }
            var ts: [XfrmUserTmpl] = []
            while r.remaining > 0 { ts.append(try .decode(&r)) }
            return .templates(ts)
        case .sa: return .sa(try .decode(&r))
        case .policy: return .policy(try .decode(&r))
        case .replayVal: return .replay(try .decode(p))
        case .replayESNVal: return .replayESN(try .decode(p))
        case .coAddr: return .coAddress(try .decode(&r))
        case .lastUsed: return .lastUsed(try r.u64())
        case .policyType: return .policyType(try r.u8())
        case .mark: return .mark(XfrmMark(value: try r.u32(), mask: try r.u32()))
        case .tfcPad: return .tfcPad(try r.u32())
        case .saExtraFlags: return .extraFlags(try r.u32())
        case .offloadDev: return .offloadDevice(XfrmUserOffload(ifindex: try r.i32(), flags: try r.u8()))
        case .ifID: return .ifID(try r.u32())
        case .saDir: return .saDir(try r.u8())
        case .saPCPU: return .saPCPU(try r.u32())
        case .mtimerThresh: return .mappingMaxAge(try r.u32())
        case .ltimeVal: return .lifetimeValue(try .decode(&r))
        case .replayThresh: return .replayThreshold(try r.u32())
        case .etimerThresh: return .timerThreshold(try r.u32())
        case .proto: return .proto(try r.u8())
        default: return .unknown(type: type, payload: p)
        }
    }
}

/// A whole XFRM netlink message.
/// A netlink message header (struct nlmsghdr), as an error reply echoes the request's.
public struct NetlinkHeader: Equatable, Sendable {
    public var length: UInt32 = 0
    public var type: UInt16 = 0
    public var flags: UInt16 = 0
    public var sequence: UInt32 = 0
    public var portID: UInt32 = 0
    public init(length: UInt32 = 0, type: UInt16 = 0, flags: UInt16 = 0, sequence: UInt32 = 0, portID: UInt32 = 0) {
        self.length = length
        self.type = type
        self.flags = flags
        self.sequence = sequence
        self.portID = portID
    }

    /// Reads the header at the start of `bytes`, if there are 16 bytes.
    public init?(bytes: [UInt8]) {
        guard bytes.count >= 16 else { return nil }
        var r = WireReader(bytes)
        guard let l = try? r.u32(), let t = try? r.u16(), let f = try? r.u16(), let s = try? r.u32(),
            let p = try? r.u32()
        else { return nil }
        self.init(length: l, type: t, flags: f, sequence: s, portID: p)
    }
}

public struct XfrmMessage: Equatable, Sendable {
    /// An XfrmMessageType raw value, or a netlink control type (error, done).
    public var type: UInt16
    public var flags: UInt16
    public var sequence: UInt32
    public var portID: UInt32
    public var body: XfrmBody
    public var attributes: [XfrmAttribute]
    /// Error and ACK messages: the request's header, echoed in struct nlmsgerr (≈ netlink_ack with NETLINK_CAP_ACK).
    public var echoedRequest = NetlinkHeader()

    public init(type: UInt16, flags: UInt16 = NetlinkFlags.request, sequence: UInt32 = 0, portID: UInt32 = 0,
                body: XfrmBody, attributes: [XfrmAttribute] = []) {
        self.type = type
        self.flags = flags
        self.sequence = sequence
        self.portID = portID
        self.body = body
        self.attributes = attributes
    }

    public init(_ type: XfrmMessageType, flags: UInt16 = NetlinkFlags.request, body: XfrmBody,
                attributes: [XfrmAttribute] = []) {
        self.init(type: type.rawValue, flags: flags, body: body, attributes: attributes)
    }

    public var messageType: XfrmMessageType? { XfrmMessageType(rawValue: self.type) }

    /// The first attribute `pick` returns non-nil for.
    public func attribute<T>(_ pick: (XfrmAttribute) -> T?) -> T? {
        for a in self.attributes { if let v = pick(a) { return v } }
        return nil
    }

    /// Encodes to netlink bytes (header, body, attributes, each 4-byte aligned).
    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.zeros(16)
        switch self.body {
        case .saInfo(let s): s.encode(&w)
        case .saID(let s): s.encode(&w)
        case .aevent(let a): a.encode(&w)
        case .policyInfo(let p): p.encode(&w)
        case .policyID(let p): p.encode(&w)
        case .spiInfo(let s):
            s.info.encode(&w)
            w.u32(s.min)
            w.u32(s.max)
        case .expire(let s, let hard):
            s.encode(&w)
            w.u8(hard ? 1 : 0)
            w.zeros(7)
        case .policyExpire(let p, let hard):
            p.encode(&w)
            w.u8(hard ? 1 : 0)
            w.zeros(7)
        case .acquire(let a):
            a.id.encode(&w)
            a.saddr.encode(&w)
            a.sel.encode(&w)
            a.policy.encode(&w)
            w.u32(a.aalgos)
            w.u32(a.ealgos)
            w.u32(a.calgos)
            w.u32(a.seq)
        case .mapping(let m):
            m.encode(&w)
        case .flushSA(let proto):
            w.u8(proto)
            w.zeros(3)
        case .flushPolicy, .empty:
            break
        case .done(let status, let message):
            w.i32(status)  // netlink_dump_done: the dump's status (NLMSG_DONE carries an int)
            if status != 0 { Self.extack(&w, message) }
        case .infoRequest(let flags):
            w.u32(flags)
        case .policyDefault(let i, let f, let o):
            w.u8(i)
            w.u8(f)
            w.u8(o)
            w.zeros(1)
        case .sadInfo(let count, let buckets, let maxBuckets):
            w.u32(0)
            Self.attr(&w, type: 1, payload: { var x = WireWriter(); x.u32(count); return x.bytes }())
            Self.attr(&w, type: 2, payload: { var x = WireWriter(); x.u32(buckets); x.u32(maxBuckets); return x.bytes }())
        case .spdInfo(let s):
            w.u32(0)
            var x = WireWriter()
            for v in [s.inCount, s.outCount, s.fwdCount, s.inSocketCount, s.outSocketCount, s.fwdSocketCount] { x.u32(v) }
            Self.attr(&w, type: 1, payload: x.bytes)
        case .error(let errno, let message):
            w.i32(errno)
            let h = self.echoedRequest
            w.u32(h.length)
            w.u16(h.type)
            w.u16(h.flags)
            w.u32(h.sequence)
            w.u32(h.portID)
            Self.extack(&w, message)
        }
        for a in self.attributes { Self.attr(&w, type: a.type, payload: a.payload()) }
        var bytes = w.bytes
        let len = UInt32(bytes.count)
        withUnsafeBytes(of: len.littleEndian) { for i in 0..<4 { bytes[i] = $0[i] } }
        var type = self.type
        if case .error = self.body { type = NetlinkControlType.error }
        if case .done = self.body { type = NetlinkControlType.done }
        var flags = self.flags
        if case .error(_, let m) = self.body, !m.isEmpty { flags |= NetlinkFlags.ackTLVs }
        if case .done(let status, let m) = self.body, status != 0, !m.isEmpty { flags |= NetlinkFlags.ackTLVs }
        withUnsafeBytes(of: type.littleEndian) { bytes[4] = $0[0]; bytes[5] = $0[1] }
        withUnsafeBytes(of: flags.littleEndian) { bytes[6] = $0[0]; bytes[7] = $0[1] }
        withUnsafeBytes(of: self.sequence.littleEndian) { for i in 0..<4 { bytes[8 + i] = $0[i] } }
        withUnsafeBytes(of: self.portID.littleEndian) { for i in 0..<4 { bytes[12 + i] = $0[i] } }
        return bytes
    }

    private static func attr(_ w: inout WireWriter, type: UInt16, payload: [UInt8]) {
        w.u16(UInt16(4 + payload.count))
        w.u16(type)
        w.raw(payload)
        w.align(4)
    }

    private static func attributes(_ r: inout WireReader, end: Int) throws(WireError) -> [(UInt16, [UInt8])] {
        var out: [(UInt16, [UInt8])] = []
        while r.offset + 4 <= end {
            let len = Int(try r.u16("nlattr length"))
            let type = try r.u16("nlattr type") & 0x3fff
            guard len >= 4, r.offset - 4 + len <= end else { throw WireError("attribute \(type): bad length \(len)") }
            out.append((type, try r.raw(len - 4, "attribute \(type)")))
            let pad = (4 - len % 4) % 4
            if r.offset + pad <= end { try r.skip(pad) }
        }
        return out
    }

    /// Decodes every message in a buffer (a netlink datagram can hold several).
    public static func decodeAll(_ bytes: [UInt8]) throws(WireError) -> [XfrmMessage] {
        var out: [XfrmMessage] = []
        var off = 0
        while off + 16 <= bytes.count {
            var r = WireReader(bytes, offset: off)
            let len = Int(try r.u32("nlmsg_len"))
            guard len >= 16, off + len <= bytes.count else { throw WireError("message length \(len) runs past the buffer") }
            let slice = Array(bytes[off..<(off + len)])
            out.append(try decode(slice))
            off += (len + 3) & ~3
        }
        return out
    }

    /// NLMSGERR_ATTR_MSG, the extack text of an NLMSG_ERROR or NLMSG_DONE (NUL-terminated), when there is one.
    private static func extack(_ w: inout WireWriter, _ message: String) {
        guard !message.isEmpty else { return }
        Self.attr(&w, type: 1, payload: Array(message.utf8) + [0])
    }

    /// The NLMSGERR_ATTR_MSG text among the attributes that follow an NLMSG_ERROR's or NLMSG_DONE's payload.
    private static func extackMessage(_ r: inout WireReader, end: Int) throws(WireError) -> String {
        var message = ""
        for (t, p) in try attributes(&r, end: end) where t == 1 {
            message = String(decoding: p.prefix { $0 != 0 }, as: UTF8.self)
        }
        return message
    }

    /// Decodes one message.
    public static func decode(_ bytes: [UInt8]) throws(WireError) -> XfrmMessage {
        var r = WireReader(bytes)
        let len = Int(try r.u32("nlmsg_len"))
        guard len <= bytes.count else { throw WireError("message length \(len) exceeds \(bytes.count) bytes") }
        let type = try r.u16()
        let flags = try r.u16()
        let seq = try r.u32()
        let pid = try r.u32()
        var body: XfrmBody
        if type == NetlinkControlType.error {
            let errno = try r.i32("nlmsgerr.error")
            let echo = NetlinkHeader(length: try r.u32("nlmsgerr.msg"), type: try r.u16(), flags: try r.u16(),
                                     sequence: try r.u32(), portID: try r.u32())
            // Without NLM_F_CAPPED the request's body follows the header (an uncapped kernel error): skip it.
            if flags & NetlinkFlags.capped == 0 && errno != 0 && Int(echo.length) > 16 {
                try r.skip(min((Int(echo.length) - 16 + 3) & ~3, len - r.offset))
            }
            let message = flags & NetlinkFlags.ackTLVs != 0 ? try extackMessage(&r, end: len) : ""
            var m = XfrmMessage(type: type, flags: flags, sequence: seq, portID: pid,
                                body: .error(errno: errno, message: message))
            m.echoedRequest = echo
            return m
        }
        if type == NetlinkControlType.done {
            // The status int, then the extack attributes. Linux always sends the int; a DONE without one is taken as
            // a clean end (iproute2 would say "DONE truncated").
            let status: Int32 = len - r.offset >= 4 ? try r.i32() : 0
            let message = flags & NetlinkFlags.ackTLVs != 0 ? try extackMessage(&r, end: len) : ""
            return XfrmMessage(type: type, flags: flags, sequence: seq, portID: pid,
                               body: .done(status: status, message: message))
        }
        guard let mt = XfrmMessageType(rawValue: type) else { throw WireError("unknown XFRM message type \(type)") }
        let request = flags & NetlinkFlags.request != 0
        if request && (mt == .getSADInfo || mt == .getSPDInfo) {
            guard len - r.offset >= 4 else { throw WireError("\(mt) needs its u32 flags") }
            return XfrmMessage(type: type, flags: flags, sequence: seq, portID: pid,
                               body: .infoRequest(flags: try r.u32()))
        }
        switch mt {
        case .newSA, .updSA: body = .saInfo(try .decode(&r))
        case .delSA: body = .saID(try .decode(&r))
        case .getSA:
            if request && flags & NetlinkFlags.dump != 0 {
                body = .empty
            } else {
                body = .saID(try .decode(&r))
            }
        case .newPolicy, .updPolicy: body = .policyInfo(try .decode(&r))
        case .delPolicy: body = .policyID(try .decode(&r))
        case .getPolicy:
            if request && flags & NetlinkFlags.dump != 0 {
                body = .empty
            } else {
                body = .policyID(try .decode(&r))
            }
        case .allocSPI:
            var s = XfrmUserSPIInfo()
            s.info = try .decode(&r)
            s.min = try r.u32()
            s.max = try r.u32()
            body = .spiInfo(s)
        case .expire:
            let s = try XfrmUserSAInfo.decode(&r)
            body = .expire(s, hard: try r.u8() != 0)
            try r.skip(7)
        case .polExpire:
            let p = try XfrmUserPolicyInfo.decode(&r)
            body = .policyExpire(p, hard: try r.u8() != 0)
            try r.skip(7)
        case .acquire:
            var a = XfrmUserAcquire()
            a.id = try .decode(&r)
            a.saddr = try .decode(&r)
            a.sel = try .decode(&r)
            a.policy = try .decode(&r)
            a.aalgos = try r.u32()
            a.ealgos = try r.u32()
            a.calgos = try r.u32()
            a.seq = try r.u32()
            body = .acquire(a)
        case .mapping:
            body = .mapping(try .decode(&r))
        case .newAE, .getAE:
            body = .aevent(try .decode(&r))
        case .flushSA:
            body = .flushSA(proto: try r.u8())
            if r.remaining >= 3 { try r.skip(3) }
        case .flushPolicy:
            body = .flushPolicy
        case .setDefault, .getDefault:
            if r.offset + 3 <= len {
                body = .policyDefault(inbound: try r.u8(), forward: try r.u8(), outbound: try r.u8())
                if r.offset < len { try r.skip(1) }
            } else {
                body = .empty
            }
        case .getSADInfo, .newSADInfo:
            if len - r.offset >= 4 {
                _ = try r.u32()
                var count: UInt32 = 0, b: UInt32 = 0, m: UInt32 = 0
                for (t, p) in try attributes(&r, end: len) {
                    var a = WireReader(p)
                    if t == 1 { count = try a.u32() }
                    if t == 2 { b = try a.u32(); m = try a.u32() }
                }
                return XfrmMessage(type: type, flags: flags, sequence: seq, portID: pid,
                                   body: .sadInfo(count: count, buckets: b, maxBuckets: m))
            }
            body = .empty
        case .getSPDInfo, .newSPDInfo:
            if len - r.offset >= 4 {
                _ = try r.u32()
                var s = XfrmSPDInfo()
                for (t, p) in try attributes(&r, end: len) where t == 1 {
                    var a = WireReader(p)
                    s.inCount = try a.u32()
                    s.outCount = try a.u32()
                    s.fwdCount = try a.u32()
                    s.inSocketCount = try a.u32()
                    s.outSocketCount = try a.u32()
                    s.fwdSocketCount = try a.u32()
                }
                return XfrmMessage(type: type, flags: flags, sequence: seq, portID: pid, body: .spdInfo(s))
            }
            body = .empty
        default:
            throw WireError("XFRM message type \(type) is not supported")
        }
        var attrs: [XfrmAttribute] = []
        for (t, p) in try attributes(&r, end: len) { attrs.append(try .decode(type: t, payload: p)) }
        return XfrmMessage(type: type, flags: flags, sequence: seq, portID: pid, body: body, attributes: attrs)
    }
}

