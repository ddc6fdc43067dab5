// `ip xfrm state ...` (ip/xfrm_state.c): add, update, allocspi, delete, get, deleteall, list, flush, count.

import XFRMWire

struct StateCommand {
    let ctx: CLIContext
    let argv: [String]

    func run() throws(CommandError) -> String {
        // argv[0] is "state"; the sub-command, if any, is argv[1]
        guard self.argv.count > 1 else { return try listOrDeleteAll(start: 1, deleteAll: false) }
        let cmd = self.argv[1]
        if matches(cmd, "add") { return try modify(.newSA) }
        if matches(cmd, "update") { return try modify(.updSA) }
        if matches(cmd, "allocspi") { return try allocSPI() }
        if matches(cmd, "delete") { return try getOrDelete(delete: true) }
        if matches(cmd, "deleteall") || matches(cmd, "delall") { return try listOrDeleteAll(start: 2, deleteAll: true) }
        if matches(cmd, "list") || matches(cmd, "show") || matches(cmd, "lst") {
            return try listOrDeleteAll(start: 2, deleteAll: false)
        }
        if matches(cmd, "get") { return try getOrDelete(delete: false) }
        if matches(cmd, "flush") { return try flush() }
        if matches(cmd, "count") { return try count() }
        if matches(cmd, "help") { throw CommandError(stateUsage) }
        throw CommandError("Command \"\(cmd)\" is unknown, try \"ip xfrm state help\".")
    }

    private func parseSADir(_ word: String) throws(CommandError) -> UInt8 {
        switch word {
        case "in": return XfrmSADir.inbound
        case "out": return XfrmSADir.outbound
        default: throw .invalid("DIR value is not \"in\" or \"out\"", word)
        }
    }

    /// xfrm_state_flag_parse(): names, or one 0x value; the cursor ends on the last flag used.
    private func parseStateFlags(_ a: inout Args, _ flags: inout UInt8) throws(CommandError) {
        let w = a.current
        if w.utf8.count > 2 && w.hasPrefix("0x") {
            guard let v = getU8(w, base: 16) else { throw .invalid("FLAG value is invalid", w) }
            flags = v
            return
        }
        let names: [String: UInt8] = [
            "noecn": XfrmStateFlag.noECN, "decap-dscp": XfrmStateFlag.decapDSCP,
            "nopmtudisc": XfrmStateFlag.noPMTUDisc, "wildrecv": XfrmStateFlag.wildRecv, "icmp": XfrmStateFlag.icmp,
            "af-unspec": XfrmStateFlag.afUnspec, "align4": XfrmStateFlag.align4, "esn": XfrmStateFlag.esn,
        ]
        while true {
            guard let f = names[a.current] else {
                a.back()
                break
            }
            flags |= f
            if !a.nextOK { break }
            try a.next()
        }
    }

    private func parseExtraFlags(_ a: inout Args, _ flags: inout UInt32) throws(CommandError) {
        let w = a.current
        if w.utf8.count > 2 && w.hasPrefix("0x") {
            guard let v = getU32(w, base: 16) else { throw .invalid("\"EXTRA-FLAG\" is invalid", w) }
            flags = v
            return
        }
        let names: [String: UInt32] = [
            "dont-encap-dscp": XfrmStateExtraFlag.dontEncapDSCP, "oseq-may-wrap": XfrmStateExtraFlag.oseqMayWrap,
        ]
        while true {
            guard let f = names[a.current] else {
                a.back()
                break
            }
            flags |= f
            if !a.nextOK { break }
            try a.next()
        }
    }

    /// xfrm_algo_parse(): the key as 0x-hex (an odd digit count gets a leading zero) or as the string's bytes.
    private func parseKey(_ key: String) throws(CommandError) -> [UInt8] {
        let max = 512
        let b = Array(key.utf8)
        if b.count > 2 && key.hasPrefix("0x") {
            let p = Array(b[2...])
            let len = (p.count + 1) / 2
            if len > max { throw .invalid("ALGO-KEYMAT value makes buffer overflow", key) }
            var out: [UInt8] = []
            var i = -(p.count % 2)
            for _ in 0..<len {
                let pair = [i >= 0 ? p[i] : UInt8(ascii: "0"), p[i + 1]]
                guard let v = getU8(String(decoding: pair, as: UTF8.self), base: 16) else {
                    throw .invalid("ALGO-KEYMAT value is invalid", key)
                }
                out.append(v)
                i += 2
            }
            return out
        }
        if b.count > max { throw .invalid("ALGO-KEYMAT value makes buffer overflow", key) }
        return b
    }

