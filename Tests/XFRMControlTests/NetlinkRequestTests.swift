import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMWire

/// How requests are taken and answered as netlink_rcv_skb and xfrm_user_rcv_msg take them: acknowledgements,
/// what is not a request, dump flags, and policy requests' type, mark and if_id.
@Suite("User API: netlink request handling")
struct NetlinkRequestTests {
    private func server() throws -> XfrmControlServer {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        for line in [
            "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel aead rfc4106(gcm(aes)) "
                + "0x0102030405060708090a0b0c0d0e0f1011121314 128",
            "policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out index 0x1a9 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp mode tunnel",
            "policy add src 10.0.3.0/24 dst 10.0.4.0/24 dir out mark 7 mask 0xff tmpl src 192.0.2.1 dst 192.0.2.2 proto esp mode tunnel",
        ] {
            _ = try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                                   transport: Recorder(server))
        }
        return server
    }

    /// The errno of the last reply, an error or ACK; 1 when the last reply is neither (no errno is positive).
    private func errno(_ replies: [XfrmMessage]) -> Int32 {
        guard case .error(let e, _) = replies.last?.body else { return 1 }
        return e
    }

    private var saID: XfrmUserSAID {
        var id = XfrmUserSAID()
        id.daddr = XfrmAddress(IPAddress("192.0.2.2")!)
        id.spi = 0x100
        id.family = AddressFamily.inet
        id.proto = XfrmProto.esp
        return id
    }

    @Test("a GET with NLM_F_ACK gets its reply and then an ACK; without, the reply alone; a dump never an ACK")
    func getsAreAcked() throws {
        let server = try self.server()
        let acked = server.request(XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .saID(self.saID)))
        #expect(acked.count == 2)
        #expect((acked.first?.type ?? 0) == XfrmMessageType.newSA.rawValue)
        #expect(self.errno(acked) == 0, "the trailing ACK")
        let plain = server.request(XfrmMessage(.getSA, flags: NetlinkFlags.request, body: .saID(self.saID)))
        #expect(plain.count == 1 && (plain.first?.type ?? 0) == XfrmMessageType.newSA.rawValue)
        let dump = server.request(XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump | NetlinkFlags.ack,
                                              body: .empty))
        #expect((dump.last?.type ?? 0) == NetlinkControlType.done, "a dump ends with DONE, no ACK after it")
        let info = server.request(XfrmMessage(.getSPDInfo, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                              body: .infoRequest(flags: 0xffff_ffff)))
        #expect(info.count == 2 && self.errno(info) == 0)
        // A change is acked once, not twice.
        let flush = server.request(XfrmMessage(.flushSA, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .flushSA(proto: XfrmProto.esp)))
        #expect(flush.count == 1 && self.errno(flush) == 0)
    }

    @Test("either NLM_F_DUMP bit starts a dump, as xfrm_user_rcv_msg tests nlmsg_flags & NLM_F_DUMP")
    func eitherDumpBit() throws {
        let server = try self.server()
        for bit: UInt16 in [0x100, 0x200] {  // NLM_F_ROOT, NLM_F_MATCH
            var header = XfrmMessage(.getPolicy, flags: NetlinkFlags.request | bit, body: .empty).encode()
            header = Array(header.prefix(16))
            header[0] = 16
            let replies = server.request(raw: header)
            #expect((replies.last?.type ?? 0) == NetlinkControlType.done, "flags \(bit)")
            #expect(replies.count == 3, "two policies and DONE")
        }
    }

    @Test("a message without NLM_F_REQUEST, or a control message, is not executed; it is acked only when it asks")
    func notARequest() throws {
        let server = try self.server()
        let flush = XfrmMessage(.flushPolicy, flags: NetlinkFlags.ack, body: .flushPolicy).encode()
        let replies = server.request(raw: flush)
        #expect(replies.count == 1 && self.errno(replies) == 0)
        #expect(server.stack.policies.list().count == 2, "nothing flushed")
        let silent = XfrmMessage(.flushPolicy, flags: 0, body: .flushPolicy).encode()
        #expect(server.request(raw: silent).isEmpty)
        #expect(server.stack.policies.list().count == 2)
        var control = Array(silent.prefix(16))
        control[0] = 16
        control[4] = UInt8(NetlinkControlType.done)
        control[6] = UInt8(NetlinkFlags.request | NetlinkFlags.ack)
        let controlReplies = server.request(raw: control)
        #expect(controlReplies.count == 1 && self.errno(controlReplies) == 0)
    }

    @Test("flushing, getting or deleting sub policies touches no main policy: none exist (CONFIG_XFRM_SUB_POLICY, no sub policy)")
    func subPolicyRequestsRefused() throws {
        let server = try self.server()
        let flush = server.request(XfrmMessage(.flushPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .flushPolicy, attributes: [.policyType(1)]))
        #expect(self.errno(flush) == 0, "as this host's kernel answers `ip xfrm policy flush ptype sub`")
        #expect(server.stack.policies.list().count == 2)
        let bad = server.request(XfrmMessage(.flushPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                             body: .flushPolicy, attributes: [.policyType(2)]))
        #expect(self.errno(bad) == -Errno.EINVAL)
        var id = XfrmUserPolicyID()
        id.index = 0x1a9
        id.dir = 1
        let delete = server.request(XfrmMessage(.delPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                                body: .policyID(id), attributes: [.policyType(1)]))
        #expect(self.errno(delete) == -Errno.ENOENT)
        #expect(server.stack.policies.list().count == 2)
        let main = server.request(XfrmMessage(.flushPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                              body: .flushPolicy, attributes: [.policyType(0)]))
        #expect(self.errno(main) == 0)
        #expect(server.stack.policies.list().count == 0)
    }

    @Test("a policy found by index must have the request's mark and if_id too (xfrm_policy_byid)")
    func indexLookupMatchesMarkAndIfID() throws {
        let server = try self.server()
        let marked = try #require(server.stack.policies.list().first { $0.mark.value == 7 })
        var id = XfrmUserPolicyID()
        id.index = marked.index
        id.dir = 1
        let unmarked = server.request(XfrmMessage(.getPolicy, flags: NetlinkFlags.request, body: .policyID(id)))
        #expect(self.errno(unmarked) == -Errno.ENOENT)
        let wrongIfID = server.request(XfrmMessage(.delPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                                   body: .policyID(id),
                                                   attributes: [.mark(XfrmMark(value: 7, mask: 0xff)), .ifID(3)]))
        #expect(self.errno(wrongIfID) == -Errno.ENOENT)
        #expect(server.stack.policies.list().count == 2)
        let found = server.request(XfrmMessage(.getPolicy, flags: NetlinkFlags.request, body: .policyID(id),
                                               attributes: [.mark(XfrmMark(value: 7, mask: 0xff))]))
        #expect((found.first?.type ?? 0) == XfrmMessageType.newPolicy.rawValue)
        id.index = 0x1a9
        let plain = server.request(XfrmMessage(.delPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .policyID(id)))
        #expect(self.errno(plain) == 0)
        #expect(server.stack.policies.list().count == 1)
    }

    @Test("SETDEFAULT sets only the directions given block or accept, ignoring other values, and succeeds (xfrm_set_default)")
    func setDefaultIgnoresInvalidValues() throws {
        let server = try self.server()
        let r = server.request(XfrmMessage(.setDefault, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                           body: .policyDefault(inbound: XfrmPolicyDefault.block, forward: 3,
                                                                outbound: XfrmPolicyDefault.block)))
        #expect(self.errno(r) == 0)
        #expect(server.stack.defaultAction(.inbound) == .block && server.stack.defaultAction(.outbound) == .block)
        #expect(server.stack.defaultAction(.forward) == .accept, "3 is no action: forward unchanged")
    }

    @Test("FLUSHSA takes any protocol number; one no SA has flushes nothing (xfrm_flush_sa)")
    func flushAnyProtocol() throws {
        let server = try self.server()
        let r = server.request(XfrmMessage(.flushSA, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                           body: .flushSA(proto: 43)))
        #expect(self.errno(r) == 0)
        #expect(server.stack.states.count == 1)
    }

    @Test("AUTH_TRUNC with a truncation of 0 takes the algorithm's default (attach_auth_trunc)")
    func authTruncZeroIsTheDefault() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        let rec = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
        let line = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel enc cbc(aes) "
            + "0x0102030405060708090a0b0c0d0e0f10 auth-trunc hmac(sha256) "
            + "0x0102030405060708090a0b0c0d0e0f100102030405060708090a0b0c0d0e0f10 128"
        _ = try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(), transport: rec)
        var m = try #require(rec.requests.first)
        m.attributes = m.attributes.map { a in
            guard case .algAuthTrunc(var x) = a else { return a }
            x.lengthBits = 0
            return .algAuthTrunc(x)
        }
        #expect(self.errno(server.request(m)) == 0, "accepted")
        let sa = try #require(server.stack.states.list().first)
        let icv = try #require(sa.transform).cipher.icvLength
        #expect(icv == 12, "hmac(sha256)'s icv_truncbits in the kernel's table: 96")
    }

    @Test("an SA selector without a family keeps its protocol and ports and takes the SA's family (copy_from_user_state)")
    func familylessSASelectorIsKept() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        let rec = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
        let line = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel aead rfc4106(gcm(aes)) "
            + "0x0102030405060708090a0b0c0d0e0f1011121314 128"
        _ = try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(), transport: rec)
        var m = try #require(rec.requests.first)
        guard case .saInfo(var info) = m.body else { Issue.record("body"); return }
        info.sel = XfrmSelector()  // family 0, as iproute2 sends `sel proto tcp dport 443`
        info.sel.proto = 6
        info.sel.dport = 443
        info.sel.dportMask = 0xffff
        m.body = .saInfo(info)
        #expect(self.errno(server.request(m)) == 0)
        let sel = try #require(server.stack.states.list().first).config.selector
        #expect(sel.family == 4 && sel.proto == 6 && sel.destinationPort == 443 && sel.destinationPortMask == 0xffff)
        #expect(!sel.covers(Flow(source: IPAddress("10.0.1.1")!, destination: IPAddress("10.0.2.1")!, proto: 17,
                                 sourcePort: 1, destinationPort: 443)), "UDP is not covered")
    }
}

