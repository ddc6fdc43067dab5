// `ip xfrm policy ...` (ip/xfrm_policy.c): add, update, delete, get, deleteall, list, flush, count, setdefault,
// getdefault.

import XFRMWire

struct PolicyCommand {
    let ctx: CLIContext
    let argv: [String]

    func run() throws(CommandError) -> String {
        guard self.argv.count > 1 else { return try listOrDeleteAll(start: 1, deleteAll: false) }
        let cmd = self.argv[1]
        if matches(cmd, "add") { return try modify(.newPolicy) }
        if matches(cmd, "update") { return try modify(.updPolicy) }
        if matches(cmd, "delete") { return try getOrDelete(delete: true) }
        if matches(cmd, "deleteall") || matches(cmd, "delall") { return try listOrDeleteAll(start: 2, deleteAll: true) }
        if matches(cmd, "list") || matches(cmd, "show") || matches(cmd, "lst") {
            return try listOrDeleteAll(start: 2, deleteAll: false)
        }
        if matches(cmd, "get") { return try getOrDelete(delete: false) }
        if matches(cmd, "flush") { return try flush() }
        if matches(cmd, "count") { return try count() }
        if matches(cmd, "set") {
            throw CommandError(
                "Error: \"ip xfrm policy set\" (hash thresholds) is not supported: the wire codec cannot carry XFRMA_SPD_IPV4_HTHRESH/XFRMA_SPD_IPV6_HTHRESH.")
        }
        if matches(cmd, "setdefault") { return try setDefault() }
        if matches(cmd, "getdefault") { return try getDefault() }
        if matches(cmd, "help") { throw CommandError(policyUsage) }
        throw CommandError("Command \"\(cmd)\" is unknown, try \"ip xfrm policy help\".")
    }

    private func parseDir(_ word: String) throws(CommandError) -> UInt8 {
        switch word {
        case "in": return XfrmPolicyDir.inbound.rawValue
        case "out": return XfrmPolicyDir.outbound.rawValue
        case "fwd": return XfrmPolicyDir.forward.rawValue
        default: throw .invalid("DIR value is invalid", word)
        }
    }

    private func parsePtype(_ word: String) throws(CommandError) -> UInt8 {
        switch word {
        case "main": return 0
        case "sub": return 1
        default: throw .invalid("PTYPE value is invalid", word)
        }
    }

    private func parseAction(_ word: String) throws(CommandError) -> UInt8 {
        switch word {
        case "allow": return XfrmPolicyAction.allow
        case "block": return XfrmPolicyAction.block
        default: throw .invalid("ACTION value is invalid", word)
        }
    }

    /// xfrm_policy_flag_parse().
    private func parseFlags(_ a: inout Args, _ flags: inout UInt8) throws(CommandError) {
        let w = a.current
        if w.utf8.count > 2 && w.hasPrefix("0x") {
            guard let v = getU8(w, base: 16) else { throw .invalid("FLAG value is invalid", w) }
            flags = v
            return
        }
        while true {
            if a.current == "localok" {
                flags |= XfrmPolicyFlag.localOK
            } else if a.current == "icmp" {
                flags |= XfrmPolicyFlag.icmp
            } else {
                a.back()
                break
            }
            if !a.nextOK { break }
            try a.next()
        }
    }

    /// xfrm_tmpl_parse(): `ID [mode MODE] [reqid REQID] [level LEVEL]`.
    private func parseTemplate(_ a: inout Args, _ t: inout XfrmUserTmpl) throws(CommandError) {
        let start = a.argc
        var idSeen = false
        while true {
            let w = a.current
            if w == "mode" {
                try a.next()
                t.mode = try ctx.parseMode(a.current)
            } else if w == "reqid" {
                try a.next()
                t.reqid = try ctx.parseReqid(a.current)
            } else if w == "level" {
                try a.next()
                switch a.current {
                case "required": t.optional = 0
                case "use": t.optional = 1
                default: throw .invalid("LEVEL value is invalid", a.current)
                }
            } else {
                if idSeen {
                    a.back()
                    break
                }
                idSeen = true
                ctx.preferredFamily = AddressFamily.unspec
                try ctx.parseID(&a, saddr: &t.saddr, id: &t.id, family: &t.family, loose: false)
                ctx.preferredFamily = t.family
            }
            if !a.nextOK { break }
            try a.next()
        }
        if a.argc == start { throw .missing("TMPL") }
    }

    // MARK: add / update