    // MARK: add / update

    private func modify(_ type: XfrmMessageType) throws(CommandError) -> String {
        let ctx = self.ctx
        var info = XfrmUserSAInfo()
        info.family = ctx.preferredFamily
        info.lft = XfrmLifetimeCfg()  // byte and packet limits XFRM_INF, times 0
        var attrs: [XfrmAttribute] = []
        var ifindex: UInt32 = 0
        var dir: UInt8 = 0
        var isOffload = false, isPacketOffload = false
        var replayWindow: UInt32 = 0
        var seq: UInt32 = 0, oseq: UInt32 = 0, seqHi: UInt32 = 0, oseqHi: UInt32 = 0
        var idSeen = false
        var aeadSeen = false, encSeen = false, authSeen = false, compSeen = false
        var coaSeen = false, ctxSeen = false
        var extraFlags: UInt32 = 0
        var mark = XfrmMark(value: 0, mask: 0)
        var outputMark = XfrmMark(value: 0, mask: 0)
        var ifIDSet = false
        var pcpu: UInt32 = 0xffff_ffff
        var ifID: UInt32 = 0
        var tfcpad: UInt32 = 0

        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            let w = a.current
            switch w {
            case "mode":
                try a.next()
                info.mode = try ctx.parseMode(a.current)
            case "mark":
                mark = try ctx.parseMark(&a)
            case "reqid":
                try a.next()
                info.reqid = try ctx.parseReqid(a.current)
            case "seq":
                try a.next()
                // get_be32() into a host-order field: iproute2 stores the sequence number byte-swapped
                guard let v = getU32(a.current) else { throw .invalid("SEQ value is invalid", a.current) }
                info.seq = v.bigEndian
            case "replay-window", "replay-seq", "replay-seq-hi", "replay-oseq", "replay-oseq-hi":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("value after \"\(w)\" is invalid", a.current) }
                switch w {
                case "replay-window": replayWindow = v
                case "replay-seq": seq = v
                case "replay-seq-hi": seqHi = v
                case "replay-oseq": oseq = v
                default: oseqHi = v
                }
            case "flag":
                try a.next()
                try parseStateFlags(&a, &info.flags)
            case "extra-flag":
                try a.next()
                try parseExtraFlags(&a, &extraFlags)
            case "sel":
                try a.next()
                ctx.preferredFamily = AddressFamily.unspec
                try ctx.parseSelector(&a, &info.sel)
                ctx.preferredFamily = info.sel.family
            case "limit":
                try a.next()
                try ctx.parseLimit(&a, &info.lft)
            case "encap":
                var encap = XfrmEncapTmpl()
                try a.next()
                switch a.current {
                case "espinudp-nonike": encap.type = XfrmEncapType.espInUDPNonIKE
                case "espinudp": encap.type = XfrmEncapType.espInUDP
                case "espintcp": encap.type = XfrmEncapType.espInTCP
                default: throw .invalid("ENCAP-TYPE value is invalid", a.current)
                }
                try a.next()
                guard let sport = getU16(a.current) else {
                    throw .invalid("SPORT value after \"encap\" is invalid", a.current)
                }
                encap.sport = sport
                try a.next()
                guard let dport = getU16(a.current) else {
                    throw .invalid("DPORT value after \"encap\" is invalid", a.current)
                }
                encap.dport = dport
                try a.next()
                encap.oa = try getAddr(a.current, family: AddressFamily.unspec).address
                attrs.append(.encap(encap))
            case "coa":
                if coaSeen { throw .duplicate("coa", a.current) }
                coaSeen = true
                try a.next()
                let coa = try getPrefix(a.current, family: ctx.preferredFamily)
                if coa.family == AddressFamily.unspec {
                    throw .invalid("value after \"coa\" has an unrecognized address family", a.current)
                }
                attrs.append(.coAddress(coa.address))
            case "ctx":
                if ctxSeen { throw .duplicate("ctx", a.current) }
                ctxSeen = true
                try a.next()
                attrs.append(RawAttributes.securityContext(a.current))
            case "offload":
                try a.next()
                // no mode given means crypto, for backward compatibility
                if a.current == "crypto" {
                    try a.next()
                } else if a.current == "packet" {
                    isPacketOffload = true
                    try a.next()
                }
                if a.current == "dev" {
                    try a.next()
                    ifindex = ctx.ifindex(named: a.current)
                    if ifindex == 0 { throw .invalid("Invalid device name", a.current) }
                } else {
                    throw .invalid("Missing dev keyword", a.current)
                }
                try a.next()
                if a.current == "dir" {
                    try a.next()
                    dir = try parseSADir(a.current)
                } else {
                    throw .invalid("Missing DIR keyword", a.current)
                }
                isOffload = true
            case "output-mark":
                try a.next()
                guard let v = getU32(a.current) else {
                    throw .invalid("value after \"output-mark\" is invalid", a.current)
                }
                outputMark.value = v
                if a.argc > 1 {
                    try a.next()
                    if a.current == "mask" {
                        try a.next()
                        guard let m = getU32(a.current) else { throw .invalid("mask value is invalid", a.current) }
                        outputMark.mask = m
                    } else {
                        a.back()
                    }
                }
            case "if_id":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("value after \"if_id\" is invalid", a.current) }
                ifID = v
                ifIDSet = true
            case "tfcpad":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("value after \"tfcpad\" is invalid", a.current) }
                tfcpad = v
            case "dir":
                try a.next()
                dir = try parseSADir(a.current)
            case "pcpu-num":
                try a.next()
                guard let v = getU32(a.current) else {
                    throw .invalid("value after \"pcpu-num\" is invalid", a.current)
                }
                pcpu = v
            default:
                if let kind = AlgoKind.byName(w) {
                    switch kind {
                    case .aead:
                        if encSeen || authSeen || aeadSeen { throw .duplicate("ALGO-TYPE", w) }
                        aeadSeen = true
                    case .crypt:
                        if encSeen || aeadSeen { throw .duplicate("ALGO-TYPE", w) }
                        encSeen = true
                    case .auth, .authTrunc:
                        if authSeen || aeadSeen { throw .duplicate("ALGO-TYPE", w) }
                        authSeen = true
                    case .comp:
                        if compSeen { throw .duplicate("ALGO-TYPE", w) }
                        compSeen = true
                    }
                    if !a.nextOK { throw .missing("ALGO-NAME") }
                    try a.next()
                    let name = String(decoding: Array(a.current.utf8.prefix(63)), as: UTF8.self)
                    var key = ""
                    if kind != .comp {
                        if !a.nextOK { throw .missing("ALGO-KEYMAT") }
                        try a.next()
                        key = a.current
                    }
                    var length: UInt32 = 0
                    if kind == .aead {
                        if !a.nextOK { throw .missing("ALGO-ICV-LEN") }
                        try a.next()
                        guard let v = getU32(a.current) else { throw .invalid("ALGO-ICV-LEN value is invalid", a.current) }
                        length = v
                    } else if kind == .authTrunc {
                        if !a.nextOK { throw .missing("ALGO-TRUNC-LEN") }
                        try a.next()
                        guard let v = getU32(a.current) else {
                            throw .invalid("ALGO-TRUNC-LEN value is invalid", a.current)
                        }
                        length = v
                    }
                    let alg = XfrmAlgorithm(name: name, key: try parseKey(key), lengthBits: length)
                    switch kind {
                    case .aead: attrs.append(.algAEAD(alg))
                    case .crypt: attrs.append(.algCrypt(alg))
                    case .auth: attrs.append(.algAuth(alg))
                    case .authTrunc: attrs.append(.algAuthTrunc(alg))
                    case .comp: attrs.append(RawAttributes.compAlgorithm(alg))
                    }
                } else {
                    if idSeen { throw .invalid("unknown", w) }
                    idSeen = true
                    try ctx.parseID(&a, saddr: &info.saddr, id: &info.id, family: &info.family, loose: false)
                    if ctx.preferredFamily == AddressFamily.unspec { ctx.preferredFamily = info.family }
                }
            }
            a.advance()
        }

        if info.flags & XfrmStateFlag.esn != 0 && replayWindow == 0 && dir != XfrmSADir.outbound {
            throw CommandError("Error: esn flag set without replay-window.")
        }
        if replayWindow > 4096 {
            throw CommandError("Error: replay-window (\(replayWindow)) > XFRMA_REPLAY_ESN_MAX (4096).")
        }
        if isOffload {
            var flags: UInt8 = dir == XfrmSADir.inbound ? XfrmOffloadFlag.inbound : 0
            if isPacketOffload { flags |= XfrmOffloadFlag.packet }
            attrs.append(.offloadDevice(XfrmUserOffload(ifindex: Int32(bitPattern: ifindex), flags: flags)))
        }
        if info.flags & XfrmStateFlag.esn != 0 || replayWindow > 32 {
            var esn = XfrmReplayStateESN()
            esn.seq = seq
            esn.oseq = oseq
            esn.seqHi = seqHi
            esn.oseqHi = oseqHi
            esn.replayWindow = replayWindow
            // bmp_len words; iproute2 sends only the 24-byte head (the kernel accepts both), the codec needs the words
            esn.bitmap = [UInt32](repeating: 0, count: Int((replayWindow + 31) / 32))
            attrs.append(.replayESN(esn))
        } else {
            if seq != 0 || oseq != 0 {
                var r = XfrmReplayState()
                r.seq = seq
                r.oseq = oseq
                attrs.append(.replay(r))
            }
            info.replayWindow = UInt8(truncatingIfNeeded: replayWindow)
        }
        if extraFlags != 0 { attrs.append(.extraFlags(extraFlags)) }
        if !idSeen { throw CommandError("Not enough information: ID is required") }
        if mark.mask != 0 { attrs.append(.mark(mark)) }
        if ifIDSet { attrs.append(.ifID(ifID)) }
        if tfcpad != 0 { attrs.append(.tfcPad(tfcpad)) }

        let proto = info.id.proto
        let pname = xfrmProtoName(proto)
        if isIPsecProto(proto) {
            switch info.mode {
            case 0, 1: break
            case 4 where proto == XfrmProto.esp: break
            default: throw CommandError("MODE value is invalid with XFRM-PROTO value \"\(pname)\"")
            }
            switch proto {
            case XfrmProto.esp:
                if compSeen {
                    throw CommandError("ALGO-TYPE value \"comp\" is invalid with XFRM-PROTO value \"\(pname)\"")
                }
                if !encSeen && !aeadSeen {
                    throw CommandError(
                        "ALGO-TYPE value \"enc\" or \"aead\" is required with XFRM-PROTO value \"\(pname)\"")
                }
            case XfrmProto.ah:
                if encSeen || aeadSeen || compSeen {
                    throw CommandError(
                        "ALGO-TYPE values \"enc\", \"aead\", and \"comp\" are invalid with XFRM-PROTO value \"\(pname)\"")
                }
                if !authSeen {
                    throw CommandError(
                        "ALGO-TYPE value \"auth\" or \"auth-trunc\" is required with XFRM-PROTO value \"\(pname)\"")
                }
            default:
                if encSeen || authSeen || aeadSeen {
                    throw CommandError(
                        "ALGO-TYPE values \"enc\", \"auth\", \"auth-trunc\", and \"aead\" are invalid with XFRM-PROTO value \"\(pname)\"")
                }
                if !compSeen {
                    throw CommandError("ALGO-TYPE value \"comp\" is required with XFRM-PROTO value \"\(pname)\"")
                }
            }
        } else if encSeen || authSeen || aeadSeen || compSeen {
            throw CommandError("ALGO is invalid with XFRM-PROTO value \"\(pname)\"")
        }
        if isROProto(proto) {
            switch info.mode {
            case 2, 3: break
            case 0: throw CommandError("\"mode\" is required with XFRM-PROTO value \"\(pname)\"")
            default: throw CommandError("MODE value is invalid with XFRM-PROTO value \"\(pname)\"")
            }
            if !coaSeen { throw CommandError("\"coa\" is required with XFRM-PROTO value \"\(pname)\"") }
        } else if coaSeen {
            throw CommandError("\"coa\" is invalid with XFRM-PROTO value \"\(pname)\"")
        }
        if outputMark.value != 0 { attrs.append(RawAttributes.u32(RawAttr.outputMark, outputMark.value)) }
        if outputMark.mask != 0 { attrs.append(RawAttributes.u32(RawAttr.setMarkMask, outputMark.mask)) }
        if dir != 0 { attrs.append(.saDir(dir)) }
        if pcpu != 0xffff_ffff { attrs.append(.saPCPU(pcpu)) }
        if info.family == AddressFamily.unspec { info.family = AddressFamily.inet }

        try ctx.talk(XfrmMessage(type, flags: NetlinkFlags.request, body: .saInfo(info), attributes: attrs))
        return ""
    }

    // MARK: allocspi

    private func allocSPI() throws(CommandError) -> String {
        let ctx = self.ctx
        var spi = XfrmUserSPIInfo()
        spi.info.family = ctx.preferredFamily
        // unlike add, allocspi leaves the lifetime all zero
        spi.info.lft.softByteLimit = 0
        spi.info.lft.hardByteLimit = 0
        spi.info.lft.softPacketLimit = 0
        spi.info.lft.hardPacketLimit = 0
        var idSeen = false, minSeen = false, maxSeen = false
        var mark = XfrmMark(value: 0, mask: 0)
        var pcpu: UInt32 = 0xffff_ffff
        var dir: UInt8 = 0

        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            let w = a.current
            switch w {
            case "mode":
                try a.next()
                spi.info.mode = try ctx.parseMode(a.current)
            case "mark":
                mark = try ctx.parseMark(&a)
            case "reqid":
                try a.next()
                spi.info.reqid = try ctx.parseReqid(a.current)
            case "seq":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("SEQ value is invalid", a.current) }
                spi.info.seq = v.bigEndian
            case "min", "max":
                if (w == "min" && minSeen) || (w == "max" && maxSeen) { throw .duplicate(w, a.current) }
                if w == "min" { minSeen = true } else { maxSeen = true }
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("value after \"\(w)\" is invalid", a.current) }
                if w == "min" { spi.min = v } else { spi.max = v }
            case "dir":
                try a.next()
                dir = try parseSADir(a.current)
            case "pcpu-num":
                try a.next()
                guard let v = getU32(a.current) else {
                    throw .invalid("value after \"pcpu-num\" is invalid", a.current)
                }
                pcpu = v
            default:
                if idSeen { throw .invalid("unknown", w) }
                idSeen = true
                try ctx.parseID(&a, saddr: &spi.info.saddr, id: &spi.info.id, family: &spi.info.family, loose: false)
                if spi.info.id.spi != 0 { throw CommandError("\"spi\" is invalid") }
                if ctx.preferredFamily == AddressFamily.unspec { ctx.preferredFamily = spi.info.family }
            }
            a.advance()
        }
        if !idSeen { throw CommandError("Not enough information: ID is required") }
        if minSeen {
            if !maxSeen { throw CommandError("\"max\" is missing") }
            if spi.min > spi.max { throw CommandError("value after \"min\" is larger than value after \"max\"") }
        } else {
            if maxSeen { throw CommandError("\"min\" is missing") }
            // PF_KEY's defaults; an IPComp CPI has 16 bits
            spi.min = 0x100
            spi.max = 0x0fff_ffff
            if spi.info.id.proto == XfrmProto.comp { spi.max = 0xffff }
        }
        var attrs: [XfrmAttribute] = []
        if dir != 0 { attrs.append(.saDir(dir)) }
        if mark.mask & mark.value != 0 { attrs.append(.mark(mark)) }
        if pcpu != 0xffff_ffff { attrs.append(.saPCPU(pcpu)) }
        if spi.info.family == AddressFamily.unspec { spi.info.family = AddressFamily.inet }

        let request = XfrmMessage(.allocSPI, flags: NetlinkFlags.request, body: .spiInfo(spi), attributes: attrs)
        guard let answer = try ctx.talkAnswer(request) else { return "" }
        var p = ctx.printer()
        p.statePrint(answer, nokeys: false, filter: nil)
        return p.out
    }

    // MARK: get / delete

    private func getOrDelete(delete: Bool) throws(CommandError) -> String {
        let ctx = self.ctx
        var said = XfrmUserSAID()
        said.family = ctx.preferredFamily
        var attrs: [XfrmAttribute] = []
        var idSeen = false
        var mark = XfrmMark(value: 0, mask: 0)

        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            if a.current == "mark" {
                mark = try ctx.parseMark(&a)
            } else {
                if idSeen { throw .invalid("unknown", a.current) }
                idSeen = true
                var id = XfrmID()
                var saddr = XfrmAddress()
                try ctx.parseID(&a, saddr: &saddr, id: &id, family: &said.family, loose: false)
                said.daddr = id.daddr
                said.spi = id.spi
                said.proto = id.proto
                attrs.append(RawAttributes.sourceAddress(saddr))
            }
            a.advance()
        }
        if mark.mask & mark.value != 0 { attrs.append(.mark(mark)) }
        if said.family == AddressFamily.unspec { said.family = AddressFamily.inet }

        let request = XfrmMessage(delete ? .delSA : .getSA, flags: NetlinkFlags.request, body: .saID(said),
                                  attributes: attrs)
        if delete {
            try ctx.talk(request)
            return ""
        }
        guard let answer = try ctx.talkAnswer(request) else { return "" }
        var p = ctx.printer()
        p.statePrint(answer, nokeys: false, filter: nil)
        return p.out
    }

    // MARK: list / deleteall

    private func listOrDeleteAll(start: Int, deleteAll: Bool) throws(CommandError) -> String {
        let ctx = self.ctx
        if self.argv.count > start || ctx.preferredFamily != AddressFamily.unspec { ctx.filter.use = true }
        ctx.filter.xsinfo.family = ctx.preferredFamily
        var nokeys = false
        var idSeen = false

        var a = Args(self.argv, start: start)
        while a.argc > 0 {
            let w = a.current
            if w == "nokeys" {
                nokeys = true
            } else if w == "mode" {
                try a.next()
                ctx.filter.xsinfo.mode = try ctx.parseMode(a.current)
                ctx.filter.modeMask = 0xff
            } else if w == "reqid" {
                try a.next()
                ctx.filter.xsinfo.reqid = try ctx.parseReqid(a.current)
                ctx.filter.reqidMask = 0xffff_ffff
            } else if w == "flag" {
                try a.next()
                try parseStateFlags(&a, &ctx.filter.xsinfo.flags)
                ctx.filter.stateFlagsMask = 0xff
            } else {
                if idSeen { throw .invalid("unknown", w) }
                idSeen = true
                var f = ctx.filter.xsinfo
                try ctx.parseID(&a, saddr: &f.saddr, id: &f.id, family: &f.family, loose: true)
                ctx.filter.xsinfo.saddr = f.saddr
                ctx.filter.xsinfo.id = f.id
                ctx.filter.xsinfo.family = f.family
                if ctx.preferredFamily == AddressFamily.unspec { ctx.preferredFamily = f.family }
            }
            a.advance()
        }

        let dumpRequest = XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty)
        if deleteAll {
            var previous: [XfrmMessage]? = nil
            while true {
                var deletes: [XfrmMessage] = []
                for n in try ctx.dump(dumpRequest, terminated: "Delete-all terminated") {
                    guard n.messageType == .newSA, case .saInfo(let s) = n.body else { continue }  // "Not a state"
                    if !ctx.filter.matchState(s) { continue }
                    if s.id.proto == IPProto.ipip || s.id.proto == IPProto.ipv6 { continue }
                    var said = XfrmUserSAID()
                    said.family = s.family
                    said.daddr = s.id.daddr
                    said.spi = s.id.spi
                    said.proto = s.id.proto
                    var attrs = [RawAttributes.sourceAddress(s.saddr)]
                    if case .mark(let m)? = AttrTable(n.attributes)[.mark] { attrs.append(.mark(m)) }
                    // NLM_F_ACK: iproute2 sends the deletes unacknowledged and peeks for errors; here each
                    // request is answered (a kernel transport would otherwise wait for a reply to a success).
                    deletes.append(XfrmMessage(.delSA, flags: NetlinkFlags.request | NetlinkFlags.ack, body: .saID(said),
                                               attributes: attrs))
                }
                if deletes.isEmpty { break }
                // iproute2 would dump again forever; a transport that acks deletes it keeps stops the loop here
                if deletes == previous { throw CommandError("Delete-all terminated") }
                previous = deletes
                var firstError: Int32 = 0
                for d in deletes {
                    for r in ctx.transport.request(d) {
                        if case .error(let e, _) = r.body, e != 0, firstError == 0 { firstError = e }
                    }
                }
                if firstError != 0 {
                    throw CommandError("Failed to send delete-all request: \(errnoText(-firstError))")
                }
            }
            return ""
        }

        var attrs: [XfrmAttribute] = []
        let f = ctx.filter
        if f.xsinfo.id.proto != 0 { attrs.append(.proto(f.xsinfo.id.proto)) }
        attrs.append(RawAttributes.addressFilter(saddr: f.xsinfo.saddr, daddr: f.xsinfo.id.daddr, family: f.xsinfo.family,
                                                 splen: f.idSrcMask, dplen: f.idDstMask))
        var request = dumpRequest
        request.attributes = attrs
        let (messages, failure) = ctx.dumpEntries(request)
        var p = ctx.printer()
        for n in messages { p.statePrint(n, nokeys: nokeys, filter: f) }
        if var failure {
            failure.output = p.out
            throw failure
        }
        return p.out
    }

    // MARK: flush / count

    private func flush() throws(CommandError) -> String {
        var proto: UInt8 = 0
        var protoSeen = false
        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            if a.current == "proto" {
                if protoSeen { throw .duplicate("proto", a.current) }
                protoSeen = true
                try a.next()
                guard let p = xfrmProtoByName(a.current) else { throw .invalid("XFRM-PROTO value is invalid", a.current) }
                proto = p
            } else {
                throw .invalid("unknown", a.current)
            }
            a.advance()
        }
        try ctx.talk(XfrmMessage(.flushSA, flags: NetlinkFlags.request, body: .flushSA(proto: proto)))
        return ""
    }

    private func count() throws(CommandError) -> String {
        // iproute2 sends a u32 of 0xffffffff here; XfrmBody spells a body-less info request `.empty`
        guard let answer = try ctx.talkAnswer(XfrmMessage(.getSADInfo, flags: NetlinkFlags.request, body: .infoRequest(flags: 0xffff_ffff)))
        else { return "" }
        var p = ctx.printer()
        p.sadInfo(answer)
        return p.out
    }
}

