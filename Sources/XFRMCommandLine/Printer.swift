// Output in iproute2's exact format (ip/ipxfrm.c, xfrm_state.c, xfrm_policy.c, xfrm_monitor.c): the same fields in
// the same order, with the same tabs, trailing spaces and number formats. `sl` is iproute2's _SL_: "\n", or "\\" for
// -oneline, which then ends each entry with one "\n".

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import XFRMWire

// MARK: - Number and time formats

func hexDigits(_ v: UInt64, width: Int) -> String {
    let s = String(v, radix: 16)
    return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
}

/// "%08x".
func hex8(_ v: UInt32) -> String { hexDigits(UInt64(v), width: 8) }
/// "%#x": "0" for zero, else "0x..".
func altHex(_ v: UInt32) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
/// "%08u".
func dec8(_ v: UInt32) -> String {
    let s = String(v)
    return s.count >= 8 ? s : String(repeating: "0", count: 8 - s.count) + s
}
/// "%d" of a u32 field.
func signed(_ v: UInt32) -> String { String(Int32(bitPattern: v)) }

/// strxf_mask8(): eight binary digits.
func mask8(_ v: UInt8) -> String {
    (0..<8).map { v & (0x80 >> $0) != 0 ? "1" : "0" }.joined()
}

func libcStrerror(_ errno: Int32) -> String {
    guard let p = Glibc.strerror(errno) else { return "Unknown error \(errno)" }
    return String(cString: p)
}

/// strxf_time(): local time "%Y-%m-%d %T", "-" for 0.
func timeText(_ t: UInt64) -> String {
    if t == 0 { return "-" }
    var secs = time_t(Int64(bitPattern: t))
    var tmv = tm()
    guard localtime_r(&secs, &tmv) != nil else { return "invalid-time" }
    func two(_ v: Int32) -> String { v < 10 && v >= 0 ? "0\(v)" : "\(v)" }
    return "\(tmv.tm_year + 1900)-\(two(tmv.tm_mon + 1))-\(two(tmv.tm_mday)) "
        + "\(two(tmv.tm_hour)):\(two(tmv.tm_min)):\(two(tmv.tm_sec))"
}

// MARK: - Addresses

/// inet_ntop(AF_INET6) as glibc writes it: the longest run (≥ 2) of zero groups compressed, and an IPv4-compatible
/// or -mapped address ending in a dotted quad.
func ipv6Text(_ b: [UInt8]) -> String {
    var w = [UInt16](repeating: 0, count: 8)
    for i in 0..<8 { w[i] = UInt16(b[2 * i]) << 8 | UInt16(b[2 * i + 1]) }
    var bestBase = -1, bestLen = 0, curBase = -1, curLen = 0
    for i in 0..<8 {
        if w[i] == 0 {
            if curBase == -1 {
                curBase = i
                curLen = 1
            } else {
                curLen += 1
            }
        } else if curBase != -1 {
            if bestBase == -1 || curLen > bestLen {
                bestBase = curBase
                bestLen = curLen
            }
            curBase = -1
        }
    }
    if curBase != -1, bestBase == -1 || curLen > bestLen {
        bestBase = curBase
        bestLen = curLen
    }
    if bestBase != -1, bestLen < 2 { bestBase = -1 }
    var out = ""
    var i = 0
    while i < 8 {
        if bestBase != -1, i >= bestBase, i < bestBase + bestLen {
            if i == bestBase { out += ":" }
            i += 1
            continue
        }
        if i != 0 { out += ":" }
        if i == 6, bestBase == 0, bestLen == 6 || (bestLen == 5 && w[5] == 0xffff) {
            out += "\(b[12]).\(b[13]).\(b[14]).\(b[15])"
            return out
        }
        out += String(w[i], radix: 16)
        i += 1
    }
    if bestBase != -1, bestBase + bestLen == 8 { out += ":" }
    return out
}