    private func modify(_ type: XfrmMessageType) throws(CommandError) -> String {
        let ctx = self.ctx
        var info = XfrmUserPolicyInfo()
        info.sel.family = ctx.preferredFamily
        var dirSeen = false, selSeen = false, ptypeSeen = false, ctxSeen = false
        var ptype: UInt8 = 0
        var tmpls: [XfrmUserTmpl] = []
        var mark = XfrmMark(value: 0, mask: 0)
        var secCtx = ""
        var ifIDSet = false
        var ifID: UInt32 = 0
        var ifindex: UInt32 = 0
        var isOffload = false

        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            let w = a.current
            switch w {
            case "dir":
                if dirSeen { throw .duplicate("dir", a.current) }
                dirSeen = true
                try a.next()
                info.dir = try parseDir(a.current)
            case "ctx":
                if ctxSeen { throw .duplicate("ctx", a.current) }
                ctxSeen = true
                try a.next()
                secCtx = a.current
            case "mark":
                mark = try ctx.parseMark(&a)
            case "index":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("INDEX value is invalid", a.current) }
                info.index = v
            case "ptype":
                if ptypeSeen { throw .duplicate("ptype", a.current) }
                ptypeSeen = true
                try a.next()
                ptype = try parsePtype(a.current)
            case "action":
                try a.next()
                info.action = try parseAction(a.current)
            case "priority":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("PRIORITY value is invalid", a.current) }
                info.priority = v
            case "flag":
                try a.next()
                try parseFlags(&a, &info.flags)
            case "limit":
                try a.next()
                try ctx.parseLimit(&a, &info.lft)
            case "tmpl":
                // XFRM_TMPLS_BUF_SIZE (1024) holds 16 templates
                if (tmpls.count + 1) * XfrmUserTmpl.size > 1024 { throw CommandError("Too many tmpls: buffer overflow") }
                var t = XfrmUserTmpl()
                t.family = ctx.preferredFamily
                try a.next()
                try parseTemplate(&a, &t)
                tmpls.append(t)
            case "if_id":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("IF_ID value is invalid", a.current) }
                ifID = v
                ifIDSet = true
            case "offload":
                try a.next()
                if a.current == "packet" {
                    try a.next()
                } else {
                    throw .invalid("Invalid offload mode", a.current)
                }
                if a.current == "dev" {
                    try a.next()
                    ifindex = ctx.ifindex(named: a.current)
                    if ifindex == 0 { throw .invalid("Invalid device name", a.current) }
                } else {
                    throw .invalid("Missing dev keyword", a.current)
                }
                isOffload = true
            default:
                if selSeen { throw .duplicate("unknown", w) }
                selSeen = true
                try ctx.parseSelector(&a, &info.sel)
                if ctx.preferredFamily == AddressFamily.unspec { ctx.preferredFamily = info.sel.family }
            }
            a.advance()
        }
        if !dirSeen { throw CommandError("Not enough information: DIR is required.") }

        var attrs: [XfrmAttribute] = []
        if ptypeSeen { attrs.append(.policyType(ptype)) }
        if !tmpls.isEmpty { attrs.append(.templates(tmpls)) }
        if mark.mask != 0 { attrs.append(.mark(mark)) }
        if ctxSeen { attrs.append(RawAttributes.securityContext(secCtx)) }
        if ifIDSet { attrs.append(.ifID(ifID)) }
        if isOffload {
            attrs.append(.offloadDevice(XfrmUserOffload(ifindex: Int32(bitPattern: ifindex), flags: XfrmOffloadFlag.packet)))
        }
        if info.sel.family == AddressFamily.unspec { info.sel.family = AddressFamily.inet }
        try ctx.talk(XfrmMessage(type, flags: NetlinkFlags.request, body: .policyInfo(info), attributes: attrs))
        return ""
    }

    // MARK: get / delete

    private func getOrDelete(delete: Bool) throws(CommandError) -> String {
        let ctx = self.ctx
        var pid = XfrmUserPolicyID()
        var dirSeen = false, selSeen = false, indexSeen = false, ptypeSeen = false, ctxSeen = false
        var ptype: UInt8 = 0
        var mark = XfrmMark(value: 0, mask: 0)
        var secCtx = ""
        var ifIDSet = false
        var ifID: UInt32 = 0

        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            let w = a.current
            switch w {
            case "dir":
                if dirSeen { throw .duplicate("dir", a.current) }
                dirSeen = true
                try a.next()
                pid.dir = try parseDir(a.current)
            case "ctx":
                if ctxSeen { throw .duplicate("ctx", a.current) }
                ctxSeen = true
                try a.next()
                secCtx = a.current
            case "mark":
                mark = try ctx.parseMark(&a)
            case "index":
                if indexSeen { throw .duplicate("index", a.current) }
                indexSeen = true
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("INDEX value is invalid", a.current) }
                pid.index = v
            case "ptype":
                if ptypeSeen { throw .duplicate("ptype", a.current) }
                ptypeSeen = true
                try a.next()
                ptype = try parsePtype(a.current)
            case "if_id":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("IF_ID value is invalid", a.current) }
                ifID = v
                ifIDSet = true
            default:
                if selSeen { throw .invalid("unknown", w) }
                selSeen = true
                try ctx.parseSelector(&a, &pid.sel)
                if ctx.preferredFamily == AddressFamily.unspec { ctx.preferredFamily = pid.sel.family }
            }
            a.advance()
        }
        if !dirSeen { throw CommandError("Not enough information: DIR is required.") }
        var attrs: [XfrmAttribute] = []
        if ptypeSeen { attrs.append(.policyType(ptype)) }
        if !selSeen && !indexSeen {
            throw CommandError("Not enough information: either SELECTOR or INDEX is required.")
        }
        if selSeen && indexSeen { throw .duplicateOrGarbage("SELECTOR", "INDEX") }
        if pid.sel.family == AddressFamily.unspec { pid.sel.family = AddressFamily.inet }
        if mark.mask & mark.value != 0 { attrs.append(.mark(mark)) }
        if ctxSeen { attrs.append(RawAttributes.securityContext(secCtx)) }
        if ifIDSet { attrs.append(.ifID(ifID)) }

        let request = XfrmMessage(delete ? .delPolicy : .getPolicy, flags: NetlinkFlags.request, body: .policyID(pid),
                                  attributes: attrs)
        if delete {
            try ctx.talk(request)
            return ""
        }
        guard let answer = try ctx.talkAnswer(request) else { return "" }
        var p = ctx.printer()
        p.policyPrint(answer, filter: nil)
        return p.out
    }

    // MARK: list / deleteall

    private func listOrDeleteAll(start: Int, deleteAll: Bool) throws(CommandError) -> String {
        let ctx = self.ctx
        if self.argv.count > start || ctx.preferredFamily != AddressFamily.unspec { ctx.filter.use = true }
        ctx.filter.xpinfo.sel.family = ctx.preferredFamily
        var selSeen = false

        var a = Args(self.argv, start: start)
        while a.argc > 0 {
            let w = a.current
            switch w {
            case "dir":
                try a.next()
                ctx.filter.xpinfo.dir = try parseDir(a.current)
                ctx.filter.dirMask = 0xff
            case "index":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("INDEX value is invalid", a.current) }
                ctx.filter.xpinfo.index = v
                ctx.filter.indexMask = 0xffff_ffff
            case "ptype":
                try a.next()
                ctx.filter.ptype = try parsePtype(a.current)
                ctx.filter.ptypeMask = 0xff
            case "action":
                try a.next()
                ctx.filter.xpinfo.action = try parseAction(a.current)
                ctx.filter.actionMask = 0xff
            case "priority":
                try a.next()
                guard let v = getU32(a.current) else { throw .invalid("PRIORITY value is invalid", a.current) }
                ctx.filter.xpinfo.priority = v
                ctx.filter.priorityMask = 0xffff_ffff
            case "flag":
                try a.next()
                try parseFlags(&a, &ctx.filter.xpinfo.flags)
                ctx.filter.policyFlagsMask = 0xff
            case "nosock":
                ctx.filter.filterSocket = true
            default:
                if selSeen { throw .invalid("unknown", w) }
                selSeen = true
                var sel = ctx.filter.xpinfo.sel
                try ctx.parseSelector(&a, &sel)
                ctx.filter.xpinfo.sel = sel
                if ctx.preferredFamily == AddressFamily.unspec { ctx.preferredFamily = sel.family }
            }
            a.advance()
        }

        let dumpRequest = XfrmMessage(.getPolicy, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty)
        if deleteAll {
            var previous: [XfrmMessage]? = nil
            while true {
                var deletes: [XfrmMessage] = []
                for n in try ctx.dump(dumpRequest, terminated: "Delete-all terminated") {
                    guard n.messageType == .newPolicy, case .policyInfo(let p) = n.body else { continue }
                    let tb = AttrTable(n.attributes)
                    var ptype: UInt8 = 0
                    if case .policyType(let t)? = tb[.policyType] { ptype = t }
                    if !ctx.filter.matchPolicy(p, ptype: ptype) { continue }
                    if p.dir >= 3 { continue }  // socket policies cannot be deleted
                    var pid = XfrmUserPolicyID()
                    pid.sel = p.sel
                    pid.dir = p.dir
                    pid.index = p.index
                    var attrs: [XfrmAttribute] = []
                    if case .mark(let m)? = tb[.mark] { attrs.append(.mark(m)) }
                    if case .ifID(let v)? = tb[.ifID] { attrs.append(.ifID(v)) }
                    // NLM_F_ACK: iproute2 sends the deletes unacknowledged and peeks for errors; here each
                    // request is answered (a kernel transport would otherwise wait for a reply to a success).
                    deletes.append(XfrmMessage(.delPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .policyID(pid), attributes: attrs))
                }
                if deletes.isEmpty { break }
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
        let (messages, failure) = ctx.dumpEntries(dumpRequest)
        var p = ctx.printer()
        for n in messages { p.policyPrint(n, filter: ctx.filter) }
        if var failure {
            failure.output = p.out
            throw failure
        }
        return p.out
    }

    // MARK: flush / count / defaults

    private func flush() throws(CommandError) -> String {
        var ptypeSeen = false
        var ptype: UInt8 = 0
        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            if a.current == "ptype" {
                if ptypeSeen { throw .duplicate("ptype", a.current) }
                ptypeSeen = true
                try a.next()
                ptype = try parsePtype(a.current)
            } else {
                throw .invalid("unknown", a.current)
            }
            a.advance()
        }
        let attrs: [XfrmAttribute] = ptypeSeen ? [.policyType(ptype)] : []
        try ctx.talk(XfrmMessage(.flushPolicy, flags: NetlinkFlags.request, body: .flushPolicy, attributes: attrs))
        return ""
    }

    private func count() throws(CommandError) -> String {
        guard let answer = try ctx.talkAnswer(XfrmMessage(.getSPDInfo, flags: NetlinkFlags.request, body: .infoRequest(flags: 0xffff_ffff)))
        else { return "" }
        var p = ctx.printer()
        p.spdInfo(answer)
        return p.out
    }

    private func setDefault() throws(CommandError) -> String {
        var inbound: UInt8 = 0, forward: UInt8 = 0, outbound: UInt8 = 0
        func action(_ word: String) -> UInt8? {
            switch word {
            case "block": XfrmPolicyDefault.block
            case "accept", "allow": XfrmPolicyDefault.accept
            default: nil
            }
        }
        var a = Args(self.argv, start: 2)
        while a.argc > 0 {
            let w = a.current
            switch w {
            case "in", "fwd", "out":
                let current = w == "in" ? inbound : w == "fwd" ? forward : outbound
                if current != 0 { throw .duplicate(w, a.current) }
                try a.next()
                guard let v = action(a.current) else { throw .invalid("\(w) policy value is invalid", a.current) }
                switch w {
                case "in": inbound = v
                case "fwd": forward = v
                default: outbound = v
                }
            default:
                throw .invalid("unknown direction", w)
            }
            a.advance()
        }
        try ctx.talk(XfrmMessage(.setDefault, flags: NetlinkFlags.request,
                                 body: .policyDefault(inbound: inbound, forward: forward, outbound: outbound)))
        return ""
    }

    private func getDefault() throws(CommandError) -> String {
        // a zeroed struct xfrm_userpolicy_default, as iproute2 sends
        let request = XfrmMessage(.getDefault, flags: NetlinkFlags.request,
                                  body: .policyDefault(inbound: 0, forward: 0, outbound: 0))
        guard let answer = try ctx.talkAnswer(request) else { return "" }
        guard case .policyDefault(let i, let f, let o) = answer.body else {
            return ""  // "BUG: short nlmsg len ... for XFRM_MSG_GETDEFAULT" goes to stderr
        }
        var p = ctx.printer()
        p.policyDefaults(inbound: i, forward: f, outbound: o)
        return p.out
    }
}

