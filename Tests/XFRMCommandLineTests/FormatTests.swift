import Testing
import XFRMWire
@testable import XFRMCommandLine

// Expected text is written out by hand from iproute2's printers (ipxfrm.c xfrm_state_info_print,
// xfrm_policy_info_print, xfrm_xfrma_print, xfrm_selector_print, xfrm_lifetime_print; xfrm_monitor.c).

@Suite("ip xfrm output format")
struct FormatTests {
    let plain = XfrmCLIOptions()
    let stats = XfrmCLIOptions(stats: 1)

    // MARK: states

    @Test("an ESP SA prints auth-trunc (not auth), enc, the legacy replay context and the selector")
    func basicState() {
        _ = UTC.set
        let expected = """
            src 10.0.0.1 dst 10.0.0.2
            \tproto esp spi 0x00001000 reqid 1 mode transport
            \treplay-window 32 
            \tauth-trunc hmac(sha256) 0x\(authHex) 128
            \tenc cbc(aes) 0x\(encHex)
            \tanti-replay context: seq 0x3, oseq 0x5, bitmap 0x00000007
            \tsel src 0.0.0.0/0 dst 0.0.0.0/0 

            """
        #expect(formatState(basicSA(), options: plain) == expected)
    }

    @Test("-s adds spi/reqid numbers, seq, flag mask, key bits, uid, lifetimes and stats")
    func basicStateStats() {
        _ = UTC.set
        let expected = """
            src 10.0.0.1 dst 10.0.0.2
            \tproto esp spi 0x00001000(4096) reqid 1(0x00000001) mode transport
            \treplay-window 32 seq 0x00000000 flag  (0x00000000)
            \tauth-trunc hmac(sha256) 0x\(authHex) (256 bits) 128
            \tenc cbc(aes) 0x\(encHex) (128 bits)
            \tanti-replay context: seq 0x3, oseq 0x5, bitmap 0x00000007
            \tsel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
            \tlifetime config:
            \t  limit: soft (INF)(bytes), hard (INF)(bytes)
            \t  limit: soft (INF)(packets), hard (INF)(packets)
            \t  expire add: soft 0(sec), hard 0(sec)
            \t  expire use: soft 0(sec), hard 0(sec)
            \tlifetime current:
            \t  0(bytes), 0(packets)
            \t  add 2024-05-01 10:00:00 use -
            \tstats:
            \t  replay-window 0 replay 0 failed 0

            """
        #expect(formatState(basicSA(), options: stats) == expected)
    }

    @Test("nokeys hides keys, -s then prints no bit counts")
    func nokeys() {
        let expected = """
            src 10.0.0.1 dst 10.0.0.2
            \tproto esp spi 0x00001000 reqid 1 mode transport
            \treplay-window 32 
            \tauth-trunc hmac(sha256) <<Keys hidden>> 128
            \tenc cbc(aes) <<Keys hidden>>
            \tanti-replay context: seq 0x3, oseq 0x5, bitmap 0x00000007
            \tsel src 0.0.0.0/0 dst 0.0.0.0/0 

            """
        #expect(formatState(basicSA(), options: plain, nokeys: true) == expected)
    }

    @Test("-oneline joins an entry's lines with backslashes and ends it with one newline")
    func oneline() {
        let expected = "src 10.0.0.1 dst 10.0.0.2\\\tproto esp spi 0x00001000 reqid 1 mode transport\\"
            + "\treplay-window 32 \\\tauth-trunc hmac(sha256) 0x\(authHex) 128\\\tenc cbc(aes) 0x\(encHex)\\"
            + "\tanti-replay context: seq 0x3, oseq 0x5, bitmap 0x00000007\\\tsel src 0.0.0.0/0 dst 0.0.0.0/0 \\\n"
        #expect(formatState(basicSA(), options: XfrmCLIOptions(oneline: true)) == expected)
    }