/// rt_addr_n2a().
func addressText(_ family: UInt16, _ a: XfrmAddress) -> String {
    switch family {
    case AddressFamily.inet: "\(a.bytes[0]).\(a.bytes[1]).\(a.bytes[2]).\(a.bytes[3])"
    case AddressFamily.inet6: ipv6Text(a.bytes)
    default: "???"
    }
}

// MARK: - Attributes by type (parse_rtattr: the last of a type wins)

struct AttrTable {
    var byType: [UInt16: XfrmAttribute] = [:]
    init(_ attrs: [XfrmAttribute]) {
        for a in attrs { self.byType[a.type & 0x3fff] = a }
    }
    func has(_ t: UInt16) -> Bool { self.byType[t] != nil }
    func has(_ t: XfrmAttributeType) -> Bool { self.byType[t.rawValue] != nil }
    subscript(_ t: XfrmAttributeType) -> XfrmAttribute? { self.byType[t.rawValue] }
    /// The payload of an attribute carried as `.unknown`.
    func raw(_ t: UInt16) -> [UInt8]? {
        if case .unknown(_, let p)? = self.byType[t] { return p }
        return nil
    }
    /// XFRMA_SA_PCPU, decoded or (from an older encoder) raw.
    var pcpuNum: UInt32? {
        if case .saPCPU(let v)? = self[.saPCPU] { return v }
        return self.rawU32(XfrmAttributeType.saPCPU.rawValue)
    }
    func rawU32(_ t: UInt16) -> UInt32? {
        guard let p = self.raw(t) else { return nil }
        var r = WireReader(p + [0, 0, 0, 0])
        return try? r.u32()
    }
}

// MARK: - The printer

struct Printer {
    let stats: Int
    let oneline: Bool
    let sl: String
    let interfaces: (any InterfaceNameResolver)?
    /// iproute2's preferred_family, the last resort for a selector without a family.
    var preferredFamily: UInt16 = AddressFamily.unspec
    var out = ""

    init(options: XfrmCLIOptions, interfaces: (any InterfaceNameResolver)?) {
        self.stats = options.stats
        self.oneline = options.oneline
        self.sl = options.oneline ? "\\" : "\n"
        self.interfaces = interfaces
    }

    mutating func put(_ s: String) { self.out += s }

    /// ll_index_to_name().
    func deviceName(_ index: Int32) -> String {
        if index == 0 { return "*" }
        if let n = self.interfaces?.name(ofIndex: index) { return n }
        return "if\(UInt32(bitPattern: index))"
    }

    // MARK: pieces

    /// xfrm_id_info_print().
    mutating func idInfo(saddr: XfrmAddress, id: XfrmID, mode: UInt8, reqid: UInt32, family: UInt16, forceSPI: Bool,
                         prefix: String, title: String) {
        put(title)
        put("src \(addressText(family, saddr)) ")
        put("dst \(addressText(family, id.daddr))")
        put(sl)
        put(prefix)
        put("\t")
        put("proto \(xfrmProtoName(id.proto)) ")
        if stats > 0 || forceSPI || id.spi != 0 {
            put("spi 0x\(hex8(id.spi))")
            if stats > 0 { put("(\(id.spi))") }
            put(" ")
        }
        put("reqid \(reqid)")
        if stats > 0 { put("(0x\(hex8(reqid)))") }
        put(" ")
        put("mode \(modeName(mode))")
        put(sl)
    }

    static func limit(_ v: UInt64) -> String { v == xfrmInfinity ? "(INF)" : "\(v)" }

    /// xfrm_stats_print().
    mutating func statsBlock(_ s: XfrmStats, prefix: String) {
        put(prefix)
        put("stats:\(sl)")
        put(prefix)
        put("  replay-window \(s.replayWindow) replay \(s.replay) failed \(s.integrityFailed)\(sl)")
    }

