// The control path (≈ the driver's xfrmdev_ops): programming SAs and policies into the device tables, with the
// checks a driver makes where the kernel leaves them to it (mlx5's mlx5e_xfrm_validate_state/validate_policy,
// netdevsim's table limit), each with an extack-style message.

import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket

let EINVAL: Int32 = 22
let ENOSPC: Int32 = 28
let EOPNOTSUPP: Int32 = 95

extension NICCore {
    // MARK: - SAs

    /// ≈ xdo_dev_state_add: validate, build the device's own crypto state, take a slot. Returns the handle.
    func stateAdd(_ sa: SecurityAssociation, offload: StateOffload) throws(DeviceError) -> UInt64 {
        self.calls.withLock { $0.record(.stateAdd(spi: sa.id.spi)) }
        let c = sa.currentConfig  // ≈ the whole xfrm_state a driver is handed
        guard self.modes.contains(offload.type) else {
            throw DeviceError(EOPNOTSUPP, "Device \(self.name) does not support \(offload.type.name) offload")
        }
        // A larval SA of a packet-offload acquire (XFRM_DEV_OFFLOAD_FLAG_ACQ): like mlx5, accept it without
        // validation and program nothing (handle 0 finds no table entry on delete/free).
        if offload.acquire { return 0 }
        try self.validate(c, offload: offload)
        // An injected fault (Faults.swift) refuses the command before anything is programmed; a timed-out add is
        // unwound by the driver, so every failure leaves the tables as they were.
        try self.checkFault(.stateAdd, "SA")

        var transform: ESPTransform? = nil
        var cipher: DeviceCipher? = nil
        if let crypto = c.crypto {
            switch offload.type {
            case .packet:
                do {
                    transform = try ESPTransform(NICCore.espConfig(c, crypto: crypto), backend: OpenSSLBackend())
                } catch {
                    throw DeviceError(EINVAL, "Device failed to program the SA: \(error.description)")
                }
            case .crypto:
                do {
                    cipher = DeviceCipher(try OpenSSLBackend().makeCipher(crypto))
                } catch {
                    throw DeviceError(EINVAL, "Device failed to program the SA: \(error.description)")
                }
            }
        }
        let added: UInt64? = self.tables.withLock { t in
            self.releaseStuckSlots(&t)
            guard let slot = t.sas.firstIndex(where: { $0 == nil }) else { return nil }
            let order = t.nextOrder
            t.nextOrder += 1
            let handle = (order & 0xffff_ffff) << 32 | 1 << 31 | UInt64(slot)
            t.sas[slot] = SAEntry(
                slot: slot, handle: handle, order: order, config: c, offload: offload, transform: transform,
                cipher: cipher)
            t.rebuild()
            return handle
        }
        guard let added else {
            let table = offload.direction == .inbound ? "Rx" : "Tx"
            throw DeviceError(ENOSPC, "No space for SA in \(table) table!")
        }
        return added
    }

    /// The checks, in the order a driver makes them; the first failure is reported.
    func validate(_ c: SAConfig, offload: StateOffload) throws(DeviceError) {
        guard self.modes.contains(offload.type) else {
            throw DeviceError(EOPNOTSUPP, "Device \(self.name) does not support \(offload.type.name) offload")
        }
        guard offload.direction != .forward else {
            throw DeviceError(EINVAL, "Cannot offload xfrm state in the forward direction")
        }
        guard c.id.proto == IPProtocolNumber.esp else {
            throw DeviceError(EINVAL, "Only ESP xfrm state may be offloaded")
        }
        guard c.tfcPad == 0 else {
            throw DeviceError(EINVAL, "TFC padding can't be offloaded")
        }
        if let crypto = c.crypto, let refusal = self.algorithms.refusal(crypto) {
            throw DeviceError(EINVAL, refusal)  // as mlx5: EINVAL, so crypto offload fails too (no fallback)
        }
        if let crypto = c.crypto {
            switch crypto {
            case .aead:
                break  // with the permissive default: AES-GCM, ChaCha20-Poly1305, AES-GMAC all in silicon
            case .cipher(let enc, _, let auth, _, _):
                guard enc == .aesCBC else {
                    throw DeviceError(EINVAL, "Cannot offload xfrm states with null encryption")
                }
                guard auth != nil else {
                    throw DeviceError(EINVAL, "Cannot offload xfrm states without authentication")
                }
            }
        }
        guard offload.type == .packet else { return }
        guard c.reqid != 0 else {
            throw DeviceError(EINVAL, "Cannot offload without reqid")
        }
        if offload.direction == .inbound && c.replayWindow != 0 && ![32, 64, 128, 256].contains(c.replayWindow) {
            throw DeviceError(EINVAL, "Unsupported replay window size")
        }
        let l = c.lifetime
        if l.hardByteLimit != .max && l.softByteLimit >= l.hardByteLimit {
            throw DeviceError(EINVAL, "Hard byte limit must be greater than soft one")
        }
        if l.hardPacketLimit != .max && l.softPacketLimit >= l.hardPacketLimit {
            throw DeviceError(EINVAL, "Hard packet limit must be greater than soft one")
        }
        if l.softByteLimit == 0 || l.hardByteLimit == 0 {
            throw DeviceError(EINVAL, "Soft/hard byte limits can't be 0")
        }
        if l.softPacketLimit == 0 || l.hardPacketLimit == 0 {
            throw DeviceError(EINVAL, "Soft/hard packet limits can't be 0")
        }
    }

