// The user API of a stack (≈ net/xfrm/xfrm_user.c): validates each XFRM netlink request, translates it to the
// core's types, applies it, and answers as the kernel does (ACK, reply, dump + DONE, or -errno with extack text).
// It also turns the stack's events into the multicast messages `ip xfrm monitor` prints.

import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMWire

/// Serves XFRM requests for one in-process stack.
public final class XfrmControlServer: XfrmTransport {
    public let stack: XFRMStack

    /// An interface whose offload requests are served in packet mode (`xfrmd --offload-promote`), for key managers
    /// that predate packet offload (strongSwan before 5.9.10 and libreswan 4 ask for crypto offload only): a NEWSA or
    /// UPDSA asking for crypto offload on it (or on no usable interface) gets packet offload, and every IPsec policy
    /// with one ESP template that names no device is offloaded to it in packet mode, so that the device counts and
    /// enforces both. Offloaded policies are looked up before software ones, as in the kernel: a software policy
    /// (a bypass, a drop shunt) no longer outranks a promoted one by priority.
    public let packetOffloadPromotion: Int32?

    public init(stack: XFRMStack, packetOffloadPromotion: Int32? = nil) {
        self.stack = stack
        self.packetOffloadPromotion = packetOffloadPromotion
    }

    /// The acknowledgement of a request that succeeded: only when it asked with NLM_F_ACK (≈ netlink_rcv_skb, which
    /// acks a success only then; iproute2's `deleteall` sends without it and takes any reply for an error).
    private func ack(_ m: XfrmMessage) -> [XfrmMessage] {
        guard m.flags & NetlinkFlags.ack != 0 else { return [] }
        return [Self.errorReply(to: NetlinkHeader(length: UInt32(m.encode().count), type: m.type, flags: m.flags,
                                           sequence: m.sequence, portID: m.portID), errno: 0, message: "")]
    }

    /// ≈ xfrm_reject_unused_attr, before any handler runs: XFRMA_SA_DIR belongs to NEWSA, UPDSA and ALLOCSPI,
    /// XFRMA_SA_PCPU to those and ACQUIRE; anywhere else the request is refused whole.
    static func rejectUnusedAttributes(_ type: XfrmMessageType, _ attributes: [XfrmAttribute]) throws(ControlError) {
        for a in attributes {
            switch a {
            case .saDir where ![.newSA, .updSA, .allocSPI].contains(type):
                throw .invalid("Invalid attribute SA_DIR")
            case .saPCPU where ![.newSA, .updSA, .allocSPI, .acquire].contains(type):
                throw .invalid("Invalid attribute SA_PCPU")
            default:
                continue
            }
        }
    }

    /// NLMSG_MIN_TYPE: below it, netlink's own control messages.
    static let minimumType: UInt16 = 0x10

    /// ≈ copy_from_user_policy_type + verify_policy_type: the policy type a request names (main when it names none);
    /// EINVAL for one that is neither main nor sub. Sub policies cannot be added here, so a request about them
    /// finds none (a flush flushes nothing, a get or delete is ENOENT), as on a kernel with CONFIG_XFRM_SUB_POLICY
    /// (Debian's) that holds no sub policy — never the main policies.
    static func policyType(_ attributes: [XfrmAttribute]) throws(ControlError) -> UInt8 {
        for a in attributes {
            if case .policyType(let t) = a {
                guard t <= 1 else { throw .invalid("Invalid policy type") }
                return t
            }
        }
        return 0
    }

    private func fail(_ m: XfrmMessage, _ e: ControlError) -> [XfrmMessage] {
        [Self.errorReply(to: NetlinkHeader(length: UInt32(m.encode().count), type: m.type, flags: m.flags,
                                           sequence: m.sequence, portID: m.portID), errno: -e.errno, message: e.message)]
    }

    /// ≈ netlink_ack on a socket with NETLINK_CAP_ACK and NETLINK_EXT_ACK (what iproute2 and libmnl ask for): the
    /// request's header echoed, NLM_F_CAPPED, the extack text as NLMSGERR_ATTR_MSG, sent to the requester's port.
    static func errorReply(to h: NetlinkHeader, errno: Int32, message: String) -> XfrmMessage {
        var r = XfrmMessage(type: NetlinkControlType.error, flags: NetlinkFlags.capped, sequence: h.sequence,
                            portID: h.portID, body: .error(errno: errno, message: message))
        r.echoedRequest = h
        return r
    }

    /// Answers a request, each reply addressed to the requester's port id (≈ NETLINK_CB(skb).portid). A request
    /// that succeeded is acknowledged after its reply when it asked with NLM_F_ACK, a GET as much as a change; a
    /// dump is not (≈ netlink_rcv_skb: every handler returning 0 is acked on NLM_F_ACK, a dump's -EINTR skips it).
    public func request(_ m: XfrmMessage) -> [XfrmMessage] {
        var out: [XfrmMessage]
        do throws(ControlError) {
            out = try self.dispatch(m)
        } catch {
            return self.fail(m, error)
        }
        if out.last?.type != NetlinkControlType.done { out += self.ack(m) }
        for i in out.indices { out[i].portID = m.portID }
        return out
    }