let stateUsage = """
    Usage: ip xfrm state { add | update } ID [ ALGO-LIST ] [ mode MODE ]
            [ mark MARK [ mask MASK ] ] [ reqid REQID ] [ dir DIR ] [ seq SEQ ]
            [ replay-window SIZE ] [ replay-seq SEQ ] [ replay-oseq SEQ ]
            [ replay-seq-hi SEQ ] [ replay-oseq-hi SEQ ]
            [ flag FLAG-LIST ] [ sel SELECTOR ] [ LIMIT-LIST ] [ encap ENCAP ]
            [ coa ADDR[/PLEN] ] [ ctx CTX ] [ extra-flag EXTRA-FLAG-LIST ]
            [ offload [ crypto | packet ] dev DEV dir DIR ]
            [ output-mark OUTPUT-MARK [ mask MASK ] ]
            [ if_id IF_ID ] [ tfcpad LENGTH ] [ pcpu-num CPUNUM ]
    Usage: ip xfrm state allocspi ID [ mode MODE ] [ mark MARK [ mask MASK ] ]
            [ reqid REQID ] [ dir DIR ] [ seq SEQ ] [ min SPI max SPI ] [ pcpu-num CPUNUM ]
    Usage: ip xfrm state { delete | get } ID [ mark MARK [ mask MASK ] ]
    Usage: ip xfrm state deleteall [ ID ] [ mode MODE ] [ reqid REQID ]
            [ flag FLAG-LIST ]
    Usage: ip xfrm state list [ nokeys ] [ ID ] [ mode MODE ] [ reqid REQID ]
            [ flag FLAG-LIST ]
    Usage: ip xfrm state flush [ proto XFRM-PROTO ]
    Usage: ip xfrm state count
    """