let policyUsage = """
    Usage: ip xfrm policy { add | update } SELECTOR dir DIR [ ctx CTX ]
    \t[ mark MARK [ mask MASK ] ] [ index INDEX ] [ ptype PTYPE ]
    \t[ action ACTION ] [ priority PRIORITY ] [ flag FLAG-LIST ]
    \t[ if_id IF_ID ] [ LIMIT-LIST ] [ TMPL-LIST ]
    \t[ offload packet dev DEV] } ]
    Usage: ip xfrm policy { delete | get } { SELECTOR | index INDEX } dir DIR
    \t[ ctx CTX ] [ mark MARK [ mask MASK ] ] [ ptype PTYPE ]
    \t[ if_id IF_ID ]
    Usage: ip xfrm policy { deleteall | list } [ nosock ] [ SELECTOR ] [ dir DIR ]
    \t[ index INDEX ] [ ptype PTYPE ] [ action ACTION ] [ priority PRIORITY ]
    \t[ flag FLAG-LIST ]
    Usage: ip xfrm policy flush [ ptype PTYPE ]
    Usage: ip xfrm policy count
    Usage: ip xfrm policy set [ hthresh4 LBITS RBITS ] [ hthresh6 LBITS RBITS ]
    Usage: ip xfrm policy setdefault DIR ACTION [ DIR ACTION ] [ DIR ACTION ]
    Usage: ip xfrm policy getdefault
    """