    /// Answers a request as it arrives on a socket: the header and the fixed body's minimum size are checked
    /// first (≈ xfrm_user_rcv_msg: nlmsg_parse against xfrm_msg_min — EINVAL "Invalid header length" when
    /// short), then the message is decoded (EINVAL naming what was malformed) and answered.
    public func request(raw bytes: [UInt8]) -> [XfrmMessage] {
        guard let h = NetlinkHeader(bytes: bytes), h.length >= 16, Int(h.length) <= bytes.count else {
            return [Self.errorReply(to: NetlinkHeader(bytes: bytes) ?? NetlinkHeader(), errno: -Errno.EINVAL,
                                    message: "Invalid netlink message length")]
        }
        // ≈ netlink_rcv_skb: a message that is not a request, or a control message (below NLMSG_MIN_TYPE), is not
        // handed to XFRM; it is acknowledged (with 0) only if it asked for that.
        if h.flags & NetlinkFlags.request == 0 || h.type < Self.minimumType {
            guard h.flags & NetlinkFlags.ack != 0 else { return [] }
            return [Self.errorReply(to: h, errno: 0, message: "")]
        }
        guard let type = XfrmMessageType(rawValue: h.type) else {
            return [Self.errorReply(to: h, errno: -Errno.EINVAL, message: "Unsupported message type \(h.type)")]
        }
        // ≈ xfrm_user_rcv_msg: either bit of NLM_F_DUMP (ROOT or MATCH) starts a dump.
        let dump = (type == .getSA || type == .getPolicy) && h.flags & NetlinkFlags.dump != 0
        if !dump && Int(h.length) - 16 < type.minimumBodySize {
            return [Self.errorReply(to: h, errno: -Errno.EINVAL, message: "Invalid header length")]
        }
        do throws(WireError) {
            return self.request(try XfrmMessage.decode(Array(bytes.prefix(Int(h.length)))))
        } catch {
            return [Self.errorReply(to: h, errno: -Errno.EINVAL, message: error.description)]
        }
    }