    /// The ESP configuration of an SA, as the core builds it (same flag mapping).
    static func espConfig(_ c: SAConfig, crypto: ESPCryptoSpec) -> ESPConfig {
        var flags: ESPFlags = []
        if c.flags & 1 != 0 { flags.insert(.noECN) }
        if c.flags & 2 != 0 { flags.insert(.decapDSCP) }
        if c.flags & 4 != 0 { flags.insert(.noPMTUDiscovery) }
        if c.extraFlags & 1 != 0 { flags.insert(.dontEncapDSCP) }
        if c.extraFlags & 2 != 0 { flags.insert(.outboundSequenceMayWrap) }
        return ESPConfig(
            spi: c.id.spi, mode: c.mode, crypto: crypto, tunnelSource: c.source, tunnelDestination: c.id.destination,
            encapsulation: c.encapsulation, esn: c.esn, replayWindow: c.replayWindow, flags: flags,
            outboundSequence: c.outboundSequence, inboundSequence: c.inboundSequence, inboundBitmap: c.replayBitmap)
    }

    /// ≈ xdo_dev_state_delete: the SA stops matching traffic at once; its slot is held until stateFree.
    func stateDelete(_ sa: SecurityAssociation, offload: StateOffload) {
        self.calls.withLock { $0.record(.stateDelete(spi: sa.id.spi)) }
        self.tables.withLock { t in
            guard let e = t.find(handle: offload.handle, sa: sa, direction: offload.direction) else { return }
            e.deleted.store(true, ordering: .releasing)
            t.rebuild()
        }
    }

    /// ≈ xdo_dev_state_free: releases the slot and drops the keyed state (keys are wiped with it).
    func stateFree(_ sa: SecurityAssociation, offload: StateOffload) {
        self.calls.withLock { $0.record(.stateFree(spi: sa.id.spi)) }
        let freed: SAEntry? = self.tables.withLock { t in
            guard let e = t.find(handle: offload.handle, sa: sa, direction: offload.direction) else { return nil }
            e.deleted.store(true, ordering: .releasing)
            // The hardware would not release the slot: the entry carries no traffic and is released later.
            if !self.releaseFails(.stateFree, slot: e.slot) { t.sas[e.slot] = nil }
            t.rebuild()
            return e
        }
        freed?.wipe()
        self.faults.withLock { _ = $0.lastStats.removeValue(forKey: offload.handle) }
    }

    /// ≈ xdo_dev_state_update_stats: the device's counts for the SA (zero if the device does not know it).
    func updateStats(_ sa: SecurityAssociation, offload: StateOffload) -> DeviceSACounters {
        self.calls.withLock { $0.record(.updateStats(spi: sa.id.spi)) }
        guard let e = self.tables.withLock({ $0.find(handle: offload.handle, sa: sa, direction: offload.direction) })
        else { return self.reportStats(handle: offload.handle) { DeviceSACounters() } }
        // Take the core's current limits (an `update` may have changed them); a raised hard limit revives traffic.
        let limits = sa.lifetime
        e.lifetimeBox.withLock { $0 = limits }
        return self.reportStats(handle: offload.handle) { e.state.withLock { s in
            if !s.hardReached(limits) {
                e.expired.store(false, ordering: .relaxed)
                s.hardRaised = false
            }
            if s.counters.bytes < limits.softByteLimit && s.counters.packets < limits.softPacketLimit {
                s.softRaised = false  // raised limits: the next crossing raises its event again
            }
            return s.counters
        } }
    }

