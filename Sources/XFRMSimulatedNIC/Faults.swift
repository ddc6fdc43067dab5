// Fault injection (issue 10): the simulated NIC fails on request the way real offload hardware fails — a control
// command refused (table full, firmware error, command timeout), a counter query that does not answer, an engine
// that stops taking packets for a while, a device that vanishes (hot unplug, a crashed firmware) while traffic
// flows. What the driver does about each is the contract the core relies on (Documentation/networking/
// xfrm_device.rst; mlx5e_xfrm_add_state's error unwinding, mlx5's firmware command timeouts):
//
// - an add that fails leaves nothing behind in the device, whatever the errno (a timed-out add is unwound);
// - a delete never fails as seen from the core (xdo_dev_state_delete and xdo_dev_state_free return void): when the
//   hardware refuses to release a slot, the driver stops using the entry at once (no traffic matches it) and keeps
//   the slot as "stuck" until a later command releases it;
// - a counter query that fails answers with the last counts it read (never less, never zero), so the core's
//   lifetime accounting neither goes backwards nor expires anything early;
// - a stalled engine takes nothing from its queues: what does not fit is dropped and counted (`txQueueFull`,
//   `rxQueueFull`), and it picks up where it left off when the stall ends;
// - a vanished device carries nothing (everything handed to it is dropped and counted as `txShutdown` /
//   `rxShutdown`), holds nothing (its tables and keys are gone) and refuses every add with ENODEV until the host
//   removes it (`XFRMStack.deviceDown(ifindex:detach:)`, ≈ NETDEV_UNREGISTER → xfrm_dev_state_flush).

import Synchronization
import XFRMCore

let EIO: Int32 = 5
let ENODEV: Int32 = 19
let ETIMEDOUT: Int32 = 110

/// A control command of the device that can be made to fail.
public enum NICFaultPoint: String, CaseIterable, Sendable {
    /// ≈ xdo_dev_state_add.
    case stateAdd = "state-add"
    /// The hardware release behind xdo_dev_state_free (the slot stays stuck).
    case stateFree = "state-free"
    /// ≈ xdo_dev_policy_add.
    case policyAdd = "policy-add"
    /// The hardware release behind xdo_dev_policy_free.
    case policyFree = "policy-free"
    /// ≈ xdo_dev_state_update_stats: the counter query.
    case stats = "stats"
}

/// The errnos a fault can carry, with the names `link set DEV fault ...` takes.
public enum NICFaultErrno: Int32, CaseIterable, Sendable {
    case eio = 5
    case enospc = 28
    case etimedout = 110

    public var name: String {
        switch self {
        case .eio: "EIO"
        case .enospc: "ENOSPC"
        case .etimedout: "ETIMEDOUT"
        }
    }

    public init?(name: String) {
        guard let e = Self.allCases.first(where: { $0.name == name.uppercased() }) else { return nil }
        self = e
    }
}

/// How often each kind of fault fired, and the device's stuck slots.
public struct NICFaultCounts: Sendable, Equatable {
    /// Commands that failed because of an injected fault, by point.
    public var fired: [NICFaultPoint: Int] = [:]
    /// SA and policy slots the hardware would not release (not usable by traffic; released by a later command).
    public var stuckSAs = 0
    public var stuckPolicies = 0
    public init() {}
}

/// The armed faults (under `NICCore.faults`).
struct FaultPlan {
    struct Armed {
        var errno: Int32
        /// How many more commands fail (Int.max: until cleared).
        var remaining: Int
    }
    var armed: [NICFaultPoint: Armed] = [:]
    var counts = NICFaultCounts()
    /// Stuck slots by slot number (cleared when a later command releases them).
    var stuckSAs: Set<Int> = []
    var stuckPolicies: Set<Int> = []
    /// The last counts each SA's query answered with, by handle (what a failed query answers again).
    var lastStats: [UInt64: DeviceSACounters] = [:]

    /// Consumes one firing of the fault armed at `point`, if any, and returns its errno.
    mutating func fire(_ point: NICFaultPoint) -> Int32? {
        guard var a = self.armed[point], a.remaining > 0 else { return nil }
        a.remaining = a.remaining == .max ? .max : a.remaining - 1
        self.armed[point] = a.remaining == 0 ? nil : a
        self.counts.fired[point, default: 0] += 1
        return a.errno
    }
}

extension NICCore {
    /// The error a failed command reports, worded as a driver's extack would be.
    func faultError(_ errno: Int32, _ what: String) -> DeviceError {
        switch errno {
        case ENOSPC: DeviceError(errno, "No space for \(what) in the device table")
        case ETIMEDOUT: DeviceError(errno, "Device \(self.name) timed out programming the \(what)")
        case ENODEV: DeviceError(errno, "Device \(self.name) is gone")
        default: DeviceError(errno, "Device \(self.name) firmware error programming the \(what)")
        }
    }