    /// xfrm_lifetime_print().
    mutating func lifetime(_ cfg: XfrmLifetimeCfg, _ cur: XfrmLifetimeCur, prefix: String) {
        put(prefix)
        put("lifetime config:\(sl)")
        put(prefix)
        put("  limit: soft \(Self.limit(cfg.softByteLimit))(bytes),")
        put(" hard \(Self.limit(cfg.hardByteLimit))(bytes)\(sl)")
        put(prefix)
        put("  limit: soft \(Self.limit(cfg.softPacketLimit))(packets),")
        put(" hard \(Self.limit(cfg.hardPacketLimit))(packets)\(sl)")
        put(prefix)
        put("  expire add: soft \(cfg.softAddExpiresSeconds)(sec), hard \(cfg.hardAddExpiresSeconds)(sec)\(sl)")
        put(prefix)
        put("  expire use: soft \(cfg.softUseExpiresSeconds)(sec), hard \(cfg.hardUseExpiresSeconds)(sec)\(sl)")
        put(prefix)
        put("lifetime current:\(sl)")
        put(prefix)
        put("  \(cur.bytes)(bytes), \(cur.packets)(packets)\(sl)")
        put(prefix)
        put("  add \(timeText(cur.addTime)) ")
        put("use \(timeText(cur.useTime))\(sl)")
    }

    /// xfrm_selector_print().
    mutating func selector(_ sel: XfrmSelector, family: UInt16, prefix: String) {
        var f = sel.family
        if f == AddressFamily.unspec { f = family }
        if f == AddressFamily.unspec { f = preferredFamily }
        put(prefix)
        put("src \(addressText(f, sel.saddr))/\(sel.prefixlenS) ")
        put("dst \(addressText(f, sel.daddr))/\(sel.prefixlenD) ")
        if sel.proto != 0 { put("proto \(protocolName(sel.proto)) ") }
        switch sel.proto {
        case IPProto.icmp, IPProto.icmpv6:
            if sel.sportMask != 0 { put("type \(sel.sport) ") }
            if sel.dportMask != 0 { put("code \(sel.dport) ") }
        case IPProto.gre:
            if sel.sportMask != 0 || sel.dportMask != 0 { put("key \(UInt32(sel.sport) << 16 + UInt32(sel.dport)) ") }
        case IPProto.mh:
            if sel.sportMask != 0 { put("type \(sel.sport) ") }
            // iproute2 prints the raw (network-order) field as a host number here
            if sel.dportMask != 0, stats > 0 { put("(dport) 0x\(hexDigits(UInt64(sel.dport.byteSwapped), width: 4)) ") }
        default:
            if sel.sportMask != 0 { put("sport \(sel.sport) ") }
            if sel.dportMask != 0 { put("dport \(sel.dport) ") }
        }
        if sel.ifindex > 0 { put("dev \(deviceName(sel.ifindex)) ") }
        if stats > 0 { put("uid \(sel.user)") }
        put(sl)
    }

    /// __xfrm_algo_print() for an algorithm with its name and key.
    mutating func algorithm(_ kind: AlgoKind, name: String, key: [UInt8], keyBits: UInt32, prefix: String,
                            newline: Bool, nokeys: Bool) {
        put(prefix)
        put("\(kind.name) ")
        put("\(name) ")
        if nokeys {
            put("<<Keys hidden>>")
        } else if keyBits / 8 > 0 {
            put("0x" + key.prefix(Int(keyBits / 8)).map { hexDigits(UInt64($0), width: 2) }.joined())
            if stats > 0 { put(" (\(Int32(bitPattern: keyBits)) bits)") }
        }
        if newline { put(sl) }
    }

    mutating func algorithm(_ kind: AlgoKind, _ a: XfrmAlgorithm, prefix: String, nokeys: Bool) {
        let bits = UInt32(a.key.count * 8)
        switch kind {
        case .aead, .authTrunc:
            algorithm(kind, name: a.name, key: a.key, keyBits: bits, prefix: prefix, newline: false, nokeys: nokeys)
            put(" \(signed(a.lengthBits))")
            put(sl)
        default:
            algorithm(kind, name: a.name, key: a.key, keyBits: bits, prefix: prefix, newline: true, nokeys: nokeys)
        }
    }