    // swiftlint:disable:next cyclomatic_complexity
    private func dispatch(_ m: XfrmMessage) throws(ControlError) -> [XfrmMessage] {
        guard let type = m.messageType else { throw ControlError(Errno.EOPNOTSUPP, "Unsupported message type \(m.type)") }
        // ≈ xfrm_user_rcv_msg: a dump starts before xfrm_reject_unused_attr, which only the other requests pass.
        let dump = (type == .getSA || type == .getPolicy) && m.flags & NetlinkFlags.dump != 0
        if !dump { try Self.rejectUnusedAttributes(type, m.attributes) }
        switch (type, m.body) {
        case (.newSA, .saInfo(let info)), (.updSA, .saInfo(let info)):
            let sa = try self.buildSA(info, m.attributes, update: type == .updSA)
            let offload = try self.offloadRequest(sa, m.attributes)
            // ≈ xfrm_state_construct's xfrm_update_ae_params: curlft and the thresholds a key manager carries over
            // (strongSwan's update_sa moves an SA with what GETAE read from the old one).
            for a in m.attributes {
                switch a {
                case .lifetimeValue(let l): sa.setCurrentLifetime(LifetimeCurrent(l))
                case .replayThreshold(let v): sa.setEventThresholds(replayMaxDiff: v, replayMaxAge: nil)
                case .timerThreshold(let v): sa.setEventThresholds(replayMaxDiff: nil, replayMaxAge: v)
                default: continue
                }
            }
            do throws(StateDatabaseError) {
                if type == .newSA {
                    try self.stack.addState(sa, offload: offload)
                } else {
                    try self.stack.updateState(sa, offload: offload)
                }
            } catch {
                let generic = [Errno.EEXIST, Errno.ESRCH].contains(error.errno)
                throw ControlError(error.errno, generic ? "" : error.message)
            }
            return []
        case (.delSA, .saID(let id)):
            let sa = try self.findSA(id, m)
            do throws(StateDatabaseError) {
                try self.stack.deleteState(sa.id, mark: sa.config.mark)
            } catch { throw ControlError(error.errno, "") }
            return []
        case (.expire, .expire(let info, let hard)):
            // ≈ xfrm_add_sa_expire: a key manager expiring an SA (ENOENT when there is none, EINVAL unless valid).
            var id = XfrmUserSAID()
            id.daddr = info.id.daddr
            id.spi = info.id.spi
            id.family = info.family
            id.proto = info.id.proto
            let sa: SecurityAssociation
            do throws(ControlError) { sa = try self.findSA(id, m) } catch { throw ControlError(Errno.ENOENT, "") }
            guard sa.state == .valid else { throw .invalid("SA must be in VALID state") }
            self.stack.expireByRequest(sa, hard: hard)
            return []
        case (.polExpire, .policyExpire(let info, let hard)):
            // ≈ xfrm_add_pol_expire: the policy by index or selector, as DELPOLICY finds it.
            let policy = try self.findPolicy(dir: info.dir, index: info.index, selector: info.sel, m)
            self.stack.expirePolicyByRequest(policy, hard: hard)
            return []
        case (.getAE, .aevent(let a)):
            return try self.getAE(a, m)
        case (.newAE, .aevent(let a)):
            try self.newAE(a, m)
            return []
        case (.getSA, .saID(let id)):
            self.stack.syncDeviceStats()
            let sa = try self.findSA(id, m)
            return [Self.stateMessage(sa, type: .newSA, sequence: m.sequence)]
        case (.getSA, .empty):
            // ≈ xfrm_dump_sa: the filter is read by the dump itself (GETSA has no .start), so a bad one ends the dump
            // in its NLMSG_DONE, with the errno and extack there (netlink_dump_done), not in an NLMSG_ERROR.
            let filter: SADumpFilter
            do throws(ControlError) { filter = try SADumpFilter(m.attributes) } catch {
                return [XfrmMessage(type: NetlinkControlType.done, flags: NetlinkFlags.multi, sequence: m.sequence,
                                    body: .done(status: -error.errno, message: error.message))]
            }
            self.stack.syncDeviceStats()
            var out = self.stack.states.list().filter(filter.matches).map { sa -> XfrmMessage in
                var msg = Self.stateMessage(sa, type: .newSA, sequence: m.sequence)
                msg.flags = NetlinkFlags.multi
                return msg
            }
            out.append(XfrmMessage(type: NetlinkControlType.done, flags: NetlinkFlags.multi, sequence: m.sequence, body: .done(status: 0, message: "")))
            return out
        case (.flushSA, .flushSA(let proto)):
            // ≈ xfrm_flush_sa: any protocol number; one no SA has flushes nothing, and an empty table is success.
            self.stack.flushStates(proto: proto)
            return []
        case (.allocSPI, .spiInfo(let spi)):
            var config = try self.baseConfig(spi.info, m.attributes)
            config.crypto = nil
            // ≈ xfrm_alloc_userspi: the CPU must exist (EINVAL here, unlike NEWSA's ERANGE).
            if let n = config.pcpuNum, n >= self.stack.possibleCPUs.load(ordering: .relaxed) {
                throw .invalid("pCPU number too big")
            }
            let sa: SecurityAssociation
            do throws(StateDatabaseError) {
                sa = try self.stack.allocateSPI(config, seq: spi.info.seq, min: spi.min, max: spi.max)
            } catch { throw error }
            return [Self.stateMessage(sa, type: .newSA, sequence: m.sequence)]
        case (.getSADInfo, _):
            return [XfrmMessage(type: XfrmMessageType.newSADInfo.rawValue, flags: 0, sequence: m.sequence,
                                body: .sadInfo(count: UInt32(self.stack.states.count), buckets: 8, maxBuckets: 1_048_576))]
        case (.newPolicy, .policyInfo(let info)), (.updPolicy, .policyInfo(let info)):
            let p = try self.buildPolicy(info, m.attributes)
            do throws(PolicyDatabaseError) {
                try self.stack.addPolicy(p, update: type == .updPolicy)
            } catch { throw ControlError(error.errno, error.errno == Errno.EINVAL ? error.message : "") }
            return []
        case (.delPolicy, .policyID(let id)), (.getPolicy, .policyID(let id)):
            let policy = try self.findPolicy(dir: id.dir, index: id.index, selector: id.sel, m)
            if type == .getPolicy { return [self.policyMessage(policy, type: .newPolicy, sequence: m.sequence)] }
            do throws(PolicyDatabaseError) {
                try self.stack.deletePolicy(index: policy.index, direction: policy.direction)
            } catch { throw ControlError(error.errno, "") }
            return []
        case (.getPolicy, .empty):
            var out = self.stack.policies.list().map { p -> XfrmMessage in
                var msg = self.policyMessage(p, type: .newPolicy, sequence: m.sequence)
                msg.flags = NetlinkFlags.multi
                return msg
            }
            out.append(XfrmMessage(type: NetlinkControlType.done, flags: NetlinkFlags.multi, sequence: m.sequence, body: .done(status: 0, message: "")))
            return out
        case (.flushPolicy, _):
            // ≈ xfrm_flush_policy: a flush of sub policies flushes no main one.
            if try Self.policyType(m.attributes) == 0 { self.stack.flushPolicies() }
            return []
        case (.getSPDInfo, _):
            var s = XfrmSPDInfo()
            s.inCount = UInt32(self.stack.policies.count(.inbound))
            s.outCount = UInt32(self.stack.policies.count(.outbound))
            s.fwdCount = UInt32(self.stack.policies.count(.forward))
            return [XfrmMessage(type: XfrmMessageType.newSPDInfo.rawValue, flags: 0, sequence: m.sequence, body: .spdInfo(s))]
        case (.setDefault, .policyDefault(let i, let f, let o)):
            // ≈ xfrm_set_default: each direction whose value is block or accept is set; any other value (unset, or
            // one no kernel knows) leaves that direction as it is, and the request succeeds.
            for (v, d) in [(i, PolicyDirection.inbound), (f, .forward), (o, .outbound)] {
                switch v {
                case XfrmPolicyDefault.block: self.stack.setDefault(.block, for: d)
                case XfrmPolicyDefault.accept: self.stack.setDefault(.accept, for: d)
                default: continue
                }
            }
            return []
        case (.getDefault, _):
            return [XfrmMessage(type: XfrmMessageType.getDefault.rawValue, flags: 0, sequence: m.sequence,
                                body: .policyDefault(inbound: self.stack.defaultAction(.inbound).rawValue,
                                                     forward: self.stack.defaultAction(.forward).rawValue,
                                                     outbound: self.stack.defaultAction(.outbound).rawValue))]
        default:
            throw ControlError(Errno.EOPNOTSUPP, "Unsupported request")
        }
    }

