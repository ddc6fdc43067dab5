// The pieces of the grammar that state and policy commands share (ipxfrm.c): ID, SELECTOR/UPSPEC, LIMIT, MARK, MODE,
// REQID, and the client-side list filter they fill in as a side effect.

import XFRMWire

// MARK: - The list filter (struct xfrm_filter)

struct XfrmFilter {
    var use = false
    var xsinfo = XfrmUserSAInfo()
    var idSrcMask: UInt8 = 0
    var idDstMask: UInt8 = 0
    var idProtoMask: UInt8 = 0
    var idSpiMask: UInt32 = 0
    var modeMask: UInt8 = 0
    var reqidMask: UInt32 = 0
    var stateFlagsMask: UInt8 = 0
    var xpinfo = XfrmUserPolicyInfo()
    var dirMask: UInt8 = 0
    var selSrcMask: UInt8 = 0
    var selDstMask: UInt8 = 0
    var selDevMask: UInt32 = 0
    var upspecProtoMask: UInt8 = 0
    var upspecSportMask: UInt16 = 0
    var upspecDportMask: UInt16 = 0
    var indexMask: UInt32 = 0
    var actionMask: UInt8 = 0
    var priorityMask: UInt32 = 0
    var policyFlagsMask: UInt8 = 0
    var filterSocket = false
    var ptype: UInt8 = 0
    var ptypeMask: UInt8 = 0

    /// xfrm_addr_match(): the first `bits` bits agree.
    static func addressMatches(_ a: XfrmAddress, _ b: XfrmAddress, bits: UInt8) -> Bool {
        let n = min(Int(bits), 128)
        let whole = n / 8
        if whole > 0, a.bytes[0..<whole] != b.bytes[0..<whole] { return false }
        let rest = n % 8
        if rest > 0 {
            let mask = UInt8(0xff) << (8 - rest)
            if (a.bytes[whole] ^ b.bytes[whole]) & mask != 0 { return false }
        }
        return true
    }

    /// xfrm_state_filter_match().
    func matchState(_ s: XfrmUserSAInfo) -> Bool {
        if !self.use { return true }
        if self.xsinfo.family != AddressFamily.unspec && self.xsinfo.family != s.family { return false }
        if self.idSrcMask != 0, !Self.addressMatches(s.saddr, self.xsinfo.saddr, bits: self.idSrcMask) { return false }
        if self.idDstMask != 0, !Self.addressMatches(s.id.daddr, self.xsinfo.id.daddr, bits: self.idDstMask) {
            return false
        }
        if (s.id.proto ^ self.xsinfo.id.proto) & self.idProtoMask != 0 { return false }
        if (s.id.spi ^ self.xsinfo.id.spi) & self.idSpiMask != 0 { return false }
        if (s.mode ^ self.xsinfo.mode) & self.modeMask != 0 { return false }
        if (s.reqid ^ self.xsinfo.reqid) & self.reqidMask != 0 { return false }
        if self.stateFlagsMask != 0, s.flags & self.xsinfo.flags == 0 { return false }
        return true
    }

    /// xfrm_policy_filter_match().
    func matchPolicy(_ p: XfrmUserPolicyInfo, ptype: UInt8) -> Bool {
        if !self.use { return true }
        let f = self.xpinfo
        if f.sel.family != AddressFamily.unspec && f.sel.family != p.sel.family { return false }
        if (p.dir ^ f.dir) & self.dirMask != 0 { return false }
        if self.filterSocket && p.dir >= 3 { return false }
        if (ptype ^ self.ptype) & self.ptypeMask != 0 { return false }
        if self.selSrcMask != 0, !Self.addressMatches(p.sel.saddr, f.sel.saddr, bits: self.selSrcMask) { return false }
        if self.selDstMask != 0, !Self.addressMatches(p.sel.daddr, f.sel.daddr, bits: self.selDstMask) { return false }
        if UInt32(bitPattern: p.sel.ifindex ^ f.sel.ifindex) & self.selDevMask != 0 { return false }
        if (p.sel.proto ^ f.sel.proto) & self.upspecProtoMask != 0 { return false }
        if self.upspecSportMask != 0, (p.sel.sport ^ f.sel.sport) & self.upspecSportMask != 0 { return false }
        if self.upspecDportMask != 0, (p.sel.dport ^ f.sel.dport) & self.upspecDportMask != 0 { return false }
        if (p.index ^ f.index) & self.indexMask != 0 { return false }
        if (p.action ^ f.action) & self.actionMask != 0 { return false }
        if (p.priority ^ f.priority) & self.priorityMask != 0 { return false }
        if self.policyFlagsMask != 0, p.flags & f.flags == 0 { return false }
        return true
    }
}