    /// An IPv6 tunnel SA with everything the attribute printer knows, in the order iproute2 prints them.
    func richSA() -> XfrmMessage {
        var s = saInfo(src: "2001:db8::1", dst: "2001:db8::2", spi: 0xc0ffee, reqid: 16, mode: 1)
        s.flags = XfrmStateFlag.noECN | XfrmStateFlag.esn
        s.curlft.addTime = may1
        s.curlft.useTime = may1 + 60
        s.curlft.bytes = 1500
        s.curlft.packets = 1
        s.lft.hardAddExpiresSeconds = 3600
        s.lft.softByteLimit = 1_000_000
        s.stats.replay = 2
        s.stats.integrityFailed = 1
        var esn = XfrmReplayStateESN()
        esn.oseq = 0x10
        esn.seq = 0x20
        esn.oseqHi = 1
        esn.seqHi = 2
        esn.replayWindow = 128
        esn.bitmap = [1, 2, 3, 4]
        var encap = XfrmEncapTmpl()
        encap.type = XfrmEncapType.espInUDP
        // attributes in the kernel's order (copy_to_user_state_extra); printing reorders them
        return XfrmMessage(.newSA, flags: 0, body: .saInfo(s), attributes: [
            .extraFlags(XfrmStateExtraFlag.dontEncapDSCP),
            .lastUsed(may1 + 60),
            .algAEAD(XfrmAlgorithm(name: "rfc4106(gcm(aes))", key: [UInt8](repeating: 0x11, count: 20), lengthBits: 128)),
            .encap(encap),
            .tfcPad(1500),
            .mark(XfrmMark(value: 0x10, mask: 0xff)),
            .unknown(type: 29, payload: [5, 0, 0, 0]),
            .unknown(type: 30, payload: [0xf, 0, 0, 0]),
            .replayESN(esn),
            .offloadDevice(XfrmUserOffload(ifindex: 5, flags: XfrmOffloadFlag.inbound | XfrmOffloadFlag.packet)),
            .ifID(42),
            .saDir(XfrmSADir.inbound),
            .unknown(type: 35, payload: [3, 0, 0, 0]),
        ])
    }

    @Test("mark/output-mark, aead, encap, lastused, ESN block, offload with dir and mode, if_id, tfcpad, dir, pcpu-num")
    func richState() {
        _ = UTC.set
        let expected = """
            src 2001:db8::1 dst 2001:db8::2
            \tproto esp spi 0x00c0ffee reqid 16 mode tunnel
            \treplay-window 0 flag noecn esn
            \tmark 0x10/0xff output-mark 0x5/0xf
            \taead rfc4106(gcm(aes)) 0x1111111111111111111111111111111111111111 128
            \tencap type espinudp sport 4500 dport 4500 addr ::
            \tlastused 2024-05-01 10:01:00
            \tanti-replay esn context:
            \t seq-hi 0x2, seq 0x20, oseq-hi 0x1, oseq 0x10
            \t replay_window 128, bitmap-length 4
            \t 00000004 00000003 00000002 00000001 
            \tcrypto offload parameters: dev eth4 dir in mode packet
            \tif_id 0x2a
            \ttfcpad 1500
            \tdir in
            \tpcpu-num 3

            """
        #expect(formatState(richSA(), options: plain, interfaces: Interfaces()) == expected)
    }