    /// The comp algorithm arrives raw (struct xfrm_algo).
    mutating func rawAlgorithm(_ kind: AlgoKind, _ p: [UInt8], prefix: String, nokeys: Bool) {
        put(prefix)
        put("\(kind.name) ")
        guard p.count >= 68 else {
            put("(ERROR truncated)")
            put(sl)
            return
        }
        var r = WireReader(p)
        let name = (try? r.cString(size: 64)) ?? ""
        let bits = (try? r.u32()) ?? 0
        put("\(name) ")
        let keylen = Int(bits / 8)
        if p.count - 68 < keylen {
            put("(ERROR truncated)")
            put(sl)
            return
        }
        if nokeys {
            put("<<Keys hidden>>")
        } else if keylen > 0 {
            put("0x" + p[68..<(68 + keylen)].map { hexDigits(UInt64($0), width: 2) }.joined())
            if stats > 0 { put(" (\(Int32(bitPattern: bits)) bits)") }
        }
        put(sl)
    }

    /// xfrm_tmpl_print().
    mutating func templates(_ ts: [XfrmUserTmpl], prefix: String) {
        if ts.isEmpty {
            put(prefix)
            put("(ERROR \"tmpl\" truncated)")
            put(sl)
            return
        }
        for t in ts {
            put(prefix)
            idInfo(saddr: t.saddr, id: t.id, mode: t.mode, reqid: t.reqid, family: t.family, forceSPI: false,
                   prefix: prefix, title: "tmpl ")
            if stats > 0 || t.optional != 0 {
                put(prefix)
                put("\t")
                switch t.optional {
                case 0: if stats > 0 { put("level required ") }
                case 1: put("level use ")
                default: put("level \(t.optional) ")
                }
                if stats > 0 { put("share \(shareName(t.share)) ") }
                put(sl)
            }
            if stats > 0 {
                put(prefix)
                put("\t")
                put("enc-mask \(hex8(t.ealgos)) ")
                put("auth-mask \(hex8(t.aalgos)) ")
                put("comp-mask \(hex8(t.calgos))")
                put(sl)
            }
        }
    }

    mutating func outputMark(_ tb: AttrTable) {
        put("output-mark 0x\(String(tb.rawU32(RawAttr.outputMark) ?? 0, radix: 16))")
        if let m = tb.rawU32(RawAttr.setMarkMask) { put("/0x\(String(m, radix: 16))") }
    }