    func findSA(_ id: XfrmUserSAID, _ m: XfrmMessage) throws(ControlError) -> SecurityAssociation {
        guard let daddr = id.daddr.ip(family: id.family) else { throw .invalid("Invalid address family \(id.family)") }
        let mark = m.attribute { if case .mark(let x) = $0 { return x } else { return nil } }
        guard let sa = self.stack.states.get(SAID(destination: daddr, spi: id.spi, proto: id.proto),
                                             mark: Mark(value: mark?.value ?? 0, mask: mark?.mask ?? 0))
        else { throw ControlError(Errno.ESRCH, "") }
        return sa
    }

    /// The policy a DELPOLICY, GETPOLICY or POLEXPIRE names (≈ xfrm_policy_byid or xfrm_policy_bysel_ctx): of the
    /// request's type (only main policies exist: a sub one is ENOENT), direction, mark and if_id; ENOENT for none.
    func findPolicy(dir: UInt8, index: UInt32, selector: XfrmSelector, _ m: XfrmMessage) throws(ControlError) -> Policy {
        guard try Self.policyType(m.attributes) == 0 else { throw ControlError(Errno.ENOENT, "") }
        guard let direction = PolicyDirection(rawValue: dir) else { throw .invalid("Invalid policy direction \(dir)") }
        let mark = m.attribute { if case .mark(let x) = $0 { return x } else { return nil } }
        let ifID: UInt32 = m.attribute { if case .ifID(let x) = $0 { return x } else { return nil } } ?? 0
        let policy: Policy?
        if index != 0 {
            // ≈ xfrm_policy_byid: the index, and the request's mark (exactly) and if_id too.
            policy = self.stack.policies.get(index: index, direction: direction).flatMap { p in
                p.mark.value == mark?.value ?? 0 && p.mark.mask == mark?.mask ?? 0 && p.ifID == ifID ? p : nil
            }
        } else {
            let key = Policy.Key(direction: direction, selector: try Selector(wire: selector),
                                 markValue: mark?.value ?? 0, markMask: mark?.mask ?? 0, ifID: ifID)
            policy = self.stack.policies.get(key: key)
        }
        guard let policy else { throw ControlError(Errno.ENOENT, "") }
        return policy
    }

    // MARK: - Building SAs (≈ verify_newsa_info + xfrm_state_construct)