    @Test("-s prints extra flags glued to the flag list, as iproute2 does, and the full lifetime block")
    func richStateStats() {
        _ = UTC.set
        let expected = """
            src 2001:db8::1 dst 2001:db8::2
            \tproto esp spi 0x00c0ffee(12648430) reqid 16(0x00000010) mode tunnel
            \treplay-window 0 seq 0x00000000 flag noecn esnextra_flag dont-encap-dscp (0x10000001)
            \tmark 0x10/0xff output-mark 0x5/0xf
            \taead rfc4106(gcm(aes)) 0x1111111111111111111111111111111111111111 (160 bits) 128
            \tencap type espinudp sport 4500 dport 4500 addr ::
            \tlastused 2024-05-01 10:01:00
            \tanti-replay esn context:
            \t seq-hi 0x2, seq 0x20, oseq-hi 0x1, oseq 0x10
            \t replay_window 128, bitmap-length 4
            \t 00000004 00000003 00000002 00000001 
            \tcrypto offload parameters: dev eth4 dir in mode packet
            \tif_id 0x2a
            \ttfcpad 1500
            \tdir in
            \tpcpu-num 3
            \tlifetime config:
            \t  limit: soft 1000000(bytes), hard (INF)(bytes)
            \t  limit: soft (INF)(packets), hard (INF)(packets)
            \t  expire add: soft 0(sec), hard 3600(sec)
            \t  expire use: soft 0(sec), hard 0(sec)
            \tlifetime current:
            \t  1500(bytes), 1(packets)
            \t  add 2024-05-01 10:00:00 use 2024-05-01 10:01:00
            \tstats:
            \t  replay-window 0 replay 2 failed 1

            """
        #expect(formatState(richSA(), options: stats, interfaces: Interfaces()) == expected)
    }

    @Test("an ESN bitmap wraps after eight words, highest word first; crypto offload out; unknown ifindex is ifN")
    func esnWrapAndCryptoOffload() {
        var s = saInfo(src: "10.0.0.1", dst: "10.0.0.2", spi: 1, reqid: 0)
        s.flags = XfrmStateFlag.esn
        var esn = XfrmReplayStateESN()
        esn.replayWindow = 288
        esn.bitmap = Array(1...9)
        let m = XfrmMessage(.newSA, flags: 0, body: .saInfo(s), attributes: [
            .algCrypt(XfrmAlgorithm(name: "ecb(cipher_null)", key: [])),
            .replayESN(esn),
            .offloadDevice(XfrmUserOffload(ifindex: 9, flags: 0)),
            .saDir(XfrmSADir.outbound),
        ])
        let expected = """
            src 10.0.0.1 dst 10.0.0.2
            \tproto esp spi 0x00000001 reqid 0 mode transport
            \treplay-window 0 flag esn
            \tenc ecb(cipher_null) 
            \tanti-replay esn context:
            \t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x0
            \t replay_window 288, bitmap-length 9
            \t 00000009 00000008 00000007 00000006 00000005 00000004 00000003 00000002 
            \t 00000001 
            \tcrypto offload parameters: dev if9 dir out mode crypto
            \tdir out

            """
        #expect(formatState(m, options: plain) == expected)
    }

    @Test("comp, coa, a ro-protocol SA without SPI, ports in the selector, a security context")
    func compCoaAndContext() {
        var s = saInfo(src: "10.0.0.1", dst: "10.0.0.2", spi: 0, proto: IPProto.routing, mode: 2)
        s.sel = selector(src: "10.0.0.1", 32, dst: "10.0.0.2", 32, proto: IPProto.udp)
        s.sel.dport = 53
        s.sel.dportMask = 0xffff
        var comp = WireWriter()
        XfrmAlgorithm(name: "deflate", key: []).encode(&comp, withLength: false)
        var ctx = WireWriter()
        ctx.u16(8 + 7)
        ctx.u16(8)
        ctx.u8(1)
        ctx.u8(1)
        ctx.u16(7)
        ctx.raw(Array("system\0".utf8))
        let m = XfrmMessage(.newSA, flags: 0, body: .saInfo(s), attributes: [
            .unknown(type: 3, payload: comp.bytes),
            .coAddress(v4("192.0.2.9")),
            .unknown(type: 8, payload: ctx.bytes),
        ])
        let expected = """
            src 10.0.0.1 dst 10.0.0.2
            \tproto route2 reqid 0 mode ro
            \treplay-window 0 
            \tcomp deflate 
            \tcoa 192.0.2.9
            \tsel src 10.0.0.1/32 dst 10.0.0.2/32 proto udp dport 53 
            \tsecurity context system 

            """
        #expect(formatState(m, options: plain) == expected)
    }