    /// xfrm_xfrma_print(): the attributes, in iproute2's fixed order.
    mutating func attributes(_ tb: AttrTable, family: UInt16, prefix: String, nokeys: Bool, dir: Bool) {
        if case .mark(let m)? = tb[.mark] {
            put("\tmark \(altHex(m.value))/\(altHex(m.mask)) ")
            if tb.has(RawAttr.outputMark) { outputMark(tb) }
            put(sl)
        } else if tb.has(RawAttr.outputMark) {
            put("\t")
            outputMark(tb)
            put(sl)
        }
        if case .algAuth(let a)? = tb[.algAuth], !tb.has(.algAuthTrunc) {
            algorithm(.auth, a, prefix: prefix, nokeys: nokeys)
        }
        if case .algAuthTrunc(let a)? = tb[.algAuthTrunc] { algorithm(.authTrunc, a, prefix: prefix, nokeys: nokeys) }
        if case .algAEAD(let a)? = tb[.algAEAD] { algorithm(.aead, a, prefix: prefix, nokeys: nokeys) }
        if case .algCrypt(let a)? = tb[.algCrypt] { algorithm(.crypt, a, prefix: prefix, nokeys: nokeys) }
        if let p = tb.raw(RawAttr.algComp) { rawAlgorithm(.comp, p, prefix: prefix, nokeys: nokeys) }
        if case .encap(let e)? = tb[.encap] {
            put(prefix)
            put("encap ")
            put("type ")
            switch e.type {
            case XfrmEncapType.espInUDPNonIKE: put("espinudp-nonike ")
            case XfrmEncapType.espInUDP: put("espinudp ")
            case XfrmEncapType.espInTCP: put("espintcp ")
            default: put("\(e.type) ")
            }
            put("sport \(e.sport) ")
            put("dport \(e.dport) ")
            put("addr \(addressText(family, e.oa))")
            put(sl)
        }
        if case .templates(let ts)? = tb[.tmpl] { templates(ts, prefix: prefix) }
        if case .coAddress(let a)? = tb[.coAddr] {
            put(prefix)
            put("coa ")
            put(addressText(family, a))
            put(sl)
        }
        if case .lastUsed(let t)? = tb[.lastUsed] {
            put(prefix)
            put("lastused ")
            put(timeText(t))
            put(sl)
        }
        if case .replay(let r)? = tb[.replayVal] {
            put(prefix)
            put("anti-replay context: ")
            put("seq 0x\(String(r.seq, radix: 16)), oseq 0x\(String(r.oseq, radix: 16)), bitmap 0x\(hex8(r.bitmap))")
            put(sl)
        }
        if case .replayESN(let r)? = tb[.replayESNVal] {
            put(prefix)
            put("anti-replay esn context:")
            put(sl)
            put(prefix)
            put(" seq-hi 0x\(String(r.seqHi, radix: 16)), seq 0x\(String(r.seq, radix: 16)), ")
            put("oseq-hi 0x\(String(r.oseqHi, radix: 16)), oseq 0x\(String(r.oseq, radix: 16))")
            put(sl)
            put(prefix)
            put(" replay_window \(r.replayWindow), bitmap-length \(r.bitmap.count)")
            var j = 0
            for i in stride(from: r.bitmap.count, to: 0, by: -1) {
                if j % 8 == 0 {
                    put(sl)
                    put(prefix)
                    put(" ")
                }
                j += 1
                put("\(hex8(r.bitmap[i - 1])) ")
            }
            put(sl)
        }
        if case .offloadDevice(let o)? = tb[.offloadDev] {
            put(prefix)
            put("crypto offload parameters: ")
            put("dev \(deviceName(o.ifindex)) ")
            if dir { put("dir \(o.flags & XfrmOffloadFlag.inbound != 0 ? "in" : "out") ") }
            put("mode \(o.flags & XfrmOffloadFlag.packet != 0 ? "packet" : "crypto")")
            put(sl)
        }
        if case .ifID(let v)? = tb[.ifID] {
            put(prefix)
            put("if_id \(altHex(v))")
            put(sl)
        }
        if case .tfcPad(let v)? = tb[.tfcPad] {
            put(prefix)
            put("tfcpad \(v)")
            put(sl)
        }
        if case .saDir(let d)? = tb[.saDir] {
            put("\tdir ")
            switch d {
            case XfrmSADir.inbound: put("in")
            case XfrmSADir.outbound: put("out")
            default: put("other (\(d))")
            }
            put(sl)
        }
        if let v = tb.pcpuNum {
            put("\tpcpu-num \(v)")
            put(sl)
        }
    }

    /// xfrm_sec_ctx_print().
    mutating func securityContext(_ p: [UInt8]) {
        put("\tsecurity context ")
        if p.count < 8 { put("(ERROR truncated)") }
        let ctxLen = p.count >= 8 ? Int(UInt16(p[6]) | UInt16(p[7]) << 8) : 0
        let text = p.count > 8 ? Array(p[8...].prefix(ctxLen).prefix { $0 != 0 }) : []
        put("\(String(decoding: text, as: UTF8.self)) \(sl)")
    }

