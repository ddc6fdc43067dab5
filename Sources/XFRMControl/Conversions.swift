// Translations between the user API's wire structs and the core's types (≈ xfrm_user.c's copy_* helpers).

import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMWire

/// A user-API error: errno plus the extack text the command prints.
public typealias ControlError = XFRMError

extension Selector {
    /// xfrm_selector → Selector, validating family and prefix lengths (≈ verify_newpolicy_info's selector part).
    init(wire s: XfrmSelector) throws(ControlError) {
        let family: Int
        switch s.family {
        case AddressFamily.inet: family = 4
        case AddressFamily.inet6: family = 6
        case AddressFamily.unspec: family = 0
        default: throw .invalid("Invalid selector family \(s.family)")
        }
        let maxLen = family == 6 ? 128 : 32
        guard Int(s.prefixlenD) <= maxLen, Int(s.prefixlenS) <= maxLen else {
            throw .invalid("Invalid prefix length in selector")
        }
        if family == 0 && (s.prefixlenD != 0 || s.prefixlenS != 0) {
            throw .invalid("Selector with an address needs an address family")
        }
        let v = family == 6 ? 6 : 4
        let fam = UInt16(v == 6 ? AddressFamily.inet6 : AddressFamily.inet)
        self.init(
            family: family, source: IPPrefix(s.saddr.ip(family: fam)!, length: s.prefixlenS),
            destination: IPPrefix(s.daddr.ip(family: fam)!, length: s.prefixlenD), proto: s.proto,
            sourcePort: s.sport, sourcePortMask: s.sportMask, destinationPort: s.dport,
            destinationPortMask: s.dportMask, ifindex: s.ifindex, user: s.user)
    }

    var wire: XfrmSelector {
        var s = XfrmSelector()
        s.family = self.family == 4 ? AddressFamily.inet : self.family == 6 ? AddressFamily.inet6 : AddressFamily.unspec
        // A family-less selector may still name addresses: a larval SA from ALLOCSPI has its two (xfrm_find_acq).
        s.daddr = XfrmAddress(self.destination.address)
        s.saddr = XfrmAddress(self.source.address)
        s.prefixlenD = self.destination.length
        s.prefixlenS = self.source.length
        s.proto = self.proto
        s.sport = self.sourcePort
        s.sportMask = self.sourcePortMask
        s.dport = self.destinationPort
        s.dportMask = self.destinationPortMask
        s.ifindex = self.ifindex
        s.user = self.user
        return s
    }
}

extension LifetimeCurrent {
    /// curlft as XFRMA_LTIME_VAL and xfrm_usersa_info carry it.
    init(_ l: XfrmLifetimeCur) {
        self.init()
        self.bytes = l.bytes
        self.packets = l.packets
        self.addTime = l.addTime
        self.useTime = l.useTime
    }

    var wire: XfrmLifetimeCur {
        var c = XfrmLifetimeCur()
        c.bytes = self.bytes
        c.packets = self.packets
        c.addTime = self.addTime
        c.useTime = self.useTime
        return c
    }
}

extension LifetimeConfig {
    init(wire l: XfrmLifetimeCfg) {
        self.init()
        self.softByteLimit = l.softByteLimit
        self.hardByteLimit = l.hardByteLimit
        self.softPacketLimit = l.softPacketLimit
        self.hardPacketLimit = l.hardPacketLimit
        self.softAddExpiresSeconds = l.softAddExpiresSeconds
        self.hardAddExpiresSeconds = l.hardAddExpiresSeconds
        self.softUseExpiresSeconds = l.softUseExpiresSeconds
        self.hardUseExpiresSeconds = l.hardUseExpiresSeconds
    }

    var wire: XfrmLifetimeCfg {
        var l = XfrmLifetimeCfg()
        l.softByteLimit = self.softByteLimit
        l.hardByteLimit = self.hardByteLimit
        l.softPacketLimit = self.softPacketLimit
        l.hardPacketLimit = self.hardPacketLimit
        l.softAddExpiresSeconds = self.softAddExpiresSeconds
        l.hardAddExpiresSeconds = self.hardAddExpiresSeconds
        l.softUseExpiresSeconds = self.softUseExpiresSeconds
        l.hardUseExpiresSeconds = self.hardUseExpiresSeconds
        return l
    }
}

func family(of a: IPAddress) -> UInt16 { a.version == 4 ? AddressFamily.inet : AddressFamily.inet6 }