    @Test("Updated, Deleted (SA from XFRMA_SA) and Expired (with hard) prefixes")
    func statePrefixes() {
        guard case .saInfo(let s) = basicSA().body else { return }
        let body = formatState(basicSA(), options: plain)
        var upd = basicSA()
        upd.type = XfrmMessageType.updSA.rawValue
        #expect(formatState(upd, options: plain) == "Updated " + body)

        var id = XfrmUserSAID()
        id.daddr = s.id.daddr
        id.spi = s.id.spi
        id.family = s.family
        id.proto = s.id.proto
        let del = XfrmMessage(.delSA, flags: 0, body: .saID(id), attributes: basicSA().attributes + [.sa(s)])
        #expect(formatMonitorEvent(del, options: plain) == "Deleted " + body)

        let exp = XfrmMessage(.expire, flags: 0, body: .expire(s, hard: true), attributes: basicSA().attributes)
        #expect(formatMonitorEvent(exp, options: plain) == "Expired " + body + "\thard 1\n")
    }

    // MARK: policies

    @Test("a policy: selector, dir/priority line, template")
    func basicPolicyPrint() {
        let expected = """
            src 10.0.1.0/24 dst 10.0.2.0/24 
            \tdir out priority 100 
            \ttmpl src 192.0.2.1 dst 192.0.2.2
            \t\tproto esp reqid 1 mode tunnel

            """
        #expect(formatPolicy(basicPolicy(), options: plain) == expected)
    }

    @Test("-s policy: uid, action allow, index, share, flag mask, lifetimes, template level/share/masks")
    func basicPolicyStats() {
        _ = UTC.set
        let expected = """
            src 10.0.1.0/24 dst 10.0.2.0/24 uid 0
            \tdir out action allow index 25 priority 100 share any flag  (0x00000000)
            \tlifetime config:
            \t  limit: soft (INF)(bytes), hard (INF)(bytes)
            \t  limit: soft (INF)(packets), hard (INF)(packets)
            \t  expire add: soft 0(sec), hard 0(sec)
            \t  expire use: soft 0(sec), hard 0(sec)
            \tlifetime current:
            \t  0(bytes), 0(packets)
            \t  add 2024-05-01 10:00:00 use -
            \ttmpl src 192.0.2.1 dst 192.0.2.2
            \t\tproto esp spi 0x00000000(0) reqid 1(0x00000001) mode tunnel
            \t\tlevel required share any 
            \t\tenc-mask ffffffff auth-mask ffffffff comp-mask ffffffff

            """
        #expect(formatPolicy(basicPolicy(), options: stats) == expected)
    }

