import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMWire

/// XFRM_MSG_GETAE / NEWAE and XFRMA_LTIME_VAL on NEWSA: what strongSwan's update_sa reads from an SA and hands to
/// its successor (≈ xfrm_get_ae, xfrm_new_ae, xfrm_update_ae_params).
@Suite("User API: async events (GETAE, NEWAE) and curlft carried over")
struct AsyncEventTests {
    private let clock = ManualClock()

    private func server(_ extra: String = "") throws -> XfrmControlServer {
        let server = XfrmControlServer(stack: XFRMStack(clock: self.clock))
        let line = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 9 mode tunnel aead rfc4106(gcm(aes)) "
            + "0x0102030405060708090a0b0c0d0e0f1011121314 128 replay-window 32" + extra
        _ = try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                               transport: Recorder(server))
        return server
    }

    private var aeID: XfrmAEventID {
        var a = XfrmAEventID()
        a.saID.daddr = XfrmAddress(IPAddress("192.0.2.2")!)
        a.saID.spi = 0x100
        a.saID.family = AddressFamily.inet
        a.saID.proto = XfrmProto.esp
        return a
    }

    /// The errno of the last reply, an error or ACK; 1 when the last reply is neither (no errno is positive).
    private func errno(_ replies: [XfrmMessage]) -> Int32 {
        guard case .error(let e, _) = replies.last?.body else { return 1 }
        return e
    }

    private func getAE(_ server: XfrmControlServer, flags: UInt32 = 0) throws -> XfrmMessage {
        var id = self.aeID
        id.flags = flags
        let reply = server.request(XfrmMessage(.getAE, flags: NetlinkFlags.request, body: .aevent(id)))
        return try #require(reply.first)
    }

    @Test("GETAE answers NEWAE: the SA's id, source and reqid, the request's flags, replay state and curlft, thresholds on request")
    func getAE() throws {
        let server = try self.server()
        let sa = try #require(server.stack.states.list().first)
        // Two packets' worth of use, and an outbound counter that moved.
        sa.setCurrentLifetime({ var c = LifetimeCurrent(); c.bytes = 300; c.packets = 2; c.addTime = 1_000
                                c.useTime = 1_005; return c }())
        try sa.restore(.init(inboundTop: 0, bitmap: nil, outboundSequence: 41))
        let m = try self.getAE(server, flags: XfrmAEFlag.replayThreshold | XfrmAEFlag.timerThreshold)
        #expect(m.type == XfrmMessageType.newAE.rawValue)
        guard case .aevent(let id) = m.body else { Issue.record("body \(m.body)"); return }
        #expect(id.saID.spi == 0x100 && id.reqid == 9 && id.saddr == XfrmAddress(IPAddress("192.0.2.1")!))
        #expect(id.flags == XfrmAEFlag.replayThreshold | XfrmAEFlag.timerThreshold)
        #expect(m.attributes.contains { if case .replay(let r) = $0 { r.oseq == 41 } else { false } })
        #expect(m.attributes.contains { if case .lifetimeValue(let l) = $0 {
            l.bytes == 300 && l.packets == 2 && l.addTime == 1_000 && l.useTime == 1_005 } else { false } })
        #expect(m.attributes.contains(.replayThreshold(2)), "the kernel's default replay_maxdiff")
        #expect(m.attributes.contains(.timerThreshold(10)), "the kernel's default replay_maxage, in tenths of a second")
        // Without the flags, no thresholds; an unknown SA is ESRCH.
        let plain = try self.getAE(server)
        #expect(!plain.attributes.contains { if case .replayThreshold = $0 { true } else { false } })
        var missing = self.aeID
        missing.saID.spi = 0x999
        #expect(self.errno(server.request(XfrmMessage(.getAE, flags: NetlinkFlags.request, body: .aevent(missing))))
                == -Errno.ESRCH)
    }

    @Test("NEWAE with NLM_F_REPLACE restores the replay window and curlft; the outbound counter never goes back")
    func newAE() throws {
        let server = try self.server()
        let sa = try #require(server.stack.states.list().first)
        var r = XfrmReplayState()
        r.oseq = 500
        r.seq = 1_000
        r.bitmap = 0b101  // 1000 and 998 received
        var lt = XfrmLifetimeCur()
        lt.bytes = 7_000
        lt.packets = 70
        lt.addTime = 5
        let request = XfrmMessage(.newAE, flags: NetlinkFlags.request | NetlinkFlags.ack | NetlinkFlags.replace,
                                  body: .aevent(self.aeID), attributes: [.replay(r), .lifetimeValue(lt)])
        #expect(self.errno(server.request(request)) == 0)
        #expect(sa.current.bytes == 7_000 && sa.current.packets == 70 && sa.current.addTime == 5)
        let t = try #require(sa.transform)
        #expect(t.outboundSequence == 500 && t.replayTop == 1_000)
        #expect(t.replay.legacyBitmap == 0b101, "1000 and 998 received, 999 not")
        #expect(t.replay.check(999) != t.replay.check(998), "999 is still welcome, 998 a replay")
        // What GETAE lists now is what was set.
        let back = try self.getAE(server)
        #expect(back.attributes.contains { if case .replay(let x) = $0 { x == r } else { false } })
        // Moving the outbound counter back is refused whole: curlft stays as it was.
        r.oseq = 10
        lt.bytes = 1
        let back2 = server.request(XfrmMessage(.newAE, flags: NetlinkFlags.request | NetlinkFlags.replace,
                                               body: .aevent(self.aeID), attributes: [.replay(r), .lifetimeValue(lt)]))
        #expect(self.errno(back2) == -Errno.EINVAL)
        #expect(t.outboundSequence == 500 && sa.current.bytes == 7_000)
    }

    @Test("NEWAE without NLM_F_REPLACE, without any attribute, or for an ESN SA with another bitmap size is EINVAL (xfrm_new_ae)")
    func newAERefusals() throws {
        let server = try self.server()
        var r = XfrmReplayState()
        r.seq = 3
        let noReplace = server.request(XfrmMessage(.newAE, flags: NetlinkFlags.request, body: .aevent(self.aeID),
                                                   attributes: [.replay(r)]))
        #expect(self.errno(noReplace) == -Errno.EINVAL)
        let empty = server.request(XfrmMessage(.newAE, flags: NetlinkFlags.request | NetlinkFlags.replace,
                                               body: .aevent(self.aeID)))
        #expect(self.errno(empty) == -Errno.EINVAL)
        let esn = try self.server(" flag esn")
        var e = XfrmReplayStateESN()
        e.replayWindow = 32
        e.bitmap = [0, 0]  // the SA's window takes one word
        let wrong = esn.request(XfrmMessage(.newAE, flags: NetlinkFlags.request | NetlinkFlags.replace,
                                            body: .aevent(self.aeID), attributes: [.replayESN(e)]))
        #expect(self.errno(wrong) == -Errno.EINVAL)
        e.bitmap = [0x3]
        e.seq = 64
        e.seqHi = 1
        let right = esn.request(XfrmMessage(.newAE, flags: NetlinkFlags.request | NetlinkFlags.replace | NetlinkFlags.ack,
                                            body: .aevent(self.aeID), attributes: [.replayESN(e)]))
        #expect(self.errno(right) == 0)
        let sa = try #require(esn.stack.states.list().first)
        let top = try #require(sa.transform).replayTop
        #expect(top == 1 << 32 | 64)
    }

    @Test("NEWSA with XFRMA_LTIME_VAL starts from that curlft: a moved SA keeps its add time and counts (xfrm_state_construct)")
    func newSACarriesCurlft() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: self.clock))
        let rec = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
        let line = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel aead rfc4106(gcm(aes)) "
            + "0x0102030405060708090a0b0c0d0e0f1011121314 128 limit packet-hard 100"
        _ = try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(), transport: rec)
        var m = try #require(rec.requests.first)
        var lt = XfrmLifetimeCur()
        lt.bytes = 12_345
        lt.packets = 99
        lt.addTime = 77
        lt.useTime = 78
        m.attributes.append(.lifetimeValue(lt))
        m.attributes.append(.replayThreshold(5))
        let reply = server.request(m)
        if case .error(let e, let text) = reply.first?.body { #expect(e == 0, "\(text)") }
        let sa = try #require(server.stack.states.list().first)
        #expect(sa.current.bytes == 12_345 && sa.current.packets == 99 && sa.current.addTime == 77)
        #expect(sa.eventThresholds.replayMaxDiff == 5)
        #expect(sa.checkExpire(now: 100) == .ok, "packet 100 of 100 still goes")
        sa.account(bytes: 10, now: 100)
        #expect(sa.checkExpire(now: 100) == .hardExpired, "the hard limit counts the packets carried over")
    }

    @Test("XFRMA_SA_DIR and XFRMA_SA_PCPU outside the messages that take them are EINVAL, nothing applied (xfrm_reject_unused_attr)")
    func unusedAttributesRefused() throws {
        let server = try self.server()
        let flush = server.request(XfrmMessage(.flushSA, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .flushSA(proto: 0), attributes: [.saDir(1)]))
        guard case .error(let e, let text) = flush.last?.body else { Issue.record("no error"); return }
        #expect(e == -Errno.EINVAL && text == "Invalid attribute SA_DIR")
        #expect(server.stack.states.count == 1, "nothing flushed")
        var id = self.aeID
        id.flags = 0
        let get = server.request(XfrmMessage(.getAE, flags: NetlinkFlags.request, body: .aevent(id),
                                             attributes: [.saPCPU(0)]))
        guard case .error(let e2, let text2) = get.last?.body else { Issue.record("no error"); return }
        #expect(e2 == -Errno.EINVAL && text2 == "Invalid attribute SA_PCPU")
    }

    @Test("verify_replay's direction rules apply to XFRMA_REPLAY_ESN_VAL only; the legacy XFRMA_REPLAY_VAL passes as in the kernel")
    func replayDirectionRules() throws {
        func add(_ dir: String, patch: (inout XfrmMessage) -> Void) throws -> (Int32, String) {
            let rec = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
            let line = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel aead rfc4106(gcm(aes)) "
                + "0x0102030405060708090a0b0c0d0e0f1011121314 128 dir \(dir)"
            _ = try? runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(), transport: rec)
            var m = try #require(rec.requests.first)
            patch(&m)
            let reply = XfrmControlServer(stack: XFRMStack(clock: ManualClock())).request(m)
            guard case .error(let e, let text) = reply.first?.body else { return (0, "") }
            return (e, text)
        }
        var legacy = XfrmReplayState()
        legacy.oseq = 5
        #expect(try add("in") { $0.attributes.append(.replay(legacy)) }.0 == 0, "oseq in a legacy replay of an input SA")
        var esn = XfrmReplayStateESN()
        esn.seqHi = 1
        esn.replayWindow = 32
        esn.bitmap = [0]
        let (e1, t1) = try add("in") { $0.attributes.append(.replayESN(esn)) }
        #expect(e1 == -Errno.EINVAL && t1 == "Replay seq_hi should be 0 in non-ESN mode for input SA")
        var out = XfrmReplayStateESN()
        out.bitmap = [0]
        let (e2, t2) = try add("out") { $0.attributes.append(.replayESN(out)) }
        #expect(e2 == -Errno.EINVAL && t2 == "Replay bmp_len should 0 for output SA")
        out.bitmap = []
        out.oseq = UInt32.max
        let (e3, t3) = try add("out") { $0.attributes.append(.replayESN(out)) }
        #expect(e3 == -Errno.EINVAL && t3 == "Replay oseq should be less than 0xFFFFFFFF in non-ESN mode for output SA")
    }

    @Test("XFRM_MSG_EXPIRE from a key manager announces the EXPIRE; hard deletes the SA without DELSA, soft leaves it as it is; an unknown SA is ENOENT (xfrm_add_sa_expire)")
    func expireFromKeyManager() throws {
        for hard in [false, true] {
            let server = try self.server()
            let events = server.stack.events.subscribe()
            var info = XfrmUserSAInfo()
            info.id = XfrmID(daddr: XfrmAddress(IPAddress("192.0.2.2")!), spi: 0x100, proto: XfrmProto.esp)
            info.family = AddressFamily.inet
            let r = server.request(XfrmMessage(.expire, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .expire(info, hard: hard)))
            #expect(self.errno(r) == 0)
            let seen = events.drain()
            #expect(seen.contains { if case .expire(_, hard: hard) = $0 { true } else { false } })
            #expect(!seen.contains { if case .stateDeleted = $0 { true } else { false } })
            #expect(server.stack.states.count == (hard ? 0 : 1))
            if !hard {
                let dying = try #require(server.stack.states.list().first).isDying
                #expect(!dying, "soft: not made dying")
            }
            info.id.spi = 0x999
            #expect(self.errno(server.request(XfrmMessage(.expire, flags: NetlinkFlags.request,
                                                          body: .expire(info, hard: true)))) == -Errno.ENOENT)
        }
    }

    @Test("XFRM_MSG_POLEXPIRE from a key manager: hard deletes the policy without DELPOLICY, then announces it (xfrm_add_pol_expire)")
    func policyExpireFromKeyManager() throws {
        let server = try self.server()
        _ = try runXfrmCommand("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out".split(separator: " ").map(String.init),
                               options: XfrmCLIOptions(), transport: Recorder(server))
        let events = server.stack.events.subscribe()
        let p = try #require(server.stack.policies.list().first)
        var info = XfrmUserPolicyInfo()
        info.index = p.index
        info.dir = 1
        let r = server.request(XfrmMessage(.polExpire, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                           body: .policyExpire(info, hard: true)))
        #expect(self.errno(r) == 0)
        let seen = events.drain()
        #expect(seen.contains { if case .policyExpire(_, hard: true) = $0 { true } else { false } })
        #expect(!seen.contains { if case .policyDeleted = $0 { true } else { false } })
        #expect(server.stack.policies.list().isEmpty)
    }
}