    private func baseConfig(_ info: XfrmUserSAInfo, _ attrs: [XfrmAttribute]) throws(ControlError) -> SAConfig {
        guard info.family == AddressFamily.inet || info.family == AddressFamily.inet6 else {
            throw .invalid("Invalid address family \(info.family)")
        }
        guard info.id.proto == XfrmProto.esp else {
            throw ControlError(Errno.EPROTONOSUPPORT, "Only ESP SAs are supported (protocol \(info.id.proto))")
        }
        guard info.mode <= 1 else { throw .invalid("Unsupported mode \(info.mode): only transport and tunnel") }
        let dst = info.id.daddr.ip(family: info.family)!
        let src = info.saddr.ip(family: info.family)!
        var selector: Selector
        if info.sel.family == AddressFamily.unspec {
            // ≈ copy_from_user_state: the selector is kept whole (protocol, ports, device: iproute2's `sel proto tcp
            // dport 443` has no family) and an unset family becomes the SA's — unless the af-unspec flag asks for a
            // selector of either family, whose addresses then match any.
            var sel = info.sel
            if info.flags & XfrmStateFlag.afUnspec != 0 {
                sel.prefixlenD = 0
                sel.prefixlenS = 0
                selector = try Selector(wire: sel)
            } else {
                sel.family = dst.version == 4 ? AddressFamily.inet : AddressFamily.inet6
                let longest: UInt8 = dst.version == 4 ? 32 : 128
                sel.prefixlenD = min(sel.prefixlenD, longest)
                sel.prefixlenS = min(sel.prefixlenS, longest)
                selector = try Selector(wire: sel)
            }
        } else {
            selector = try Selector(wire: info.sel)
        }
        var config = SAConfig(
            id: SAID(destination: dst, spi: info.id.spi, proto: info.id.proto), source: src, selector: selector,
            reqid: info.reqid, mode: info.mode == 1 ? .tunnel : .transport, flags: info.flags,
            lifetime: LifetimeConfig(wire: info.lft), crypto: nil, kmSequence: info.seq)
        var tfcPadGiven = false
        var setMark: UInt32? = nil
        var setMarkMask: UInt32? = nil
        for a in attrs {
            switch a {
            // The kernel keeps and lists an SA's mark with its value masked.
            case .mark(let mk): config.mark = Mark(value: mk.value & mk.mask, mask: mk.mask)
            case .ifID(let v): config.ifID = v
            case .saDir(let d):
                guard let dir = SADirection(rawValue: d) else { throw .invalid("Invalid SA direction \(d)") }
                config.direction = dir
            case .extraFlags(let f): config.extraFlags = f
            case .saPCPU(let n): config.pcpuNum = n
            case .mappingMaxAge(let v): config.mappingMaxAge = v
            case .tfcPad(let v):
                config.tfcPad = v
                tfcPadGiven = true
            case .unknown(let t, let p) where t == XfrmAttributeType.setMark.rawValue && p.count >= 4:
                setMark = leU32(p)
            case .unknown(let t, let p) where t == XfrmAttributeType.setMarkMask.rawValue && p.count >= 4:
                setMarkMask = leU32(p)
            default: break
            }
        }
        // ≈ xfrm_smark_init: a missing mask means all bits.
        if let v = setMark { config.outputMark = Mark(value: v, mask: setMarkMask ?? 0xffff_ffff) }
        if tfcPadGiven && info.mode != 1 { throw .invalid("TFC padding can only be used in tunnel mode") }
        return config
    }