extension Template {
    /// One xfrm_user_tmpl; `family` is the family it takes when it names none (≈ validate_tmpl: the policy's).
    init(wire t: XfrmUserTmpl, family selectorFamily: UInt16) throws(ControlError) {
        let fam = t.family == 0 ? selectorFamily : t.family
        guard t.mode <= 1 else { throw .invalid("Unsupported template mode \(t.mode)") }
        guard fam == AddressFamily.inet || fam == AddressFamily.inet6 else {
            throw .invalid("Invalid family in template")
        }
        guard [XfrmProto.esp, XfrmProto.ah, XfrmProto.comp].contains(t.id.proto) else {
            throw .invalid("Invalid XFRM protocol in template")
        }
        self.init(
            source: t.saddr.isZero ? nil : t.saddr.ip(family: fam),
            destination: t.id.daddr.isZero ? nil : t.id.daddr.ip(family: fam), spi: t.id.spi, proto: t.id.proto,
            mode: t.mode, reqid: t.reqid, optional: t.optional != 0, share: t.share, authAlgorithms: t.aalgos,
            encryptionAlgorithms: t.ealgos, compressionAlgorithms: t.calgos,
            family: fam == AddressFamily.inet6 ? 6 : 4)
    }

    func wire(defaultFamily: UInt16) -> XfrmUserTmpl {
        var t = XfrmUserTmpl()
        t.id.daddr = self.destination.map(XfrmAddress.init) ?? XfrmAddress()
        t.id.spi = self.spi
        t.id.proto = self.proto
        t.family = self.family == 6 ? AddressFamily.inet6 : self.family == 4 ? AddressFamily.inet
            : self.destination.map(family(of:)) ?? self.source.map(family(of:)) ?? defaultFamily
        t.saddr = self.source.map(XfrmAddress.init) ?? XfrmAddress()
        t.reqid = self.reqid
        t.mode = self.mode
        t.share = self.share
        t.optional = self.optional ? 1 : 0
        t.aalgos = self.authAlgorithms
        t.ealgos = self.encryptionAlgorithms
        t.calgos = self.compressionAlgorithms
        return t
    }
}

extension Policy {
    /// The wire form of a policy: NEWPOLICY body and attributes (≈ copy_to_user_policy + copy_to_user_tmpl).
    func wireInfo(lastUse: UInt64?) -> XfrmUserPolicyInfo {
        var p = XfrmUserPolicyInfo()
        p.sel = self.selector.wire
        p.lft = self.lifetime.wire
        p.curlft.addTime = self.addTime
        p.curlft.useTime = lastUse ?? 0
        p.priority = self.priority
        p.index = self.index
        p.dir = self.direction.rawValue
        p.action = self.action.rawValue
        p.flags = self.flags
        return p
    }

    func wireAttributes() -> [XfrmAttribute] {
        var attrs: [XfrmAttribute] = []
        let fam: UInt16 = self.selector.family == 6 ? AddressFamily.inet6 : AddressFamily.inet
        if !self.templates.isEmpty { attrs.append(.templates(self.templates.map { $0.wire(defaultFamily: fam) })) }
        // ≈ copy_to_user_policy_type on kernels built with CONFIG_XFRM_SUB_POLICY (Debian's and this machine's):
        // every policy message says its type, and iproute2 prints `ptype main`.
        attrs.append(.policyType(0))
        if self.mark.value != 0 || self.mark.mask != 0 {
            attrs.append(.mark(XfrmMark(value: self.mark.value, mask: self.mark.mask)))
        }
        if self.ifID != 0 { attrs.append(.ifID(self.ifID)) }
        if let o = self.offload { attrs.append(.offloadDevice(XfrmUserOffload(ifindex: o.ifindex, flags: XfrmOffloadFlag.packet))) }
        return attrs
    }
}

extension SecurityAssociation {
    /// xfrm_usersa_info of this SA (≈ copy_to_user_state).
    var wireInfo: XfrmUserSAInfo {
        let c = self.config
        var s = XfrmUserSAInfo()
        s.sel = c.selector.wire
        s.id = XfrmID(daddr: XfrmAddress(c.id.destination), spi: c.id.spi, proto: c.id.proto)
        s.saddr = XfrmAddress(c.source)
        s.lft = self.lifetime.wire
        s.curlft = self.current.wire
        let st = self.stats
        s.stats.replayWindow = UInt32(truncatingIfNeeded: st.replayWindow)
        s.stats.replay = UInt32(truncatingIfNeeded: st.replay)
        s.stats.integrityFailed = UInt32(truncatingIfNeeded: st.failed)
        s.seq = c.kmSequence
        s.reqid = c.reqid
        s.family = family(of: c.id.destination)
        s.mode = c.mode == .tunnel ? 1 : 0
        // ≈ x->props.replay_window: the legacy field as given — 0 when the window came in XFRMA_REPLAY_ESN_VAL.
        s.replayWindow = c.usesReplayESN ? 0 : UInt8(min(c.replayWindow, 32))
        s.flags = c.flags
        return s
    }

