import Testing
import XFRMWire
@testable import XFRMCommandLine

/// The request flags iproute2 sends for a command it wants an ACK for (rtnl_talk without an answer).
let ackFlags = NetlinkFlags.request | NetlinkFlags.ack

@Suite("ip xfrm commands: requests sent")
struct CommandTests {
    func run(_ line: String, _ t: any XfrmTransport, stats: Int = 0) throws(CommandError) -> String {
        try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(stats: stats),
                           transport: t, interfaces: Interfaces())
    }

    @Test("state add: the usersa_info iproute2 fills in and its attributes in iproute2's order")
    func stateAdd() throws {
        let t = RecordingTransport()
        let out = try run(
            "state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1000 reqid 1 mode tunnel replay-window 64 flag esn "
                + "auth-trunc hmac(sha256) 0x\(authHex) 128 enc cbc(aes) 0x\(encHex) "
                + "sel src 10.0.1.0/24 dst 10.0.2.0/24 limit time-hard 3600 limit byte-soft 1000 "
                + "encap espinudp 4500 4501 0.0.0.0 mark 7 mask 0xff if_id 9 tfcpad 100 extra-flag dont-encap-dscp "
                + "offload packet dev eth4 dir in seq 1", t)
        #expect(out == "")
        #expect(t.requests.count == 1)
        var info = saInfo(src: "10.0.0.1", dst: "10.0.0.2", spi: 0x1000, reqid: 1, mode: 1)
        info.flags = XfrmStateFlag.esn
        info.sel = selector(src: "10.0.1.0", 24, dst: "10.0.2.0", 24)
        info.lft.hardAddExpiresSeconds = 3600
        info.lft.softByteLimit = 1000
        info.seq = 0x0100_0000  // iproute2 parses seq with get_be32 into a host-order field
        var encap = XfrmEncapTmpl()
        encap.type = XfrmEncapType.espInUDP
        encap.sport = 4500
        encap.dport = 4501
        var esn = XfrmReplayStateESN()
        esn.replayWindow = 64
        esn.bitmap = [0, 0]
        let expected = XfrmMessage(.newSA, flags: ackFlags, body: .saInfo(info), attributes: [
            .algAuthTrunc(XfrmAlgorithm(name: "hmac(sha256)", key: authKey, lengthBits: 128)),
            .algCrypt(XfrmAlgorithm(name: "cbc(aes)", key: encKey)),
            .encap(encap),
            .offloadDevice(XfrmUserOffload(ifindex: 5, flags: XfrmOffloadFlag.inbound | XfrmOffloadFlag.packet)),
            .replayESN(esn),
            .extraFlags(XfrmStateExtraFlag.dontEncapDSCP),
            .mark(XfrmMark(value: 7, mask: 0xff)),
            .ifID(9),
            .tfcPad(100),
            .saDir(XfrmSADir.inbound),
        ])
        #expect(t.requests.first == expected)
    }

    @Test("state update: UPDSA; a small window is the legacy field, replay-seq sends REPLAY_VAL; string keys")
    func stateUpdate() throws {
        let t = RecordingTransport()
        _ = try run("state update dst 10.0.0.2 proto ah spi 5 auth hmac(md5) secretsecret16by replay-window 32 "
                        + "replay-oseq 9 mark 3 output-mark 0x20 mask 0xf0 pcpu-num 1 dir out offload dev eth0 dir out",
                    t)
        var info = saInfo(src: "0.0.0.0", dst: "10.0.0.2", spi: 5, proto: XfrmProto.ah)
        info.replayWindow = 32
        var r = XfrmReplayState()
        r.oseq = 9
        let expected = XfrmMessage(.updSA, flags: ackFlags, body: .saInfo(info), attributes: [
            .algAuth(XfrmAlgorithm(name: "hmac(md5)", key: Array("secretsecret16by".utf8))),
            .offloadDevice(XfrmUserOffload(ifindex: 2, flags: 0)),
            .replay(r),
            .mark(XfrmMark(value: 3, mask: 0xffff_ffff)),
            .unknown(type: 29, payload: [0x20, 0, 0, 0]),
            .unknown(type: 30, payload: [0xf0, 0, 0, 0]),
            .saDir(XfrmSADir.outbound),
            .saPCPU(1),
        ])
        #expect(t.requests == [expected])
    }

    @Test("state add: comp with a CPI, odd-length hex keys get a leading zero, aead, IPv6, coa for route2")
    func stateAddVariants() throws {
        let t = RecordingTransport()
        _ = try run("state add src 10.0.0.1 dst 10.0.0.2 proto comp spi 0x4000 comp deflate", t)
        var comp = WireWriter()
        XfrmAlgorithm(name: "deflate", key: []).encode(&comp, withLength: false)
        #expect(t.requests.last?.attributes == [.unknown(type: 3, payload: comp.bytes)])

        _ = try run("state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 7 aead rfc4106(gcm(aes)) 0x123 64", t)
        guard case .saInfo(let s)? = t.requests.last?.body else { Issue.record("no SA"); return }
        #expect(s.family == AddressFamily.inet6)
        #expect(s.saddr == v6("2001:db8::1"))
        #expect(t.requests.last?.attributes
            == [.algAEAD(XfrmAlgorithm(name: "rfc4106(gcm(aes))", key: [0x01, 0x23], lengthBits: 64))])

        _ = try run("state add src 10.0.0.1 dst 10.0.0.2 proto route2 mode ro coa 192.0.2.7", t)
        #expect(t.requests.last?.attributes == [.coAddress(v4("192.0.2.7"))])
    }

    @Test("allocspi: PF_KEY's default range, IPComp's 16-bit range, the answer printed")
    func allocSPI() throws {
        let t = RecordingTransport { req in
            guard case .spiInfo(let s) = req.body else { return [ack] }
            var info = s.info
            info.id.spi = 0x1234
            return [XfrmMessage(.newSA, flags: 0, body: .saInfo(info))]
        }
        let out = try run("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp reqid 5 mode tunnel dir in", t)
        #expect(out == "src 10.0.0.1 dst 10.0.0.2\n\tproto esp spi 0x00001234 reqid 5 mode tunnel\n\treplay-window 0 \n")
        var spi = XfrmUserSPIInfo()
        spi.info = saInfo(src: "10.0.0.1", dst: "10.0.0.2", spi: 0, reqid: 5, mode: 1)
        spi.info.lft = XfrmLifetimeCfg()
        spi.info.lft.softByteLimit = 0
        spi.info.lft.hardByteLimit = 0
        spi.info.lft.softPacketLimit = 0
        spi.info.lft.hardPacketLimit = 0
        spi.min = 0x100
        spi.max = 0x0fff_ffff
        #expect(t.requests == [XfrmMessage(.allocSPI, flags: NetlinkFlags.request, body: .spiInfo(spi),
                                           attributes: [.saDir(XfrmSADir.inbound)])])
        _ = try run("state allocspi src 10.0.0.1 dst 10.0.0.2 proto comp", t)
        guard case .spiInfo(let c)? = t.requests.last?.body else { return }
        #expect(c.min == 0x100 && c.max == 0xffff)
        _ = try run("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp min 0x200 max 0x300 mark 1", t)
        guard case .spiInfo(let m)? = t.requests.last?.body else { return }
        #expect(m.min == 0x200 && m.max == 0x300)
        #expect(t.requests.last?.attributes == [.mark(XfrmMark(value: 1, mask: 0xffff_ffff))])
    }

    @Test("state get/delete: usersa_id, SRCADDR, MARK only when value & mask; get prints the reply")
    func stateGetDelete() throws {
        let t = RecordingTransport { req in req.messageType == .getSA ? [basicSA()] : [ack] }
        let out = try run("state get src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1000 mark 5", t)
        #expect(out == formatState(basicSA(), options: XfrmCLIOptions()))
        var id = XfrmUserSAID()
        id.daddr = v4("10.0.0.2")
        id.spi = 0x1000
        id.family = AddressFamily.inet
        id.proto = XfrmProto.esp
        #expect(t.requests.last == XfrmMessage(.getSA, flags: NetlinkFlags.request, body: .saID(id), attributes: [
            .unknown(type: 13, payload: v4("10.0.0.1").bytes), .mark(XfrmMark(value: 5, mask: 0xffff_ffff)),
        ]))
        _ = try run("state delete dst 10.0.0.2 proto esp spi 0x1000 mark 5 mask 0", t)
        #expect(t.requests.last == XfrmMessage(.delSA, flags: ackFlags, body: .saID(id), attributes: [
            .unknown(type: 13, payload: XfrmAddress().bytes),
        ]))
    }

    @Test("state flush and count; -s count adds the hash buckets")
    func stateFlushCount() throws {
        let t = RecordingTransport { req in
            req.messageType == .getSADInfo
                ? [XfrmMessage(.newSADInfo, flags: 0, body: .sadInfo(count: 3, buckets: 8, maxBuckets: 1_048_576))]
                : [ack]
        }
        #expect(try run("state flush", t) == "")
        #expect(try run("state flush proto ah", t) == "")
        #expect(t.requests.map(\.body) == [.flushSA(proto: 0), .flushSA(proto: XfrmProto.ah)])
        #expect(t.requests.allSatisfy { $0.flags == ackFlags && $0.messageType == .flushSA })
        #expect(try run("state count", t) == "\t SAD count 3\n")
        #expect(try run("state count", t, stats: 1) == "\t SAD count 3 (buckets count 8 Max 1048576)\n")
        #expect(t.requests.last == XfrmMessage(.getSADInfo, flags: NetlinkFlags.request, body: .infoRequest(flags: 0xffff_ffff)))
    }

    @Test("policy add: selector, dir, ptype, templates (family carried over), mark, if_id, packet offload")
    func policyAdd() throws {
        let t = RecordingTransport()
        _ = try run("policy add src 10.0.1.0/24 dst 10.0.2.0/24 proto tcp dport 443 dir out priority 10 ptype main "
                        + "mark 1 action allow flag localok limit packet-hard 5 "
                        + "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel level use tmpl proto ah "
                        + "offload packet dev eth0 if_id 3 index 8", t)
        var p = XfrmUserPolicyInfo()
        p.sel = selector(src: "10.0.1.0", 24, dst: "10.0.2.0", 24, proto: IPProto.tcp)
        p.sel.dport = 443
        p.sel.dportMask = 0xffff
        p.dir = 1
        p.priority = 10
        p.flags = XfrmPolicyFlag.localOK
        p.lft.hardPacketLimit = 5
        p.index = 8
        var t1 = template(src: "192.0.2.1", dst: "192.0.2.2", reqid: 1, mode: 1)
        t1.optional = 1
        var t2 = XfrmUserTmpl()
        t2.family = AddressFamily.inet
        t2.id.proto = XfrmProto.ah
        let expected = XfrmMessage(.newPolicy, flags: ackFlags, body: .policyInfo(p), attributes: [
            .policyType(0),
            .templates([t1, t2]),
            .mark(XfrmMark(value: 1, mask: 0xffff_ffff)),
            .ifID(3),
            .offloadDevice(XfrmUserOffload(ifindex: 2, flags: XfrmOffloadFlag.packet)),
        ])
        #expect(t.requests == [expected])

        _ = try run("policy update dir in action block", t)
        var b = XfrmUserPolicyInfo()
        b.sel.family = AddressFamily.inet
        b.action = XfrmPolicyAction.block
        #expect(t.requests.last == XfrmMessage(.updPolicy, flags: ackFlags, body: .policyInfo(b)))
    }

    @Test("policy get/delete by selector or index; get prints the reply")
    func policyGetDelete() throws {
        let t = RecordingTransport { req in req.messageType == .getPolicy ? [basicPolicy()] : [ack] }
        let out = try run("policy get src 10.0.1.0/24 dst 10.0.2.0/24 dir out", t)
        #expect(out == formatPolicy(basicPolicy(), options: XfrmCLIOptions()))
        var pid = XfrmUserPolicyID()
        pid.sel = selector(src: "10.0.1.0", 24, dst: "10.0.2.0", 24)
        pid.dir = 1
        #expect(t.requests.last == XfrmMessage(.getPolicy, flags: NetlinkFlags.request, body: .policyID(pid)))
        _ = try run("policy delete index 25 dir fwd mark 2 ptype sub if_id 4", t)
        var byIndex = XfrmUserPolicyID()
        byIndex.sel.family = AddressFamily.inet
        byIndex.index = 25
        byIndex.dir = 2
        #expect(t.requests.last == XfrmMessage(.delPolicy, flags: ackFlags, body: .policyID(byIndex), attributes: [
            .policyType(1), .mark(XfrmMark(value: 2, mask: 0xffff_ffff)), .ifID(4),
        ]))
    }

    @Test("policy flush, count, setdefault, getdefault")
    func policyMisc() throws {
        var spd = XfrmSPDInfo()
        spd.inCount = 1
        spd.outCount = 2
        spd.outSocketCount = 1
        let t = RecordingTransport { req in
            switch req.messageType {
            case .getSPDInfo?: [XfrmMessage(.newSPDInfo, flags: 0, body: .spdInfo(spd))]
            case .getDefault?:
                [XfrmMessage(.getDefault, flags: 0, body: .policyDefault(inbound: 1, forward: 2, outbound: 0))]
            default: [ack]
            }
        }
        _ = try run("policy flush", t)
        _ = try run("policy flush ptype main", t)
        #expect(t.requests == [
            XfrmMessage(.flushPolicy, flags: ackFlags, body: .flushPolicy),
            XfrmMessage(.flushPolicy, flags: ackFlags, body: .flushPolicy, attributes: [.policyType(0)]),
        ])
        #expect(try run("policy count", t) == "\t SPD IN  1 OUT 2 FWD 0\n")
        #expect(try run("policy count", t, stats: 1) == "\t SPD IN  1 OUT 2 FWD 0 (Sock: IN 0 OUT 1 FWD 0)\n")
        #expect(t.requests.last == XfrmMessage(.getSPDInfo, flags: NetlinkFlags.request, body: .infoRequest(flags: 0xffff_ffff)))

        _ = try run("policy setdefault in block out accept fwd allow", t)
        #expect(t.requests.last == XfrmMessage(.setDefault, flags: ackFlags,
                                               body: .policyDefault(inbound: 1, forward: 2, outbound: 2)))
        _ = try run("policy setdefault out block", t)
        #expect(t.requests.last?.body == .policyDefault(inbound: 0, forward: 0, outbound: 1))
        #expect(try run("policy getdefault", t) == "Default policies:\n in:  block\n fwd: accept\n out: unspec\n")
        #expect(t.requests.last == XfrmMessage(.getDefault, flags: NetlinkFlags.request,
                                               body: .policyDefault(inbound: 0, forward: 0, outbound: 0)))
    }

    @Test("keywords are matched by prefix where iproute2 uses matches(): sa, pol, lst, d, upd, tun")
    func prefixes() throws {
        let t = RecordingTransport()
        _ = try run("sa upd src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc cbc(aes) 0x00 mode tun", t)
        guard case .saInfo(let s)? = t.requests.last?.body else { Issue.record("no SA"); return }
        #expect(t.requests.last?.messageType == .updSA)
        #expect(s.mode == 1)
        _ = try run("pol d dir in index 1", t)
        #expect(t.requests.last?.messageType == .delPolicy)
    }

    // MARK: list / deleteall against a canned dump

    func kernel() -> FakeKernel {
        var a = saInfo(src: "10.0.0.1", dst: "10.0.0.2", spi: 1, reqid: 1)
        a.sel.family = AddressFamily.inet
        var b = saInfo(src: "10.0.0.1", dst: "10.0.9.9", spi: 2, proto: XfrmProto.ah, reqid: 1, mode: 1)
        b.flags = XfrmStateFlag.noECN
        let c = saInfo(src: "2001:db8::1", dst: "2001:db8::2", spi: 3, reqid: 2)
        let key = XfrmAlgorithm(name: "cbc(aes)", key: [1, 2])
        let states = [
            XfrmMessage(.newSA, flags: 0, body: .saInfo(a), attributes: [.algCrypt(key)]),
            XfrmMessage(.newSA, flags: 0, body: .saInfo(b), attributes: [.mark(XfrmMark(value: 4, mask: 0xf))]),
            XfrmMessage(.newSA, flags: 0, body: .saInfo(c), attributes: [.algCrypt(key)]),
        ]
        var sock = XfrmUserPolicyInfo()
        sock.sel.family = AddressFamily.inet
        sock.dir = 3
        sock.index = 99
        var inPol = XfrmUserPolicyInfo()
        inPol.sel = selector(src: "10.0.2.0", 24, dst: "10.0.1.0", 24)
        inPol.dir = 0
        inPol.index = 40
        inPol.action = XfrmPolicyAction.block
        let policies = [
            basicPolicy(index: 25),
            XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(inPol), attributes: [.ifID(6)]),
            XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(sock)),
        ]
        return FakeKernel(states: states, policies: policies)
    }

    @Test("state list: every SA in dump order; filters by ID prefix, proto, mode, reqid, flag; nokeys")
    func stateList() throws {
        let k = kernel()
        let all = try run("state list", k)
        #expect(all == k.states.map { formatState($0, options: XfrmCLIOptions()) }.joined())
        var filter = WireWriter()
        filter.raw(XfrmAddress().bytes)
        filter.raw(XfrmAddress().bytes)
        filter.u32(0)
        #expect(k.requests.last == XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty,
                                               attributes: [.unknown(type: 26, payload: filter.bytes)]))
        #expect(try run("state", k) == all)

        let s = k.states
        #expect(try run("state list dst 10.0.0.0/24", k) == formatState(s[0], options: XfrmCLIOptions()))
        #expect(try run("state list proto ah", k) == formatState(s[1], options: XfrmCLIOptions()))
        #expect(k.requests.last?.attributes.first == .proto(XfrmProto.ah))
        #expect(try run("state list mode tunnel", k) == formatState(s[1], options: XfrmCLIOptions()))
        #expect(try run("state list reqid 2", k) == formatState(s[2], options: XfrmCLIOptions()))
        #expect(try run("state list flag noecn", k) == formatState(s[1], options: XfrmCLIOptions()))
        #expect(try run("state list src 2001:db8::/32", k) == formatState(s[2], options: XfrmCLIOptions()))
        #expect(try run("state list nokeys spi 1", k) == formatState(s[0], options: XfrmCLIOptions(), nokeys: true))
        #expect(k.states.count == 3)
    }

    @Test("state deleteall: dump, DELSA for each match (SRCADDR, MARK), dump again until none match")
    func stateDeleteAll() throws {
        let k = kernel()
        #expect(try run("state deleteall reqid 1", k) == "")
        #expect(k.states.count == 1)
        let kinds = k.requests.map { $0.messageType }
        #expect(kinds == [.getSA, .delSA, .delSA, .getSA])
        var id = XfrmUserSAID()
        id.daddr = v4("10.0.9.9")
        id.spi = 2
        id.family = AddressFamily.inet
        id.proto = XfrmProto.ah
        // Each DELSA asks for an answer (NLM_F_ACK): a kernel answers a success only then.
        #expect(k.requests[2] == XfrmMessage(.delSA, flags: NetlinkFlags.request | NetlinkFlags.ack, body: .saID(id),
                                             attributes: [
            .unknown(type: 13, payload: v4("10.0.0.1").bytes), .mark(XfrmMark(value: 4, mask: 0xf)),
        ]))
        #expect(k.requests[0] == XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty))
        #expect(try run("state deleteall", k) == "")
        #expect(k.states.isEmpty)
    }

    @Test("policy list filters (dir, index, action, selector prefix, nosock); deleteall skips socket policies")
    func policyListDeleteAll() throws {
        let k = kernel()
        let p = k.policies
        let all = try run("policy list", k)
        #expect(all == p.map { formatPolicy($0, options: XfrmCLIOptions()) }.joined())
        #expect(all.contains("\tsocket in priority 0 \n"))
        #expect(k.requests.last == XfrmMessage(.getPolicy, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty))
        #expect(try run("policy list dir out", k) == formatPolicy(p[0], options: XfrmCLIOptions()))
        #expect(try run("policy list action block", k) == formatPolicy(p[1], options: XfrmCLIOptions()))
        #expect(try run("policy list index 40", k) == formatPolicy(p[1], options: XfrmCLIOptions()))
        #expect(try run("policy list src 10.0.0.0/16", k) == p[0...1].map { formatPolicy($0, options: XfrmCLIOptions()) }.joined())
        #expect(try run("policy list nosock", k) == p[0...1].map { formatPolicy($0, options: XfrmCLIOptions()) }.joined())

        #expect(try run("policy deleteall dir in", k) == "")
        #expect(k.policies.count == 2)
        guard case .policyInfo(let inPol) = p[1].body else { return }
        var pid = XfrmUserPolicyID()
        pid.sel = inPol.sel
        pid.dir = 0
        pid.index = 40
        #expect(k.requests.suffix(3).map(\.messageType) == [.getPolicy, .delPolicy, .getPolicy])
        #expect(k.requests.suffix(2).first == XfrmMessage(.delPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                                          body: .policyID(pid), attributes: [.ifID(6)]))
        #expect(try run("policy deleteall", k) == "")
        #expect(k.policies.count == 1)  // the socket policy stays
    }

    @Test("a dump the kernel ends with -errno in NLMSG_DONE fails as rtnl_dump_done reports it, then \"Dump terminated\" (or \"Delete-all terminated\"), exit 1")
    func dumpEndedByError() throws {
        func ending(_ errno: Int32, _ text: String = "") -> RecordingTransport {
            RecordingTransport { _ in
                [XfrmMessage(type: NetlinkControlType.done, flags: NetlinkFlags.multi,
                             body: .done(status: -errno, message: text))]
            }
        }
        #expect(throws: CommandError("Error: Attribute failed policy validation.\nDump terminated")) {
            try run("state list", ending(Errno.ERANGE, "Attribute failed policy validation"))
        }
        #expect(throws: CommandError("RTNETLINK answers: Invalid argument\nDump terminated")) {
            try run("state list", ending(Errno.EINVAL))
        }
        #expect(throws: CommandError("Dump terminated")) { try run("policy list", ending(Errno.ENOENT)) }
        #expect(throws: CommandError("Error: Buffer too small for object.\nDump terminated")) {
            try run("state list", ending(Errno.EMSGSIZE))
        }
        #expect(throws: CommandError("RTNETLINK answers: Cannot allocate memory\nDelete-all terminated")) {
            try run("state deleteall", ending(Errno.ENOMEM))
        }
        do {
            _ = try run("state list", ending(Errno.EINVAL))
            Issue.record("the dump did not fail")
        } catch {
            #expect(error.exitStatus == 1)
        }
        // A DONE with status 0 ends a dump normally.
        #expect(try run("state list", RecordingTransport { _ in [done] }) == "")
        // The entries before the failure are printed (the error carries them), as iproute2 prints each on arrival.
        let listed = try run("state list", RecordingTransport { _ in [basicSA(), done] })
        #expect(!listed.isEmpty)
        let partial = RecordingTransport { _ in
            [basicSA(), XfrmMessage(type: NetlinkControlType.done, flags: NetlinkFlags.multi,
                                    body: .done(status: -Errno.EINVAL, message: ""))]
        }
        do {
            _ = try run("state list", partial)
            Issue.record("the dump did not fail")
        } catch {
            #expect(error.output == listed)
        }
    }

    @Test("kernel errors: strerror without extack, the extack with a period otherwise")
    func kernelErrors() {
        let exists = RecordingTransport { _ in [errorReply(Errno.EEXIST)] }
        #expect(throws: CommandError("RTNETLINK answers: File exists")) {
            try run("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc cbc(aes) 0x00", exists)
        }
        let extack = RecordingTransport { _ in [errorReply(Errno.EINVAL, "Replay window should be 0 for output SA")] }
        #expect(throws: CommandError("Error: Replay window should be 0 for output SA.")) {
            try run("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc cbc(aes) 0x00 replay-window 32 dir out",
                    extack)
        }
        let dotted = RecordingTransport { _ in [errorReply(Errno.EINVAL, "Device is down.")] }
        #expect(throws: CommandError("Error: Device is down.")) { try run("policy flush", dotted) }
        let missing = RecordingTransport { _ in [errorReply(Errno.ESRCH)] }
        #expect(throws: CommandError("RTNETLINK answers: No such process")) {
            try run("state get dst 10.0.0.2 proto esp spi 1", missing)
        }
        let dumpFail = RecordingTransport { _ in [errorReply(Errno.ENOMEM)] }
        #expect(throws: CommandError("RTNETLINK answers: Cannot allocate memory\nDump terminated")) {
            try run("policy list", dumpFail)
        }
        let perm = RecordingTransport { _ in [errorReply(1)] }
        #expect(throws: CommandError("RTNETLINK answers: Operation not permitted")) { try run("state flush", perm) }
    }

    @Test("deleteall reports a failed delete as iproute2 does")
    func deleteAllFailure() {
        let k = kernel()
        let failing = RecordingTransport { req in
            req.messageType == .delSA ? [errorReply(Errno.EPROTONOSUPPORT)] : k.request(req)
        }
        #expect(throws: CommandError("Failed to send delete-all request: Protocol not supported")) {
            try run("state deleteall", failing)
        }
    }
}