    /// The XFRM_FLAG_PRINT sequence: names separated by spaces, leftover bits in hex.
    mutating func flagList(_ flags: UInt32, _ names: [(UInt32, String)]) {
        var f = flags
        for (bit, name) in names where f & bit != 0 {
            f &= ~bit
            put(name + (f != 0 ? " " : ""))
        }
        if f != 0 { put(String(f, radix: 16)) }
    }

    /// xfrm_state_info_print().
    mutating func stateInfo(_ xs: XfrmUserSAInfo, _ tb: AttrTable, prefix: String, title: String, nokeys: Bool) {
        idInfo(saddr: xs.saddr, id: xs.id, mode: xs.mode, reqid: xs.reqid, family: xs.family,
               forceSPI: isIPsecProto(xs.id.proto), prefix: prefix, title: title)
        let buf = prefix + "\t"
        put(buf)
        put("replay-window \(xs.replayWindow) ")
        if stats > 0 { put("seq 0x\(dec8(xs.seq)) ") }
        if stats > 0 || xs.flags != 0 {
            put("flag ")
            flagList(UInt32(xs.flags), [
                (1, "noecn"), (2, "decap-dscp"), (4, "nopmtudisc"), (8, "wildrecv"), (16, "icmp"), (32, "af-unspec"),
                (64, "align4"), (128, "esn"),
            ])
        }
        if stats > 0, case .extraFlags(let x)? = tb[.saExtraFlags] {
            put("extra_flag ")
            flagList(x, [(1, "dont-encap-dscp"), (2, "oseq-may-wrap")])
        }
        if stats > 0 { put(" (0x\(mask8(xs.flags)))") }
        put(sl)
        attributes(tb, family: xs.family, prefix: buf, nokeys: nokeys, dir: true)
        if xs.sel != XfrmSelector() { selector(xs.sel, family: xs.family, prefix: buf + "sel ") }
        if stats > 0 {
            lifetime(xs.lft, xs.curlft, prefix: buf)
            statsBlock(xs.stats, prefix: buf)
        }
        if let c = tb.raw(RawAttr.secCtx) { securityContext(c) }
    }

    /// xfrm_policy_info_print().
    mutating func policyInfo(_ xp: XfrmUserPolicyInfo, _ tb: AttrTable, prefix: String, title: String) {
        selector(xp.sel, family: preferredFamily, prefix: title)
        if let c = tb.raw(RawAttr.secCtx) { securityContext(c) }
        let buf = prefix + "\t"
        put(buf)
        var dir = xp.dir
        if dir >= 3 {
            dir -= 3
            put("socket ")
        } else {
            put("dir ")
        }
        switch dir {
        case 0: put("in")
        case 1: put("out")
        case 2: put("fwd")
        default: put("\(dir)")
        }
        put(" ")
        switch xp.action {
        case XfrmPolicyAction.allow: if stats > 0 { put("action allow ") }
        case XfrmPolicyAction.block: put("action block ")
        default: put("action \(xp.action) ")
        }
        if stats != 0 { put("index \(xp.index) ") }
        put("priority \(xp.priority) ")
        if case .policyType(let t)? = tb[.policyType] { put("ptype \(policyTypeName(t)) ") }
        if stats > 0 { put("share \(shareName(xp.share)) ") }
        if stats > 0 || xp.flags != 0 {
            put("flag ")
            flagList(UInt32(xp.flags), [(1, "localok"), (2, "icmp")])
        }
        if stats > 0 { put(" (0x\(mask8(xp.flags)))") }
        put(sl)
        if stats > 0 { lifetime(xp.lft, xp.curlft, prefix: buf) }
        attributes(tb, family: xp.sel.family, prefix: buf, nokeys: false, dir: false)
    }

    // MARK: whole entries