    /// The kernel's attributes for this SA (≈ copy_to_user_state_extra).
    var wireAttributes: [XfrmAttribute] {
        let c = self.config
        var attrs: [XfrmAttribute] = []
        if c.extraFlags != 0 { attrs.append(.extraFlags(c.extraFlags)) }
        let last = self.lastUsed
        if last != 0 { attrs.append(.lastUsed(last)) }
        // The algorithms by their canonical names, as copy_to_user_state_extra lists them: AEAD; or authentication
        // (XFRMA_ALG_AUTH and XFRMA_ALG_AUTH_TRUNC) and encryption.
        switch c.crypto {
        case .aead(let alg, let key, let icvBits)?:
            attrs.append(.algAEAD(XfrmAlgorithm(name: alg.name, key: key.bytes, lengthBits: UInt32(icvBits))))
        case .cipher(let alg, let key, let auth, let authKey, let truncationBits)?:
            if let auth {
                let k = authKey?.bytes ?? []
                attrs.append(.algAuth(XfrmAlgorithm(name: auth.name, key: k)))
                attrs.append(.algAuthTrunc(XfrmAlgorithm(name: auth.name, key: k, lengthBits: UInt32(truncationBits))))
            }
            attrs.append(.algCrypt(XfrmAlgorithm(name: alg.name, key: key.bytes)))
        case nil:
            break
        }
        if let e = self.encapsulation {
            var t = XfrmEncapTmpl()
            t.type = c.encapsulationType
            t.sport = e.sourcePort
            t.dport = e.destinationPort
            t.oa = c.encapsulationOriginalAddress.map(XfrmAddress.init) ?? XfrmAddress()
            attrs.append(.encap(t))
        }
        if c.tfcPad != 0 { attrs.append(.tfcPad(c.tfcPad)) }
        if c.mark.value != 0 || c.mark.mask != 0 { attrs.append(.mark(XfrmMark(value: c.mark.value, mask: c.mark.mask))) }
        if let m = self.outputMark, m.value != 0 || m.mask != 0 {  // ≈ xfrm_smark_put
            attrs.append(.unknown(type: XfrmAttributeType.setMark.rawValue, payload: leU32(m.value)))
            attrs.append(.unknown(type: XfrmAttributeType.setMarkMask.rawValue, payload: leU32(m.mask)))
        }
        attrs.append(self.replayAttribute)
        if let o = self.offload {
            var flags: UInt8 = 0
            if o.direction == .inbound { flags |= XfrmOffloadFlag.inbound }
            if o.type == .packet { flags |= XfrmOffloadFlag.packet }
            attrs.append(.offloadDevice(XfrmUserOffload(ifindex: o.ifindex, flags: flags)))
        }
        if self.ifID != 0 { attrs.append(.ifID(self.ifID)) }
        if c.mappingMaxAge != 0 { attrs.append(.mappingMaxAge(c.mappingMaxAge)) }  // ≈ copy_to_user_state_extra
        if let n = c.pcpuNum { attrs.append(.saPCPU(n)) }
        if let d = c.direction { attrs.append(.saDir(d.rawValue)) }
        return attrs
    }

    /// XFRMA_REPLAY_VAL (legacy, window ≤ 32 without ESN) or XFRMA_REPLAY_ESN_VAL, with our window's state.
    var replayAttribute: XfrmAttribute {
        let c = self.config
        var oseq: UInt64 = 0
        var top: UInt64 = 0
        var window: ReplayWindow? = nil
        if self.offload?.type == .packet {
            // The device owns sequence numbers and the window; show its view.
            let d = self.deviceCounters
            oseq = d.outboundSequence
            top = d.inboundSequence
        } else if let t = self.transform {
            self.withLock {
                oseq = t.outboundSequence
                top = t.replay.top
                window = t.replay
            }
        }  // a larval SA (no transform) has sent and received nothing: 0, as the kernel lists it
        if c.usesReplayESN {
            var r = XfrmReplayStateESN()
            r.oseq = UInt32(truncatingIfNeeded: oseq)
            r.oseqHi = UInt32(truncatingIfNeeded: oseq >> 32)
            r.seq = UInt32(truncatingIfNeeded: top)
            r.seqHi = UInt32(truncatingIfNeeded: top >> 32)
            r.replayWindow = UInt32(c.replayWindow)
            r.bitmap = window?.ringBitmap ?? [UInt32](repeating: 0, count: (c.replayWindow + 31) / 32)
            return .replayESN(r)
        }
        var r = XfrmReplayState()
        r.oseq = UInt32(truncatingIfNeeded: oseq)
        r.seq = UInt32(truncatingIfNeeded: top)
        r.bitmap = window?.legacyBitmap ?? 0
        return .replay(r)
    }
}

/// A u32 attribute payload in host (netlink) byte order.
func leU32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
