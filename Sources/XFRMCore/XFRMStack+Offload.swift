// Offload in the core (≈ net/xfrm/xfrm_device.c plus the offload branches of xfrm_state.c and xfrm_policy.c):
// binding SAs and policies to devices with the kernel's fallback rules, releasing them in the kernel's call order,
// pulling device counters into the normal expiry machinery, and flushing everything a device held when it goes.

import Synchronization
import XFRMESP
import XFRMPacket

/// What an `offload [crypto|packet] dev DEV dir in|out` asks for.
public struct OffloadRequest: Sendable, Equatable {
    /// 0: find the device by route (≈ the kernel's lookup when the ifindex does not resolve).
    public var ifindex: Int32
    public var direction: OffloadDirection
    public var type: OffloadType
    public init(ifindex: Int32, direction: OffloadDirection, type: OffloadType) {
        self.ifindex = ifindex
        self.direction = direction
        self.type = type
    }
}

struct DeviceTable {
    var devices: [Int32: any XfrmOffloadDevice] = [:]
    var pendingLimitEvents = 0
}

extension XFRMStack {
    // MARK: - Registration (≈ xfrm_api_check, the netdev notifier)

    /// Attaches an offload device to the interface `ifindex`. Refuses a device that advertises ESP offload without
    /// state add and delete, or TX checksum offload without ESP offload (≈ xfrm_api_check).
    public func attachDevice(_ device: any XfrmOffloadDevice, ifindex: Int32) throws(DeviceError) {
        if device.features.contains(.hwESPTxChecksum) && !device.features.contains(.hwESP) {
            throw DeviceError(22, "\(device.name): ESP TX checksum offload without ESP offload")
        }
        if device.features.contains(.hwESP) && !device.callbacks.isSuperset(of: [.stateAdd, .stateDelete]) {
            throw DeviceError(22, "\(device.name): ESP offload needs the state add and delete callbacks")
        }
        self.deviceTable.withLock { $0.devices[ifindex] = device }
        self.configurationChanged()
    }

    /// The offload device on an interface, if any.
    public func device(ifindex: Int32) -> (any XfrmOffloadDevice)? {
        self.deviceTable.withLock { $0.devices[ifindex] }
    }

    /// The interfaces with an ESP offload device and the offload types each takes, by ifindex (what a key manager
    /// learns from the device's `esp-hw-offload` feature before it names the interface in XFRMA_OFFLOAD_DEV).
    public func offloadDevices() -> [(ifindex: Int32, types: Set<OffloadType>)] {
        self.deviceTable.withLock { t in
            t.devices.filter { $0.value.features.contains(.hwESP) }.map { ($0.key, $0.value.supportedTypes) }
        }.sorted { $0.ifindex < $1.ifindex }
    }

    /// Called by a device (from any thread) when an SA crossed a limit; the core pulls counts at the next poll.
    public func deviceLimitEvent() {
        self.deviceTable.withLock { $0.pendingLimitEvents += 1 }
    }

    /// Handles device limit events since the last call (the host's data-path loop calls this).
    public func pollDeviceEvents() {
        let pending = self.deviceTable.withLock { t -> Int in
            let n = t.pendingLimitEvents
            t.pendingLimitEvents = 0
            return n
        }
        if pending > 0 { self.syncDeviceStats() }
    }

    /// A device going down or away takes its SAs and policies with it (≈ xfrm_dev_state_flush and
    /// xfrm_dev_policy_flush). The kernel tells no one; swift-xfrm also publishes `.deviceFlushed`.
    public func deviceDown(ifindex: Int32, detach: Bool = false) {
        self.configurationChanged()
        defer { self.configurationChanged() }
        let states = self.states.flush { $0.offload?.ifindex == ifindex }
        for sa in states { self.releaseFromDevice(sa) }
        let policies = self.policies.flush { $0.offload?.ifindex == ifindex }
        for p in policies { self.releasePolicyFromDevice(p) }
        if detach { self.deviceTable.withLock { _ = $0.devices.removeValue(forKey: ifindex) } }
        if !states.isEmpty || !policies.isEmpty {
            self.events.publish(.deviceFlushed(ifindex: ifindex, states: states, policies: policies))
        }
    }

    // MARK: - SAs (≈ xfrm_dev_state_add)

    /// Binds `sa` to a device. Crypto offload falls back to software (returns with no binding) when the device is
    /// missing or unroutable, lacks the callbacks, or answers EOPNOTSUPP; packet offload fails instead. Any other
    /// device error fails both. Errors carry the kernel's extack wording.
    func bindToDevice(_ sa: SecurityAssociation, _ req: OffloadRequest) throws(StateDatabaseError) {
        let packet = req.type == .packet
        var ifindex = req.ifindex
        if ifindex == 0 || self.device(ifindex: ifindex) == nil && self.network.interface(index: ifindex) == nil {
            // No usable ifindex: the route decides (out: to the destination; in: back to the source).
            let target = req.direction == .inbound ? sa.config.source : sa.id.destination
            guard let egress = self.network.egress(to: target) else {
                if packet { throw StateDatabaseError(22, "Device for the state offload is not found") }
                return
            }
            ifindex = egress.ifindex
        }
        guard let device = self.device(ifindex: ifindex), device.callbacks.contains(.stateAdd),
            device.features.contains(.hwESP)
        else {
            if packet { throw StateDatabaseError(22, "Device doesn't support this offload") }
            return
        }
        if !packet && sa.config.esn && !device.callbacks.contains(.advanceESN) {
            throw StateDatabaseError(22, "Device doesn't support offload with ESN")
        }
        var o = StateOffload(ifindex: ifindex, direction: req.direction, type: req.type)
        do throws(DeviceError) {
            o.handle = try device.stateAdd(sa, offload: o)
        } catch {
            if !packet && error.errno == 95 { return }  // EOPNOTSUPP: crypto offload stays in software
            throw StateDatabaseError(error.errno, error.message.isEmpty ? "Device failed to offload this state"
                                                                         : error.message)
        }
        sa.setOffload(o)
    }