    /// Fails the command at `point` if a fault is armed there (or the device vanished).
    func checkFault(_ point: NICFaultPoint, _ what: String) throws(DeviceError) {
        if self.vanished.load(ordering: .acquiring) { throw self.faultError(ENODEV, what) }
        if let errno = self.faults.withLock({ $0.fire(point) }) { throw self.faultError(errno, what) }
    }

    /// True when the hardware release at `point` fails this time (the slot becomes stuck).
    func releaseFails(_ point: NICFaultPoint, slot: Int) -> Bool {
        self.faults.withLock { f in
            guard f.fire(point) != nil else { return false }
            if point == .stateFree { f.stuckSAs.insert(slot) } else { f.stuckPolicies.insert(slot) }
            return true
        }
    }

    /// Retries the release of stuck slots (before every add, as a driver retries its pending firmware commands);
    /// a release still armed to fail leaves them stuck. Call with `tables` locked.
    func releaseStuckSlots(_ t: inout Tables) {
        let (sas, pols) = self.faults.withLock { f -> (Set<Int>, Set<Int>) in
            if f.armed[.stateFree] != nil || f.armed[.policyFree] != nil { return ([], []) }
            defer {
                f.stuckSAs = []
                f.stuckPolicies = []
            }
            return (f.stuckSAs, f.stuckPolicies)
        }
        for slot in sas {
            t.sas[slot]?.wipe()
            t.sas[slot] = nil
        }
        for slot in pols { t.policies[slot] = nil }
        if !sas.isEmpty || !pols.isEmpty { t.rebuild() }
    }

    /// The counts a query answers: the device's own, or on a failed query the last ones it answered with.
    func reportStats(handle: UInt64, _ read: () -> DeviceSACounters) -> DeviceSACounters {
        if self.faults.withLock({ $0.fire(.stats) }) != nil || self.vanished.load(ordering: .acquiring) {
            return self.faults.withLock { $0.lastStats[handle] } ?? DeviceSACounters()
        }
        let c = read()
        self.faults.withLock { $0.lastStats[handle] = c }
        return c
    }

    /// The device vanishes: link down, engine queues dropped, tables and keys gone.
    func vanish() {
        self.vanished.store(true, ordering: .releasing)
        self.linkUp.store(false, ordering: .releasing)
        self.setStalled(false)
        let gone: [SAEntry] = self.tables.withLock { t in
            let sas = t.sas.compactMap { $0 }
            for i in t.sas.indices { t.sas[i] = nil }
            for i in t.policies.indices { t.policies[i] = nil }
            t.rebuild()
            return sas
        }
        for e in gone { e.wipe() }
        self.faults.withLock { f in
            f.stuckSAs = []
            f.stuckPolicies = []
        }
        self.dropQueued()
    }
}

extension SimulatedNIC {
    /// Makes the next `count` commands at `point` fail with `errno` (`count` nil: every one until cleared).
    public func injectFault(_ point: NICFaultPoint, errno: NICFaultErrno, count: Int? = 1) {
        precondition(count.map { $0 > 0 } ?? true, "a fault fires at least once")
        self.core.faults.withLock {
            $0.armed[point] = FaultPlan.Armed(errno: errno.rawValue, remaining: count ?? .max)
        }
    }

    /// Disarms every fault (stuck slots are released by the next add).
    public func clearFaults() {
        self.core.faults.withLock { $0.armed = [:] }
    }

    /// What fired so far, and the stuck slots.
    public var faultCounts: NICFaultCounts {
        self.core.faults.withLock { f in
            var c = f.counts
            c.stuckSAs = f.stuckSAs.count
            c.stuckPolicies = f.stuckPolicies.count
            return c
        }
    }

    /// Stops (true) or restarts (false) the engine: while stalled it takes nothing from its queues, which fill
    /// and drop; `drain()` does not wait for a stalled engine.
    public func setStalled(_ stalled: Bool) { self.core.setStalled(stalled) }

    /// The device vanishes while traffic may be flowing (see the top of this file). The host must then remove it.
    public func vanish() { self.core.vanish() }

    /// Whether the device has vanished.
    public var hasVanished: Bool { self.core.vanished.load(ordering: .acquiring) }

    /// Handles of the SAs the device would use for traffic now (not deleted, not larval, not stuck): what the
    /// core's SAD says is offloaded to it must be exactly these.
    public var liveSAHandles: Set<UInt64> {
        self.core.tables.withLock { t in Set(t.sas.compactMap { $0 }.filter { $0.live }.map(\.handle)) }
    }

    /// Policies the device classifies with now (not deleted, not stuck).
    public var livePolicies: [Policy] {
        self.core.tables.withLock { t in
            t.policies.compactMap { $0 }.filter { !$0.deleted.load(ordering: .relaxed) }.map(\.policy)
        }
    }
}