    @Test("block action, ports, mark, packet offload without dir, if_id, optional template")
    func blockPolicy() {
        var p = XfrmUserPolicyInfo()
        p.sel = selector(src: "10.0.0.0", 8, dst: "0.0.0.0", 0, proto: IPProto.tcp)
        p.sel.sport = 22
        p.sel.sportMask = 0xffff
        p.sel.dport = 80
        p.sel.dportMask = 0xffff
        p.action = XfrmPolicyAction.block
        p.dir = 0
        var t = template(src: "192.0.2.1", dst: "192.0.2.2", proto: XfrmProto.ah, reqid: 0, mode: 0)
        t.optional = 1
        t.id.spi = 0x200
        let m = XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(p), attributes: [
            .mark(XfrmMark(value: 1, mask: 0xffff_ffff)),
            .templates([t]),
            .ifID(7),
            .offloadDevice(XfrmUserOffload(ifindex: 2, flags: XfrmOffloadFlag.packet)),
        ])
        let expected = """
            src 10.0.0.0/8 dst 0.0.0.0/0 proto tcp sport 22 dport 80 
            \tdir in action block priority 0 
            \tmark 0x1/0xffffffff 
            \ttmpl src 192.0.2.1 dst 192.0.2.2
            \t\tproto ah spi 0x00000200 reqid 0 mode transport
            \t\tlevel use 
            \tcrypto offload parameters: dev eth0 mode packet
            \tif_id 0x7

            """
        #expect(formatPolicy(m, options: plain, interfaces: Interfaces()) == expected)
    }

    @Test("socket policy, icmp type/code, dev, ptype, flags; gre key; ipv6-icmp; zero mark prints as 0")
    func selectorsAndSocket() {
        var p = XfrmUserPolicyInfo()
        p.sel = selector(src: "0.0.0.0", 0, dst: "0.0.0.0", 0, proto: IPProto.icmp)
        p.sel.sport = 8
        p.sel.sportMask = 0xffff
        p.sel.dportMask = 0xffff
        p.sel.ifindex = 2
        p.dir = 4
        p.flags = XfrmPolicyFlag.localOK | XfrmPolicyFlag.icmp
        let m = XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(p), attributes: [
            .policyType(0), .mark(XfrmMark(value: 0, mask: 0)),
        ])
        #expect(formatPolicy(m, options: plain, interfaces: Interfaces()) == """
            src 0.0.0.0/0 dst 0.0.0.0/0 proto icmp type 8 code 0 dev eth0 
            \tsocket out priority 0 ptype main flag localok icmp
            \tmark 0/0 

            """)

        var g = XfrmUserPolicyInfo()
        g.sel = selector(src: "10.1.0.0", 16, dst: "10.2.0.0", 16, proto: IPProto.gre)
        g.sel.sport = 1
        g.sel.dport = 2
        g.sel.sportMask = 0xffff
        g.sel.dportMask = 0xffff
        g.dir = 2
        g.flags = 0x5
        #expect(formatPolicy(XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(g)), options: plain) == """
            src 10.1.0.0/16 dst 10.2.0.0/16 proto gre key 65538 
            \tdir fwd priority 0 flag localok 4

            """)

        var six = XfrmUserPolicyInfo()
        six.sel = selector(src: "fe80::", 64, dst: "::ffff:192.0.2.1", 128, proto: IPProto.icmpv6)
        six.sel.sport = 135
        six.sel.sportMask = 0xffff
        six.dir = 1
        #expect(formatPolicy(XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(six)), options: plain) == """
            src fe80::/64 dst ::ffff:192.0.2.1/128 proto ipv6-icmp type 135 
            \tdir out priority 0 

            """)
    }

    @Test("policy prefixes: Updated, Deleted (from XFRMA_POLICY), Expired with hard")
    func policyPrefixes() {
        let body = formatPolicy(basicPolicy(), options: plain)
        var upd = basicPolicy()
        upd.type = XfrmMessageType.updPolicy.rawValue
        #expect(formatMonitorEvent(upd, options: plain) == "Updated " + body)
        guard case .policyInfo(let p) = basicPolicy().body else { return }
        var pid = XfrmUserPolicyID()
        pid.sel = p.sel
        pid.dir = p.dir
        pid.index = p.index
        let del = XfrmMessage(.delPolicy, flags: 0, body: .policyID(pid), attributes: basicPolicy().attributes + [.policy(p)])
        #expect(formatMonitorEvent(del, options: plain) == "Deleted " + body)
        let exp = XfrmMessage(.polExpire, flags: 0, body: .policyExpire(p, hard: false), attributes: basicPolicy().attributes)
        #expect(formatMonitorEvent(exp, options: plain) == "Expired " + body + "\thard 0\n")
    }

    // MARK: monitor-only events

    @Test("acquire: proto line, sel, the policy indented under it, then an empty line")
    func acquire() {
        guard case .policyInfo(let p) = basicPolicy().body else { return }
        var a = XfrmUserAcquire()
        a.id = XfrmID(daddr: v4("192.0.2.2"), spi: 0, proto: XfrmProto.esp)
        a.saddr = v4("192.0.2.1")
        a.sel = selector(src: "10.0.1.5", 32, dst: "10.0.2.7", 32, proto: IPProto.tcp)
        a.sel.sport = 1234
        a.sel.sportMask = 0xffff
        a.sel.dport = 80
        a.sel.dportMask = 0xffff
        a.policy = p
        a.seq = 12
        a.aalgos = 0xffff_ffff
        a.ealgos = 0xffff_ffff
        a.calgos = 0
        let m = XfrmMessage(.acquire, flags: 0, body: .acquire(a), attributes: basicPolicy().attributes)
        #expect(formatMonitorEvent(m, options: plain) == """
            acquire proto esp 
              sel src 10.0.1.5/32 dst 10.0.2.7/32 proto tcp sport 1234 dport 80 
              policy src 10.0.1.0/24 dst 10.0.2.0/24 
                \tdir out priority 100 
                \ttmpl src 192.0.2.1 dst 192.0.2.2
                \t\tproto esp reqid 1 mode tunnel


            """)
        _ = UTC.set
        #expect(formatMonitorEvent(m, options: stats) == """
            acquire proto esp spi 0x00000000(0) 
              sel src 10.0.1.5/32 dst 10.0.2.7/32 proto tcp sport 1234 dport 80 uid 0
              policy src 10.0.1.0/24 dst 10.0.2.0/24 uid 0
                \tdir out action allow index 25 priority 100 share any flag  (0x00000000)
                \tlifetime config:
                \t  limit: soft (INF)(bytes), hard (INF)(bytes)
                \t  limit: soft (INF)(packets), hard (INF)(packets)
                \t  expire add: soft 0(sec), hard 0(sec)
                \t  expire use: soft 0(sec), hard 0(sec)
                \tlifetime current:
                \t  0(bytes), 0(packets)
                \t  add 2024-05-01 10:00:00 use -
                \ttmpl src 192.0.2.1 dst 192.0.2.2
                \t\tproto esp spi 0x00000000(0) reqid 1(0x00000001) mode tunnel
                \t\tlevel required share any 
                \t\tenc-mask ffffffff auth-mask ffffffff comp-mask ffffffff
              seq 0x00000012 enc-mask ffffffff auth-mask ffffffff comp-mask 00000000

            """)
    }

    @Test("flush events, default policies, unknown messages; errors and DONE print nothing")
    func otherEvents() {
        #expect(formatMonitorEvent(XfrmMessage(.flushSA, flags: 0, body: .flushSA(proto: XfrmProto.esp)), options: plain)
            == "Flushed state proto esp\n")
        #expect(formatMonitorEvent(XfrmMessage(.flushSA, flags: 0, body: .flushSA(proto: 0)), options: plain)
            == "Flushed state proto 0\n")
        #expect(formatMonitorEvent(XfrmMessage(.flushPolicy, flags: 0, body: .flushPolicy), options: plain)
            == "Flushed policy \n")
        #expect(formatMonitorEvent(XfrmMessage(.flushPolicy, flags: 0, body: .flushPolicy, attributes: [.policyType(1)]),
                                   options: plain) == "Flushed policy ptype sub \n")
        let def = XfrmMessage(.getDefault, flags: 0, body: .policyDefault(inbound: 1, forward: 2, outbound: 0))
        #expect(formatMonitorEvent(def, options: plain) == "Default policies:\n in:  block\n fwd: accept\n out: unspec\n")
        let info = XfrmMessage(.newSADInfo, flags: 0, body: .sadInfo(count: 1, buckets: 8, maxBuckets: 64))
        #expect(formatMonitorEvent(info, options: plain) == "Unknown message: 00000040 0x00000022 0x00000000\n")
        #expect(formatMonitorEvent(ack, options: plain) == "")
        #expect(formatMonitorEvent(done, options: plain) == "")
    }
}
