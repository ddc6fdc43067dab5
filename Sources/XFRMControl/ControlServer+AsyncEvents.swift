import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMWire

/// XFRM_MSG_GETAE and NEWAE (≈ xfrm_get_ae, xfrm_new_ae): what strongSwan's update_sa reads before it moves an SA
/// to new addresses (the replay state and curlft) and hands back on the new SA.
extension XfrmControlServer {
    /// ≈ xfrm_get_ae + build_aevent: the SA's id, source and reqid, the request's flags, its replay state and
    /// curlft, the thresholds the flags ask for, its mark and if_id.
    func getAE(_ a: XfrmAEventID, _ m: XfrmMessage) throws(ControlError) -> [XfrmMessage] {
        let sa = try self.findSA(a.saID, m)
        return [Self.aeventMessage(sa, flags: a.flags, sequence: m.sequence)]
    }

    static func aeventMessage(_ sa: SecurityAssociation, flags: UInt32, sequence: UInt32) -> XfrmMessage {
        let c = sa.config
        var id = XfrmAEventID()
        id.saID.daddr = XfrmAddress(c.id.destination)
        id.saID.spi = c.id.spi
        id.saID.family = c.id.destination.version == 4 ? AddressFamily.inet : AddressFamily.inet6
        id.saID.proto = c.id.proto
        id.saddr = XfrmAddress(c.source)
        id.reqid = c.reqid
        id.flags = flags
        var attrs: [XfrmAttribute] = [sa.replayAttribute, .lifetimeValue(sa.current.wire)]
        let t = sa.eventThresholds
        if flags & XfrmAEFlag.replayThreshold != 0 { attrs.append(.replayThreshold(t.replayMaxDiff)) }
        if flags & XfrmAEFlag.timerThreshold != 0 { attrs.append(.timerThreshold(t.replayMaxAgeTenths)) }
        if c.mark.value != 0 || c.mark.mask != 0 { attrs.append(.mark(XfrmMark(value: c.mark.value, mask: c.mark.mask))) }
        if sa.ifID != 0 { attrs.append(.ifID(sa.ifID)) }
        return XfrmMessage(type: XfrmMessageType.newAE.rawValue, flags: 0, sequence: sequence, body: .aevent(id),
                           attributes: attrs)
    }

    /// ≈ xfrm_new_ae: with NLM_F_REPLACE and at least one of the replay state, curlft or a threshold, on a valid
    /// SA, checked whole before anything is applied (xfrm_replay_verify_len), then applied under the SA's lock.
    func newAE(_ a: XfrmAEventID, _ m: XfrmMessage) throws(ControlError) {
        var replay: XfrmReplayState?
        var replayESN: XfrmReplayStateESN?
        var lifetime: XfrmLifetimeCur?
        var maxDiff: UInt32?
        var maxAge: UInt32?
        for attr in m.attributes {
            switch attr {
            case .replay(let r): replay = r
            case .replayESN(let r): replayESN = r
            case .lifetimeValue(let l): lifetime = l
            case .replayThreshold(let v): maxDiff = v
            case .timerThreshold(let v): maxAge = v
            default: continue
            }
        }
        guard replay != nil || replayESN != nil || lifetime != nil || maxDiff != nil || maxAge != nil else {
            throw .invalid("Missing required attribute for AE")
        }
        guard m.flags & NetlinkFlags.replace != 0 else { throw .invalid("NLM_F_REPLACE flag is required") }
        let sa = try self.findSA(a.saID, m)
        guard sa.state == .valid else { throw .invalid("SA must be in VALID state") }
        let c = sa.config
        // The kernel copies XFRMA_REPLAY_ESN_VAL into an SA that keeps its state in that form, XFRMA_REPLAY_VAL into
        // x->replay, which only an SA without it uses.
        var restored: SecurityAssociation.RestoredReplay? = nil
        if c.usesReplayESN, let r = replayESN {
            let words = (c.replayWindow + 31) / 32
            guard r.bitmap.count == words else {
                throw .invalid("New ESN bitmap size doesn't match the existing SA's ESN bitmap")
            }
            guard Int(r.replayWindow) <= r.bitmap.count * 32 else {
                throw .invalid("ESN replay window is longer than the bitmap")
            }
            guard Int(r.replayWindow) == c.replayWindow else {
                throw .invalid("The replay window of an SA cannot be changed")  // the kernel copies it: not supported
            }
            restored = .init(inboundTop: UInt64(r.seqHi) << 32 | UInt64(r.seq),
                             bitmap: r.bitmap.contains { $0 != 0 } ? .ring(r.bitmap) : nil,
                             outboundSequence: UInt64(r.oseqHi) << 32 | UInt64(r.oseq))
        } else if !c.usesReplayESN, let r = replay {
            restored = .init(inboundTop: UInt64(r.seq), bitmap: r.bitmap != 0 ? .legacy(r.bitmap) : nil,
                             outboundSequence: UInt64(r.oseq))
        }
        if let restored {
            do throws(SecurityAssociation.RestoreRefusal) {
                try sa.restore(restored)
            } catch {
                throw .invalid("The outbound sequence number cannot go back (it would reuse nonces)")
            }
        }
        if let l = lifetime {
            sa.setCurrentLifetime(LifetimeCurrent(l))
        }
        sa.setEventThresholds(replayMaxDiff: maxDiff, replayMaxAge: maxAge)
    }
}