    private func buildSA(_ info: XfrmUserSAInfo, _ attrs: [XfrmAttribute], update: Bool) throws(ControlError)
        -> SecurityAssociation
    {
        var config = try self.baseConfig(info, attrs)
        var aead: XfrmAlgorithm?
        var crypt: XfrmAlgorithm?
        var auth: XfrmAlgorithm?
        var authTrunc: XfrmAlgorithm?
        var replay: XfrmReplayState?
        var replayESN: XfrmReplayStateESN?
        var encap: XfrmEncapTmpl?
        for a in attrs {
            switch a {
            case .algAEAD(let x): aead = x
            case .algCrypt(let x): crypt = x
            case .algAuth(let x): auth = x
            case .algAuthTrunc(let x): authTrunc = x
            case .unknown(let t, _) where t == XfrmAttributeType.algComp.rawValue:
                throw ControlError(Errno.EOPNOTSUPP, "IPComp is not supported")
            case .replay(let r): replay = r
            case .replayESN(let r): replayESN = r
            case .encap(let e): encap = e
            default: break
            }
        }
        // Algorithms: ESP needs AEAD, or encryption (with optional integrity); AEAD excludes the others.
        do throws(AlgorithmError) {
            if let aead {
                guard crypt == nil && auth == nil && authTrunc == nil else {
                    throw AlgorithmError("An AEAD algorithm cannot be combined with enc or auth")
                }
                let spec = try ESPCryptoSpec.aead(name: aead.name, key: aead.key, icvBits: Int(aead.lengthBits))
                config.crypto = spec  // listings read the canonical name, the key and the ICV length from it
            } else if let crypt {
                let a = authTrunc ?? auth
                var trunc: Int? = nil
                // ≈ attach_auth_trunc: a truncation of 0 is the algorithm's default (its icv_truncbits).
                if let t = authTrunc, t.lengthBits != 0 {
                    trunc = Int(t.lengthBits)
                } else if let a, let alg = AuthAlgorithm(name: a.name) {
                    trunc = alg.kernelDefaultTruncationBits
                }
                let spec = try ESPCryptoSpec.cipher(name: crypt.name, key: crypt.key, authName: a?.name,
                                                    authKey: a?.key ?? [], truncationBits: trunc)
                config.crypto = spec  // and the truncation `trunc` the listing shows
            } else {
                throw AlgorithmError("ESP requires an encryption (enc) or AEAD (aead) algorithm")
            }
        } catch {
            var (errno, message) = error.kernelAnswer
            if error.kind == .authNotFound && authTrunc == nil { message = "Requested AUTH algorithm not found" }  // attach_auth
            throw ControlError(errno, message)
        }
        // Replay (≈ verify_replay).
        let esn = info.flags & XfrmStateFlag.esn != 0
        config.esn = esn
        config.replayESNFormat = replayESN != nil
        if let r = replayESN {
            guard r.bitmap.count <= 128 else { throw .invalid("ESN bitmap length must be <= 128") }
            guard info.replayWindow == 0 else {
                throw .invalid("ESN not compatible with legacy replay_window")
            }
            guard Int(r.replayWindow) <= r.bitmap.count * 32 else {
                throw .invalid("ESN replay window is longer than the bitmap")
            }
            if esn && r.replayWindow == 0 && config.direction != .outbound {
                throw .invalid("ESN replay window must be > 0")
            }
            config.replayWindow = Int(r.replayWindow)
            config.inboundSequence = UInt64(r.seqHi) << 32 | UInt64(r.seq)
            config.outboundSequence = UInt64(r.oseqHi) << 32 | UInt64(r.oseq)
            if r.bitmap.contains(where: { $0 != 0 }) { config.replayBitmap = .ring(r.bitmap) }
        } else {
            if esn { throw .invalid("Missing required attribute for ESN") }
            config.replayWindow = min(Int(info.replayWindow), 32)
            if let r = replay {
                config.inboundSequence = UInt64(r.seq)
                config.outboundSequence = UInt64(r.oseq)
                if r.bitmap != 0 { config.replayBitmap = .legacy(r.bitmap) }
            }
        }
        // ≈ verify_newsa_info / verify_mtimer_thresh: the mapping rate limit belongs to a NAT-T input SA.
        if attrs.contains(where: { if case .mappingMaxAge = $0 { true } else { false } }) {
            if encap == nil { throw .invalid("MTIMER_THRESH attribute can only be set on ENCAP states") }
            if config.direction == .outbound {
                throw .invalid("MTIMER_THRESH attribute should not be set on output SA")
            }
        }
        // SA direction rules (≈ verify_newsa_info with XFRMA_SA_DIR, Linux 6.10).
        if config.direction == .outbound {
            if info.flags & (XfrmStateFlag.decapDSCP | XfrmStateFlag.icmp | XfrmStateFlag.wildRecv) != 0 {
                throw .invalid("Flags unsupported for output SA")
            }
            // ≈ verify_replay with XFRMA_SA_DIR (Linux 6.10, the non-ESN limits 6.16): on XFRMA_REPLAY_ESN_VAL only;
            // the legacy XFRMA_REPLAY_VAL is not checked.
            if config.replayWindow != 0 { throw .invalid("Replay window should be 0 for output SA") }
            if let r = replayESN {
                if r.seq != 0 || r.seqHi != 0 { throw .invalid("Replay seq and seq_hi should be 0 for output SA") }
                if !esn && r.oseqHi != 0 {
                    throw .invalid("Replay oseq_hi should be 0 in non-ESN mode for output SA")
                }
                if !esn && r.oseq == UInt32.max {
                    throw .invalid("Replay oseq should be less than 0xFFFFFFFF in non-ESN mode for output SA")
                }
                if esn && r.oseq == UInt32.max && r.oseqHi == UInt32.max {
                    throw .invalid("Replay oseq and oseq_hi should be less than 0xFFFFFFFF for output SA")
                }
                if !r.bitmap.isEmpty { throw .invalid("Replay bmp_len should 0 for output SA") }
            }
        } else if config.direction == .inbound {
            if info.flags & XfrmStateFlag.noPMTUDisc != 0 { throw .invalid("Flag NOPMTUDISC can't be set on input SA") }
            if config.extraFlags & (XfrmStateExtraFlag.dontEncapDSCP | XfrmStateExtraFlag.oseqMayWrap) != 0 {
                throw .invalid("Flags unsupported for input SA")
            }
            if let r = replayESN {
                if r.oseq != 0 || r.oseqHi != 0 { throw .invalid("Replay oseq and oseq_hi should be 0 for input SA") }
                if !esn && r.seqHi != 0 { throw .invalid("Replay seq_hi should be 0 in non-ESN mode for input SA") }
                if !esn && r.seq == UInt32.max {
                    throw .invalid("Replay seq should be less than 0xFFFFFFFF in non-ESN mode for input SA")
                }
                if esn && r.seq == UInt32.max && r.seqHi == UInt32.max {
                    throw .invalid("Replay seq and seq_hi should be less than 0xFFFFFFFF for input SA")
                }
            }
        }
        // ≈ verify_newsa_info (Linux 6.13): a per-CPU SA must say its direction; then xfrm_state_construct: the CPU
        // must exist (ERANGE).
        if let n = config.pcpuNum {
            if config.direction == nil { throw .invalid("SA_PCPU only supported with SA_DIR") }
            if n >= self.stack.possibleCPUs.load(ordering: .relaxed) {
                throw ControlError(Errno.ERANGE, "pCPU number too big")
            }
        }
        if let e = encap {
            // ≈ esp_init_state: ESP-in-UDP (RFC 3948) only; the pre-RFC non-IKE marker format is gone from Linux.
            guard e.type == XfrmEncapType.espInUDP else {
                throw .invalid("Unsupported encapsulation type for ESP")
            }
            config.encapsulation = NATTEncapsulation(sourcePort: e.sport, destinationPort: e.dport)
            config.encapsulationType = e.type
            config.encapsulationOriginalAddress = e.oa.isZero ? nil : e.oa.ip(family: info.family)
        }
        do throws(ESPConfigError) {
            return try self.stack.makeSA(config)
        } catch {
            throw .invalid(error.description)
        }
    }