// MARK: - Shared parsers

extension CLIContext {
    /// xfrm_id_parse(): `[src ADDR] [dst ADDR] [proto XFRM-PROTO] [spi SPI]`, leaving the cursor on the last word used.
    func parseID(_ a: inout Args, saddr: inout XfrmAddress, id: inout XfrmID, family: inout UInt16, loose: Bool)
        throws(CommandError)
    {
        let start = a.argc
        var src = InetPrefix()
        var dst = InetPrefix()
        while true {
            let w = a.current
            if w == "src" {
                try a.next()
                src = try getPrefix(a.current, family: self.preferredFamily)
                if src.family == AddressFamily.unspec {
                    throw .invalid("value after \"src\" has an unrecognized address family", a.current)
                }
                family = src.family
                saddr = src.address
                self.filter.idSrcMask = UInt8(truncatingIfNeeded: src.bitlen)
            } else if w == "dst" {
                try a.next()
                dst = try getPrefix(a.current, family: self.preferredFamily)
                if dst.family == AddressFamily.unspec {
                    throw .invalid("value after \"dst\" has an unrecognized address family", a.current)
                }
                family = dst.family
                id.daddr = dst.address
                self.filter.idDstMask = UInt8(truncatingIfNeeded: dst.bitlen)
            } else if w == "proto" {
                try a.next()
                guard let p = xfrmProtoByName(a.current) else { throw .invalid("XFRM-PROTO value is invalid", a.current) }
                id.proto = p
                self.filter.idProtoMask = 0xff
            } else if w == "spi" {
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("SPI value is invalid", a.current) }
                id.spi = v
                self.filter.idSpiMask = 0xffff_ffff
            } else {
                a.back()
                break
            }
            if !a.nextOK { break }
            try a.next()
        }
        if src.family != 0 && dst.family != 0 && src.family != dst.family {
            throw .invalid("the same address family is required between values after \"src\" and \"dst\"", a.current)
        }
        if id.spi != 0 && id.proto != 0 {
            if isROProto(id.proto) {
                throw CommandError("\"spi\" is invalid with XFRM-PROTO value \"\(xfrmProtoName(id.proto))\"")
            } else if id.proto == XfrmProto.comp && id.spi >= 0x10000 {
                throw CommandError("SPI value is too large with XFRM-PROTO value \"\(xfrmProtoName(id.proto))\"")
            }
        }
        if !loose && id.proto == 0 { throw .missing("XFRM-PROTO") }
        if a.argc == start { throw .missing("ID") }
    }

    /// xfrm_selector_upspec_parse().
    func parseUpspec(_ a: inout Args, _ sel: inout XfrmSelector) throws(CommandError) {
        let start = a.argc
        var sportSeen = false, dportSeen = false, typeSeen = false, codeSeen = false, keySeen = false
        while true {
            let w = a.current
            if w == "proto" {
                try a.next()
                var upspec: UInt8
                if a.current == "any" {
                    upspec = 0
                } else if let n = protocolNumber(named: a.current) {
                    upspec = UInt8(truncatingIfNeeded: n)
                } else if let n = getU8(a.current) {
                    upspec = n
                } else {
                    throw .invalid("PROTO value is invalid", a.current)
                }
                sel.proto = upspec
                self.filter.upspecProtoMask = 0xff
            } else if w == "sport" {
                sportSeen = true
                try a.next()
                guard let v = getU16(a.current) else { throw .invalid("value after \"sport\" is invalid", a.current) }
                sel.sport = v
                if v != 0 { sel.sportMask = 0xffff }
                self.filter.upspecSportMask = 0xffff
            } else if w == "dport" {
                dportSeen = true
                try a.next()
                guard let v = getU16(a.current) else { throw .invalid("value after \"dport\" is invalid", a.current) }
                sel.dport = v
                if v != 0 { sel.dportMask = 0xffff }
                self.filter.upspecDportMask = 0xffff
            } else if w == "type" {
                typeSeen = true
                try a.next()
                guard let v = getU16(a.current), v & 0xff00 == 0 else {
                    throw .invalid("value after \"type\" is invalid", a.current)
                }
                sel.sport = v
                sel.sportMask = 0xffff
                self.filter.upspecSportMask = 0xffff
            } else if w == "code" {
                codeSeen = true
                try a.next()
                guard let v = getU16(a.current), v & 0xff00 == 0 else {
                    throw .invalid("value after \"code\" is invalid", a.current)
                }
                sel.dport = v
                sel.dportMask = 0xffff
                self.filter.upspecDportMask = 0xffff
            } else if w == "key" {
                keySeen = true
                try a.next()
                var key: UInt32
                if a.current.contains(".") {
                    key = try getAddr32(a.current)
                } else {
                    guard let v = getU32(a.current) else { throw CommandError("value after \"key\" is invalid") }
                    key = v
                }
                sel.sport = UInt16(key >> 16)
                sel.dport = UInt16(key & 0xffff)
                sel.sportMask = 0xffff
                sel.dportMask = 0xffff
                self.filter.upspecDportMask = 0xffff
            } else {
                a.back()
                break
            }
            if !a.nextOK { break }
            try a.next()
        }
        if a.argc == start { throw .missing("UPSPEC") }
        if sportSeen || dportSeen {
            switch sel.proto {
            case IPProto.tcp, IPProto.udp, IPProto.sctp, IPProto.dccp, 0: break
            default:
                throw CommandError(
                    "\"sport\" and \"dport\" are invalid with PROTO value \"\(protocolName(sel.proto))\"")
            }
        }
        if typeSeen || codeSeen {
            switch sel.proto {
            case IPProto.icmp, IPProto.icmpv6, IPProto.mh: break
            default:
                throw CommandError("\"type\" and \"code\" are invalid with PROTO value \"\(protocolName(sel.proto))\"")
            }
        }
        if keySeen && sel.proto != IPProto.gre {
            throw CommandError("\"key\" is invalid with PROTO value \"\(protocolName(sel.proto))\"")
        }
    }

    /// xfrm_selector_parse(): `[src ADDR[/PLEN]] [dst ADDR[/PLEN]] [dev DEV] [UPSPEC]`.
    func parseSelector(_ a: inout Args, _ sel: inout XfrmSelector) throws(CommandError) {
        let start = a.argc
        var src = InetPrefix()
        var dst = InetPrefix()
        var upspecSeen = false
        while true {
            let w = a.current
            if w == "src" {
                try a.next()
                src = try getPrefix(a.current, family: self.preferredFamily)
                if src.family == AddressFamily.unspec {
                    throw .invalid("value after \"src\" has an unrecognized address family", a.current)
                }
                sel.family = src.family
                sel.saddr = src.address
                sel.prefixlenS = UInt8(truncatingIfNeeded: src.bitlen)
                self.filter.selSrcMask = UInt8(truncatingIfNeeded: src.bitlen)
            } else if w == "dst" {
                try a.next()
                dst = try getPrefix(a.current, family: self.preferredFamily)
                if dst.family == AddressFamily.unspec {
                    throw .invalid("value after \"dst\" has an unrecognized address family", a.current)
                }
                sel.family = dst.family
                sel.daddr = dst.address
                sel.prefixlenD = UInt8(truncatingIfNeeded: dst.bitlen)
                self.filter.selDstMask = UInt8(truncatingIfNeeded: dst.bitlen)
            } else if w == "dev" {
                try a.next()
                var ifindex: Int32 = 0
                if a.current != "none" {
                    ifindex = Int32(bitPattern: self.ifindex(named: a.current))
                    if ifindex <= 0 { throw .invalid("DEV value is invalid", a.current) }
                }
                sel.ifindex = ifindex
                self.filter.selDevMask = 0xffff_ffff
            } else {
                if upspecSeen {
                    a.back()
                    break
                }
                upspecSeen = true
                try parseUpspec(&a, &sel)
            }
            if !a.nextOK { break }
            try a.next()
        }
        if src.family != 0 && dst.family != 0 && src.family != dst.family {
            throw .invalid("the same address family is required between values after \"src\" and \"dst\"", a.current)
        }
        if a.argc == start { throw .missing("SELECTOR") }
    }

    /// xfrm_lifetime_cfg_parse(): one LIMIT.
    func parseLimit(_ a: inout Args, _ lft: inout XfrmLifetimeCfg) throws(CommandError) {
        let key = a.current
        let fields: [String: WritableKeyPath<XfrmLifetimeCfg, UInt64>] = [
            "time-soft": \.softAddExpiresSeconds, "time-hard": \.hardAddExpiresSeconds,
            "time-use-soft": \.softUseExpiresSeconds, "time-use-hard": \.hardUseExpiresSeconds,
            "byte-soft": \.softByteLimit, "byte-hard": \.hardByteLimit,
            "packet-soft": \.softPacketLimit, "packet-hard": \.hardPacketLimit,
        ]
        guard let field = fields[key] else { throw .invalid("LIMIT value is invalid", key) }
        try a.next()
        guard let v = getU64(a.current) else { throw .invalid("value after \"\(key)\" is invalid", a.current) }
        lft[keyPath: field] = v
    }

    /// xfrm_parse_mark(): `mark MARK [mask MASK]`, the cursor on "mark".
    func parseMark(_ a: inout Args) throws(CommandError) -> XfrmMark {
        var mark = XfrmMark(value: 0, mask: 0)
        try a.next()
        guard let v = getU32(a.current) else { throw .invalid("MARK value is invalid", a.current) }
        mark.value = v
        if a.argc > 1 {
            try a.next()
        } else {
            mark.mask = 0xffff_ffff
            return mark
        }
        if a.current == "mask" {
            try a.next()
            guard let m = getU32(a.current) else { throw .invalid("MASK value is invalid", a.current) }
            mark.mask = m
        } else {
            mark.mask = 0xffff_ffff
            a.back()
        }
        return mark
    }

    func parseMode(_ word: String) throws(CommandError) -> UInt8 {
        guard let m = modeByName(word) else { throw .invalid("MODE value is invalid", word) }
        return m
    }

    func parseReqid(_ word: String) throws(CommandError) -> UInt32 {
        guard let v = getU32(word) else { throw .invalid("REQID value is invalid", word) }
        return v
    }
}