    /// Removes an SA from its device: delete, then free (≈ xfrm_dev_state_delete + xfrm_dev_state_free).
    func releaseFromDevice(_ sa: SecurityAssociation) {
        self.configurationChanged()
        defer { self.configurationChanged() }
        guard let o = sa.offload else { return }
        guard let device = self.device(ifindex: o.ifindex) else {
            sa.setOffload(nil)
            return
        }
        device.stateDelete(sa, offload: o)
        if device.callbacks.contains(.stateFree) { device.stateFree(sa, offload: o) }
        sa.setOffload(nil)
    }

    /// Pulls every offloaded SA's counters from its device and runs the normal soft/hard expiry on them
    /// (≈ xfrm_state_update_stats + xfrm_state_check_expire). Called on every timer run, before every dump of the
    /// SAD, and before the counters are printed.
    public func syncDeviceStats() { self.syncDeviceStats(self.states.list()) }

    /// `syncDeviceStats` over `states` (the timers' one listing of the SAD).
    func syncDeviceStats(_ states: [SecurityAssociation]) {
        let now = self.clock.now
        for sa in states {
            guard let o = sa.offload, !o.acquire, let device = self.device(ifindex: o.ifindex),
                device.callbacks.contains(.updateStats)
            else { continue }
            let c = device.updateStats(sa, offload: o)
            let (d, check) = sa.applyDeviceCounters(c, packetOffload: o.type == .packet, now: now)
            let seqErrors = d.replay &+ d.replayWindow &+ d.sequenceZero
            if seqErrors > 0 { self.statistics.increment(.inStateSeqError, by: seqErrors) }
            if d.integrityFailed > 0 { self.statistics.increment(.inStateProtoError, by: d.integrityFailed) }
            if d.headerErrors > 0 { self.statistics.increment(.inHdrError, by: d.headerErrors) }
            switch check {
            case .ok: break
            case .softExpired: self.events.publish(.expire(sa, hard: false))
            case .hardExpired: self.expireHard(sa)
            }
        }
    }

    // MARK: - Policies (≈ xfrm_dev_policy_add)

    /// The checks of xfrm_dev_policy_add that need no device call: the device exists and can offload policies.
    func checkPolicyOffload(_ o: PolicyOffload) throws(PolicyDatabaseError) {
        guard self.network.interface(index: o.ifindex) != nil else {
            throw PolicyDatabaseError(errno: 22, message: "Device for the policy offload is not found")
        }
        guard let device = self.device(ifindex: o.ifindex), device.callbacks.contains(.policyAdd) else {
            throw PolicyDatabaseError(errno: 22, message: "Policy offload is not supported")
        }
    }

    func offloadPolicy(_ p: Policy, _ o: PolicyOffload) throws(PolicyDatabaseError) {
        try self.checkPolicyOffload(o)
        guard let device = self.device(ifindex: o.ifindex) else { return }
        do throws(DeviceError) {
            try device.policyAdd(p)
        } catch {
            throw PolicyDatabaseError(errno: error.errno, message: error.message.isEmpty
                                      ? "Device failed to offload this policy" : error.message)
        }
    }

    func releasePolicyFromDevice(_ p: Policy) {
        guard let o = p.offload, let device = self.device(ifindex: o.ifindex) else { return }
        device.policyDelete(p)
        if device.callbacks.contains(.policyFree) { device.policyFree(p) }
    }

    /// Strict mode (after the v3 posting's "enforce separation between priorities of HW/SW policies"): refuse any
    /// insert that would let a software policy outrank an offloaded one in the same direction. Lower values win,
    /// so every offloaded policy's priority value must stay strictly below every software policy's. (The posted
    /// patch compared raw numbers the other way round; the intent, HW before SW, is what is enforced here.)
    func checkOffloadPriority(_ p: Policy) throws(PolicyDatabaseError) {
        guard self.strictOffloadPriority.load(ordering: .relaxed) else { return }
        var minSW: UInt32? = nil
        var maxHW: UInt32? = nil
        for q in self.policies.list() where q.direction == p.direction && q.key != p.key {
            if q.offload != nil { maxHW = max(maxHW ?? 0, q.priority) } else { minSW = min(minSW ?? .max, q.priority) }
        }
        if p.offload == nil, let maxHW, p.priority <= maxHW {
            throw PolicyDatabaseError(errno: 22, message:
                "Error: software policy priority \(p.priority) would outrank an offloaded policy (priority \(maxHW)) in strict offload-priority mode.")
        }
        if p.offload != nil, let minSW, p.priority >= minSW {
            throw PolicyDatabaseError(errno: 22, message:
                "Error: offloaded policy priority \(p.priority) would be outranked by a software policy (priority \(minSW)) in strict offload-priority mode.")
        }
    }
}