    /// The offload part of NEWSA/UPDSA (≈ the checks at the top of xfrm_dev_state_add).
    private func offloadRequest(_ sa: SecurityAssociation, _ attrs: [XfrmAttribute]) throws(ControlError)
        -> OffloadRequest?
    {
        guard let o = attrs.lazy.compactMap({ a -> XfrmUserOffload? in
            if case .offloadDevice(let x) = a { return x } else { return nil }
        }).first else { return nil }
        let known = XfrmOffloadFlag.ipv6 | XfrmOffloadFlag.inbound | XfrmOffloadFlag.packet
        guard o.flags & ~known == 0 else { throw .invalid("Unrecognized flags in offload request") }
        let inbound = o.flags & XfrmOffloadFlag.inbound != 0
        if (inbound && sa.config.direction == .outbound) || (!inbound && sa.config.direction == .inbound) {
            throw .invalid("Mismatched SA and offload direction")
        }
        if sa.config.tfcPad != 0 { throw .invalid("TFC padding can't be offloaded") }
        // The promoted device, or no usable ifindex (0, or one the stack does not know: the route decides, and in
        // xfrmd it leads to the NIC) — else a software SA under a promoted policy would only ever ACQUIRE.
        let promoted = self.packetOffloadPromotion.map { dev in
            dev == o.ifindex || o.ifindex == 0
                || self.stack.device(ifindex: o.ifindex) == nil && self.stack.network.interface(index: o.ifindex) == nil
        } ?? false
        return OffloadRequest(ifindex: o.ifindex, direction: inbound ? .inbound : .outbound,
                              type: o.flags & XfrmOffloadFlag.packet != 0 || promoted ? .packet : .crypto)
    }

    // MARK: - Building policies (≈ verify_newpolicy_info + xfrm_policy_construct)

    private func buildPolicy(_ info: XfrmUserPolicyInfo, _ attrs: [XfrmAttribute]) throws(ControlError) -> Policy {
        guard let dir = PolicyDirection(rawValue: info.dir) else { throw .invalid("Invalid policy direction \(info.dir)") }
        guard let action = PolicyAction(rawValue: info.action) else { throw .invalid("Invalid policy action \(info.action)") }
        guard info.share <= 3 else { throw .invalid("Invalid policy share \(info.share)") }
        // ≈ verify_newpolicy_info: a policy selector names its family (iproute2 sends AF_INET when none is given).
        guard info.sel.family == AddressFamily.inet || info.sel.family == AddressFamily.inet6 else {
            throw .invalid("Invalid selector family")
        }
        let selector = try Selector(wire: info.sel)
        var p = Policy(selector: selector, direction: dir, action: action, priority: info.priority, index: info.index,
                       flags: info.flags, lifetime: LifetimeConfig(wire: info.lft))
        for a in attrs {
            switch a {
            case .templates(let ts):
                guard ts.count <= 6 else { throw .invalid("Too many templates (at most 6)") }
                p.templates = try Self.validTemplates(ts, family: info.sel.family, direction: dir)
            case .mark(let m): p.mark = Mark(value: m.value & m.mask, mask: m.mask)  // kept masked, as the kernel lists it
            case .ifID(let v): p.ifID = v
            case .policyType(let t): if t != 0 { throw .invalid("Only the main policy type is supported") }
            case .offloadDevice(let o):
                // A policy's offload must be exactly PACKET: the direction comes from the policy itself.
                guard o.flags == XfrmOffloadFlag.packet else { throw .invalid("Unrecognized flags in offload request") }
                p.offload = PolicyOffload(ifindex: o.ifindex)
            default: break
            }
        }
        // What a packet-offload device can take: one ESP template (not AH, not IPComp before ESP).
        if let dev = self.packetOffloadPromotion, p.offload == nil, action == .allow, p.templates.count == 1,
            p.templates[0].proto == XfrmProto.esp {
            p.offload = PolicyOffload(ifindex: dev)
        }
        return p
    }

    /// ≈ validate_tmpl: tunnel templates may change the family, transport ones may not; an optional tunnel
    /// template makes no sense on output (the packet would leave without its outer header).
    static func validTemplates(_ ts: [XfrmUserTmpl], family: UInt16, direction: PolicyDirection) throws(ControlError)
        -> [Template]
    {
        var out: [Template] = []
        var previous = family
        for t in ts {
            let fam = t.family == 0 ? family : t.family
            if t.mode == 1 {
                if t.optional != 0 && direction == .outbound {
                    throw .invalid("Mode in optional template not allowed in outbound policy")
                }
            } else if t.mode == 0 && fam != previous {
                throw .invalid("Mode in template doesn't support a family change")
            }
            out.append(try Template(wire: t, family: family))
            previous = fam
        }
        return out
    }

    // MARK: - Messages from core objects

    static func stateMessage(_ sa: SecurityAssociation, type: XfrmMessageType, sequence: UInt32 = 0) -> XfrmMessage {
        XfrmMessage(type: type.rawValue, flags: 0, sequence: sequence, body: .saInfo(sa.wireInfo),
                    attributes: sa.wireAttributes)
    }