// MARK: - Attributes without an XfrmAttribute case

enum RawAttributes {
    static func u32(_ type: UInt16, _ v: UInt32) -> XfrmAttribute {
        var w = WireWriter()
        w.u32(v)
        return .unknown(type: type, payload: w.bytes)
    }

    static func sourceAddress(_ a: XfrmAddress) -> XfrmAttribute { .unknown(type: RawAttr.srcAddr, payload: a.bytes) }

    /// struct xfrm_algo for XFRMA_ALG_COMP.
    static func compAlgorithm(_ a: XfrmAlgorithm) -> XfrmAttribute {
        var w = WireWriter()
        a.encode(&w, withLength: false)
        return .unknown(type: RawAttr.algComp, payload: w.bytes)
    }

    /// struct xfrm_user_sec_ctx and the context text with its NUL, as xfrm_sctx_parse() builds it.
    static func securityContext(_ text: String) -> XfrmAttribute {
        let s = Array(text.utf8) + [0]
        var w = WireWriter()
        w.u16(UInt16(truncatingIfNeeded: 8 + s.count))
        w.u16(RawAttr.secCtx)
        w.u8(1)  // ctx_alg
        w.u8(1)  // ctx_doi
        w.u16(UInt16(truncatingIfNeeded: s.count))
        w.raw(s)
        return .unknown(type: RawAttr.secCtx, payload: w.bytes)
    }

    /// struct xfrm_address_filter for a state dump.
    static func addressFilter(saddr: XfrmAddress, daddr: XfrmAddress, family: UInt16, splen: UInt8, dplen: UInt8)
        -> XfrmAttribute
    {
        var w = WireWriter()
        w.raw(saddr.bytes)
        w.raw(daddr.bytes)
        w.u16(family)
        w.u8(splen)
        w.u8(dplen)
        return .unknown(type: RawAttr.addressFilter, payload: w.bytes)
    }
}