    /// The counters of the SA a handle names (tests and tools).
    func counters(handle: UInt64) -> DeviceSACounters? {
        let e: SAEntry? = self.tables.withLock { t in
            let slot = Int(handle & 0x7fff_ffff)
            guard slot < t.sas.count, let e = t.sas[slot], e.handle == handle else { return nil }
            return e
        }
        return e?.state.withLock { $0.counters }
    }

    /// ≈ xdo_dev_state_advance_esn: the device tracks ESN itself, so this is only counted.
    func advanceESN(_ sa: SecurityAssociation, offload: StateOffload) {
        self.calls.withLock { $0.record(.advanceESN(spi: sa.id.spi)) }
    }

    /// ≈ xdo_dev_offload_ok (mlx5's rule): no IPv4 options, no IPv6 extension headers, and an SA the device
    /// still holds.
    func offloadOK(_ packet: PacketBuffer, sa: SecurityAssociation, offload: StateOffload) -> Bool {
        self.offloadOKCalls.wrappingAdd(1, ordering: .relaxed)  // per packet: counted without a lock
        let known = self.tables.withLock { t in
            t.find(handle: offload.handle, sa: sa, direction: offload.direction).map { $0.live } ?? false
        }
        guard known, packet.count >= 1 else { return false }
        let p = packet.data
        switch p.loadByte(at: 0) >> 4 {
        case 4:
            return packet.count >= HeaderSize.ipv4Minimum && p.loadByte(at: 0) & 0x0f == 5
        case 6:
            return packet.count >= HeaderSize.ipv6 && !IPv6Header.isExtensionHeader(p.loadByte(at: 6))
        default:
            return false
        }
    }

    // MARK: - Policies

    /// ≈ xdo_dev_policy_add (packet offload only).
    func policyAdd(_ policy: Policy) throws(DeviceError) {
        self.calls.withLock { $0.record(.policyAdd(policy.direction)) }
        guard self.modes.contains(.packet) else {
            throw DeviceError(EOPNOTSUPP, "Device \(self.name) does not support packet offload")
        }
        guard policy.templates.count <= 1 else {
            throw DeviceError(EINVAL, "Cannot offload policy with more than one template")
        }
        guard policy.direction != .forward || self.supportsForwardPolicies else {
            throw DeviceError(EINVAL, "Cannot offload forward policy")
        }
        try self.checkFault(.policyAdd, "policy")
        let ok = self.tables.withLock { t in
            self.releaseStuckSlots(&t)
            guard let slot = t.policies.firstIndex(where: { $0 == nil }) else { return false }
            t.policies[slot] = PolicyEntry(slot: slot, order: t.nextOrder, policy: policy)
            t.nextOrder += 1
            t.rebuild()
            return true
        }
        guard ok else { throw DeviceError(ENOSPC, "No space for policy in table!") }
    }

    /// ≈ xdo_dev_policy_delete: the policy stops classifying at once.
    func policyDelete(_ policy: Policy) {
        self.calls.withLock { $0.record(.policyDelete(policy.direction)) }
        self.tables.withLock { t in
            guard let e = t.find(policy: policy, deleted: false) else { return }
            e.deleted.store(true, ordering: .releasing)
            t.rebuild()
        }
    }

    /// ≈ xdo_dev_policy_free: releases the slot.
    func policyFree(_ policy: Policy) {
        self.calls.withLock { $0.record(.policyFree(policy.direction)) }
        self.tables.withLock { t in
            guard let e = t.find(policy: policy, deleted: true) ?? t.find(policy: policy, deleted: nil) else { return }
            e.deleted.store(true, ordering: .releasing)
            if !self.releaseFails(.policyFree, slot: e.slot) { t.policies[e.slot] = nil }
            t.rebuild()
        }
    }
}