    func policyMessage(_ p: Policy, type: XfrmMessageType, sequence: UInt32 = 0) -> XfrmMessage {
        XfrmMessage(type: type.rawValue, flags: 0, sequence: sequence,
                    body: .policyInfo(p.wireInfo(lastUse: self.stack.policies.lastUse(index: p.index, direction: p.direction))),
                    attributes: p.wireAttributes())
    }

    /// The multicast message for an event (what `ip xfrm monitor` receives), or nil for swift-xfrm-only events.
    public func message(for event: XfrmEvent) -> XfrmMessage? {
        switch event {
        case .stateAdded(let sa, let update):
            return Self.stateMessage(sa, type: update ? .updSA : .newSA)
        case .stateDeleted(let sa):
            var id = XfrmUserSAID()
            id.daddr = XfrmAddress(sa.id.destination)
            id.spi = sa.id.spi
            id.family = family(of: sa.id.destination)
            id.proto = sa.id.proto
            return XfrmMessage(type: XfrmMessageType.delSA.rawValue, flags: 0, body: .saID(id),
                               attributes: [.sa(sa.wireInfo)] + sa.wireAttributes)
        case .statesFlushed(let proto):
            return XfrmMessage(type: XfrmMessageType.flushSA.rawValue, flags: 0, body: .flushSA(proto: proto))
        case .expire(let sa, let hard):
            // ≈ build_expire: the state, then only its mark, if_id and direction — never keys or algorithms.
            let c = sa.config
            var attrs: [XfrmAttribute] = []
            if c.mark.value != 0 || c.mark.mask != 0 { attrs.append(.mark(XfrmMark(value: c.mark.value, mask: c.mark.mask))) }
            if sa.ifID != 0 { attrs.append(.ifID(sa.ifID)) }
            if let n = c.pcpuNum { attrs.append(.saPCPU(n)) }
            if let d = c.direction { attrs.append(.saDir(d.rawValue)) }
            return XfrmMessage(type: XfrmMessageType.expire.rawValue, flags: 0, body: .expire(sa.wireInfo, hard: hard),
                               attributes: attrs)
        case .acquire(let state, let template, let policy):
            var a = XfrmUserAcquire()
            a.id = XfrmID(daddr: XfrmAddress(state.id.destination), spi: 0, proto: template.proto)
            a.saddr = XfrmAddress(state.config.source)
            a.sel = state.config.selector.wire
            a.policy = policy.wireInfo(lastUse: nil)
            a.aalgos = template.authAlgorithms
            a.ealgos = template.encryptionAlgorithms
            a.calgos = template.compressionAlgorithms
            a.seq = state.config.kmSequence
            // ≈ build_acquire: the CPU a per-CPU acquire asks for.
            let cpu: [XfrmAttribute] = state.config.pcpuNum.map { [.saPCPU($0)] } ?? []
            return XfrmMessage(type: XfrmMessageType.acquire.rawValue, flags: 0, body: .acquire(a),
                               attributes: policy.wireAttributes() + cpu)
        case .policyAdded(let p, let update):
            return self.policyMessage(p, type: update ? .updPolicy : .newPolicy)
        case .policyDeleted(let p):
            var id = XfrmUserPolicyID()
            id.sel = p.selector.wire
            id.index = p.index
            id.dir = p.direction.rawValue
            return XfrmMessage(type: XfrmMessageType.delPolicy.rawValue, flags: 0, body: .policyID(id),
                               attributes: [.policy(p.wireInfo(lastUse: nil))] + p.wireAttributes())
        case .policiesFlushed:
            return XfrmMessage(type: XfrmMessageType.flushPolicy.rawValue, flags: 0, body: .flushPolicy)
        case .policyExpire(let p, let hard):
            return XfrmMessage(type: XfrmMessageType.polExpire.rawValue, flags: 0,
                               body: .policyExpire(p.wireInfo(lastUse: nil), hard: hard), attributes: p.wireAttributes())
        case .mapping(let sa, let newSource, let newPort, let oldPort):
            // ≈ build_mapping.
            var m = XfrmUserMapping()
            m.id.daddr = XfrmAddress(sa.id.destination)
            m.id.spi = sa.id.spi
            m.id.family = family(of: sa.id.destination)
            m.id.proto = sa.id.proto
            m.reqid = sa.config.reqid
            m.oldSaddr = XfrmAddress(sa.config.source)
            m.newSaddr = XfrmAddress(newSource)
            m.oldSport = oldPort
            m.newSport = newPort
            return XfrmMessage(type: XfrmMessageType.mapping.rawValue, flags: 0, body: .mapping(m))
        case .deviceFlushed:
            return nil
        }
    }
}

/// A u32 read from a netlink attribute payload (host byte order).
func leU32(_ p: [UInt8]) -> UInt32 {
    UInt32(p[0]) | UInt32(p[1]) << 8 | UInt32(p[2]) << 16 | UInt32(p[3]) << 24
}