    /// __do_xfrm_state_print(): NEWSA, UPDSA, DELSA and EXPIRE messages; `filter` as a list's client-side filter.
    /// Returns false for a message that is not an SA.
    @discardableResult
    mutating func statePrint(_ n: XfrmMessage, nokeys: Bool, filter: XfrmFilter?) -> Bool {
        let tb = AttrTable(n.attributes)
        var info: XfrmUserSAInfo?
        var hard: UInt8? = nil
        switch (n.messageType, n.body) {
        case (.newSA?, .saInfo(let s)), (.updSA?, .saInfo(let s)): info = s
        case (.expire?, .expire(let s, let h)):
            info = s
            hard = h ? 1 : 0
        case (.delSA?, _): info = nil
        default: return false
        }
        if let info, let filter, !filter.matchState(info) { return true }
        switch n.messageType {
        case .delSA?: put("Deleted ")
        case .updSA?: put("Updated ")
        case .expire?: put("Expired ")
        default: break
        }
        if n.messageType == .delSA {
            guard case .sa(let s)? = tb[.sa] else { return true }  // "Buggy XFRM_MSG_DELSA: no XFRMA_SA" (stderr)
            info = s
        }
        stateInfo(info!, tb, prefix: "", title: "", nokeys: nokeys)
        if let hard {
            put("\t")
            put("hard \(hard)")
            put(sl)
        }
        if oneline { put("\n") }
        return true
    }

    /// xfrm_policy_print(): NEWPOLICY, UPDPOLICY, DELPOLICY and POLEXPIRE messages.
    @discardableResult
    mutating func policyPrint(_ n: XfrmMessage, filter: XfrmFilter?) -> Bool {
        let tb = AttrTable(n.attributes)
        var info: XfrmUserPolicyInfo?
        var hard: UInt8? = nil
        switch (n.messageType, n.body) {
        case (.newPolicy?, .policyInfo(let p)), (.updPolicy?, .policyInfo(let p)): info = p
        case (.polExpire?, .policyExpire(let p, let h)):
            info = p
            hard = h ? 1 : 0
        case (.delPolicy?, _): info = nil
        default: return false
        }
        var ptype: UInt8 = 0
        if case .policyType(let t)? = tb[.policyType] { ptype = t }
        if let info, let filter, !filter.matchPolicy(info, ptype: ptype) { return true }
        switch n.messageType {
        case .delPolicy?: put("Deleted ")
        case .updPolicy?: put("Updated ")
        case .polExpire?: put("Expired ")
        default: break
        }
        if n.messageType == .delPolicy {
            guard case .policy(let p)? = tb[.policy] else { return true }  // "Buggy XFRM_MSG_DELPOLICY" (stderr)
            info = p
        }
        policyInfo(info!, tb, prefix: "", title: "")
        if let hard {
            put("\t")
            put("hard \(hard)")
            put(sl)
        }
        if oneline { put("\n") }
        return true
    }

    /// xfrm_acquire_print().
    mutating func acquire(_ a: XfrmUserAcquire, _ tb: AttrTable) {
        var family = a.sel.family
        if family == AddressFamily.unspec { family = a.policy.sel.family }
        if family == AddressFamily.unspec { family = preferredFamily }
        put("acquire ")
        put("proto \(xfrmProtoName(a.id.proto)) ")
        if stats > 0 || a.id.spi != 0 {
            put("spi 0x\(hex8(a.id.spi))")
            if stats > 0 { put("(\(a.id.spi))") }
            put(" ")
        }
        put(sl)
        selector(a.sel, family: family, prefix: "  sel ")
        policyInfo(a.policy, tb, prefix: "    ", title: "  policy ")
        if stats > 0 { put("  seq 0x\(dec8(a.seq)) ") }
        if stats > 0 {
            put("enc-mask \(hex8(a.ealgos)) ")
            put("auth-mask \(hex8(a.aalgos)) ")
            put("comp-mask \(hex8(a.calgos))")
        }
        put(sl)
        if oneline { put("\n") }
    }

