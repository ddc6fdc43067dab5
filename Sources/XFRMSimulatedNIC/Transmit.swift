// The TX engine: what the device does with a packet the host handed it (≈ the NIC's send path with its IPsec
// steering tables).
//
//   crypto offload (metadata.cryptLength > 0): the host built ESP and left the payload in clear and the ICV
//     empty → find the SA by handle → seal in place → wire.
//   packet offload (anything else): classify the plaintext with the device's OUT policies → no match: the packet
//     goes out as is; block: drop; a template: find the device's SA for it → none / expired: drop; else the
//     device's transform encapsulates (the device numbers the packet) → account, enforce the hard limit, raise
//     limit events → wire.

import XFRMCore
import XFRMESP
import XFRMPacket

extension NICCore {
    @inline(__always)
    func transmitOne(_ buffer: PacketBuffer, metadata: OffloadMetadata, hooks: Hooks, snapshot: TableSnapshot) {
        if metadata.cryptLength > 0 {
            self.sealCryptoOffload(buffer, metadata: metadata, hooks: hooks, snapshot: snapshot)
        } else if metadata.handle != 0 {
            // Packet offload with the SA the host resolved (≈ the xfrm_state the skb carries): the device encrypts
            // with exactly that SA or drops — it never falls back to sending the plaintext.
            guard let e = snapshot.entry(handle: metadata.handle), e.type == .packet,
                !e.deleted.load(ordering: .acquiring)
            else {
                self.pool.release(buffer)
                self.counters.txDrop(.txNoState)
                return
            }
            self.encapsulate(buffer, sa: e, hooks: hooks)
        } else {
            self.transmitPacketOffload(buffer, hooks: hooks, snapshot: snapshot)
        }
    }

    // MARK: - Crypto offload

    /// Seals the ESP the host built: `espOffset` names the ESP header, `cryptLength` the bytes after the IV to
    /// encrypt; the ICV goes right behind them (layout of ESPCipher).
    @inline(__always)
    private func sealCryptoOffload(
        _ buffer: PacketBuffer, metadata m: OffloadMetadata, hooks: Hooks, snapshot: TableSnapshot
    ) {
        guard let e = snapshot.entry(handle: m.handle), e.type == .crypto else {
            self.pool.release(buffer)
            self.counters.txDrop(.txNoState)
            return
        }
        let n = buffer.count
        enum Outcome {
            case sealed
            case gone
            case bad
        }
        let outcome: Outcome = e.state.withLock { s in
            guard !e.deleted.load(ordering: .acquiring), let c = s.cipher?.cipher else { return .gone }
            let offset = m.espOffset
            guard offset >= 0, m.cryptLength >= 2, offset + 8 + c.ivLength + m.cryptLength + c.icvLength <= n,
                c.blockSize <= 4 || m.cryptLength % c.blockSize == 0
            else { return .bad }
            let esp = buffer.data + offset
            guard c.seal(esp: esp, cryptLength: m.cryptLength, esnHigh: m.esnHigh) else { return .bad }
            s.counters.packets &+= 1
            s.counters.bytes &+= UInt64(n)
            s.counters.outboundSequence = UInt64(m.esnHigh ?? 0) << 32 | UInt64(esp.loadBE32(at: 4))
            return .sealed
        }
        switch outcome {
        case .sealed:
            self.counters.add(.cryptoTX)
            self.putOnWire(buffer, hooks: hooks)
        case .gone:
            self.pool.release(buffer)
            self.counters.txDrop(.txNoState)
        case .bad:
            self.pool.release(buffer)
            self.counters.txDrop(.txErrors)
        }
    }

    // MARK: - Packet offload

    @inline(__always)
    private func transmitPacketOffload(_ buffer: PacketBuffer, hooks: Hooks, snapshot: TableSnapshot) {
        guard !snapshot.outPolicies.isEmpty,
            let flow = Flow.parse(buffer.data, count: buffer.count, ifindex: self.ifindex)
        else {
            self.putOnWire(buffer, hooks: hooks)
            return
        }
        var policy: PolicyEntry? = nil
        for p in snapshot.outPolicies where p.selector.matches(flow) {
            policy = p
            break
        }
        guard let policy else {
            self.putOnWire(buffer, hooks: hooks)  // not IPsec traffic: out as is
            return
        }
        guard policy.action == .allow else {
            self.pool.release(buffer)
            self.counters.txDrop(.txPolicyBlock)
            return
        }
        guard let template = policy.template else {
            self.putOnWire(buffer, hooks: hooks)  // a bypass policy
            return
        }
        // The newest usable SA for the template; an expired one only as a last resort (then the packet drops).
        var chosen: SAEntry? = nil
        var expired: SAEntry? = nil
        for e in snapshot.tx where e.serves(template, flow: flow) {
            if e.expired.load(ordering: .relaxed) {
                if expired == nil { expired = e }
                continue
            }
            chosen = e
            break
        }
        guard let sa = chosen else {
            if expired == nil && template.optional {
                self.putOnWire(buffer, hooks: hooks)  // `level use`: no SA, no protection required
                return
            }
            self.pool.release(buffer)
            self.counters.txDrop(expired != nil ? .txExpired : .txNoState)
            return
        }
        self.encapsulate(buffer, sa: sa, hooks: hooks)
    }

    @inline(__always)
    private func encapsulate(_ buffer: PacketBuffer, sa: SAEntry, hooks: Hooks) {
        enum Outcome {
            case sent(SAEntryState.LimitCrossing)
            case gone
            case expired
            case failed
        }
        var packet = buffer
        let length = packet.count
        let limits = sa.lifetime
        let outcome: Outcome = sa.state.withLock { s in
            guard !sa.deleted.load(ordering: .acquiring), let t = s.transform else { return .gone }
            if s.hardReached(limits) {
                sa.expired.store(true, ordering: .relaxed)
                return .expired
            }
            if t.encapsulate(&packet) != nil { return .failed }
            s.counters.outboundSequence = t.outboundSequence
            let crossing = s.account(bytes: length, limits: limits, enforce: true)
            if crossing == .hard { sa.expired.store(true, ordering: .relaxed) }
            return .sent(crossing)
        }
        switch outcome {
        case .sent(let crossing):
            self.counters.add(.espTX)
            self.putOnWire(packet, hooks: hooks)
            self.raise(crossing, sa, hooks: hooks)
        case .gone:
            self.pool.release(packet)
            self.counters.txDrop(.txNoState)
        case .expired:
            self.pool.release(packet)
            self.counters.txDrop(.txExpired)
        case .failed:
            self.pool.release(packet)
            self.counters.txDrop(.txErrors)
        }
    }
}