    /// xfrm_policy_default_print().
    mutating func policyDefaults(inbound: UInt8, forward: UInt8, outbound: UInt8) {
        func name(_ v: UInt8) -> String {
            switch v {
            case XfrmPolicyDefault.unset: "unspec"
            case XfrmPolicyDefault.block: "block"
            case XfrmPolicyDefault.accept: "accept"
            default: "unknown"
            }
        }
        put("Default policies:\n")
        put(" in:  \(name(inbound))\n")
        put(" fwd: \(name(forward))\n")
        put(" out: \(name(outbound))\n")
    }

    /// xfrm_accept_msg() of `ip xfrm monitor`.
    mutating func monitorEvent(_ n: XfrmMessage) {
        switch n.messageType {
        case .newSA?, .delSA?, .updSA?, .expire?:
            statePrint(n, nokeys: false, filter: nil)
        case .newPolicy?, .delPolicy?, .updPolicy?, .polExpire?:
            policyPrint(n, filter: nil)
        case .acquire?:
            if case .acquire(let a) = n.body { acquire(a, AttrTable(n.attributes)) }
        case .flushSA?:
            if case .flushSA(let proto) = n.body {
                put("Flushed state ")
                put("proto \(xfrmProtoName(proto))")
                put(sl)
                if oneline { put("\n") }
            }
        case .flushPolicy?:
            put("Flushed policy ")
            if case .policyType(let t)? = AttrTable(n.attributes)[.policyType] {
                put("ptype ")
                put("\(policyTypeName(t)) ")
            }
            put(sl)
            if oneline { put("\n") }
        case .getDefault?:
            if case .policyDefault(let i, let f, let o) = n.body { policyDefaults(inbound: i, forward: f, outbound: o) }
        case .mapping?:
            // xfrm_mapping_print(): old -> new endpoint, then the SA (xfrm_usersa_print).
            if case .mapping(let m) = n.body {
                let f = m.id.family
                put("Mapping change \(addressText(f, m.oldSaddr)):\(m.oldSport) -> ")
                put("\(addressText(f, m.newSaddr)):\(m.newSport)\n\t")
                put("dst \(addressText(f, m.id.daddr))  reqid 0x\(String(m.reqid, radix: 16))")
                put(" protocol \(protocolName(m.id.proto))  SPI 0x\(String(m.id.spi, radix: 16))\n")
            }
        case .report?, .newAE?:
            // bodies XfrmBody cannot carry (xfrm_user_report, xfrm_aevent_id)
            break
        default:
            switch n.body {
            case .error, .done: return
            default: break
            }
            if n.type == NetlinkControlType.noop { return }
            let len = n.encode().count
            let lenText = String(len)
            put("Unknown message: \(String(repeating: "0", count: max(0, 8 - lenText.count)) + lenText) ")
            put("0x\(hex8(UInt32(n.type))) 0x\(hex8(UInt32(n.flags)))\n")
        }
    }

    /// print_sadinfo() for `state count`.
    mutating func sadInfo(_ n: XfrmMessage) {
        guard case .sadInfo(let count, let buckets, let maxBuckets) = n.body else {
            put("BAD SAD info returned\n")
            return
        }
        put("\t SAD")
        put(" count \(count)")
        if stats != 0 {
            put(" (buckets ")
            put("count \(signed(buckets))")
            put(" Max \(signed(maxBuckets))")
            put(")")
        }
        put("\n")
    }

    /// print_spdinfo() for `policy count`.
    mutating func spdInfo(_ n: XfrmMessage) {
        put("\t SPD")
        if case .spdInfo(let s) = n.body {
            put(" IN  \(signed(s.inCount))")
            put(" OUT \(signed(s.outCount))")
            put(" FWD \(signed(s.fwdCount))")
            if stats != 0 {
                put(" (Sock:")
                put(" IN \(signed(s.inSocketCount))")
                put(" OUT \(signed(s.outSocketCount))")
                put(" FWD \(signed(s.fwdSocketCount))")
                put(")")
            }
            put(sl)
        }
        if oneline { put("\n") }
    }
}
