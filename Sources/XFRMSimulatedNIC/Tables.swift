// The device's own SA and policy tables (≈ netdevsim's nsim_ipsec.sa[] and mlx5's SA/policy steering tables).
//
// The control path (stateAdd/Delete/Free, policyAdd/Delete/Free) edits `Tables` under one mutex and then builds a
// new immutable `TableSnapshot`, the lookup structure the engine reads: engine threads lock only to copy the
// snapshot reference, once per batch (our stand-in for RCU). Each SA entry carries what the silicon would hold —
// its own ESP transform (packet offload: its own sequence numbers, replay window and counters) or its own cipher
// (crypto offload) — behind its own mutex (≈ x->lock), because several engine threads may use one SA.

import Synchronization
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket

/// The mutable part of an SA entry: the keyed crypto state and the device's counters for it.
struct SAEntryState {
    /// Packet offload: the device's private transform (nil for a larval SA, and after `stateFree`).
    var transform: ESPTransform?
    /// Crypto offload: the device's private cipher (nil after `stateFree`).
    var cipher: DeviceCipher?
    /// Crypto offload RX: the highest sequence number opened, only to infer the ESN high half (no replay check:
    /// the host does that).
    var esnTracker: ReplayWindow
    var counters = DeviceSACounters()
    /// Soft / hard limit events already raised.
    var softRaised = false
    var hardRaised = false

    /// What accounting one good packet crossed.
    enum LimitCrossing {
        case none
        case soft
        case hard
    }

    /// The hard byte or packet limit is reached: no more traffic (≈ the drop rule mlx5 installs).
    @inline(__always)
    func hardReached(_ l: LifetimeConfig) -> Bool {
        self.counters.bytes >= l.hardByteLimit || self.counters.packets >= l.hardPacketLimit
    }

    /// Counts one good packet and reports a limit crossed for the first time (one event per limit; when both are
    /// crossed at once only the hard one is reported, the core's expiry check handles both).
    @inline(__always)
    mutating func account(bytes: Int, limits l: LifetimeConfig, enforce: Bool) -> LimitCrossing {
        self.counters.bytes &+= UInt64(bytes)
        self.counters.packets &+= 1
        guard enforce else { return .none }
        if !self.hardRaised && self.hardReached(l) {
            self.hardRaised = true
            self.softRaised = true
            return .hard
        }
        if !self.softRaised && (self.counters.bytes >= l.softByteLimit || self.counters.packets >= l.softPacketLimit) {
            self.softRaised = true
            return .soft
        }
        return .none
    }
}

/// A cipher owned by one SA entry and used only under that entry's lock.
final class DeviceCipher: @unchecked Sendable {
    let cipher: any ESPCipher
    init(_ cipher: any ESPCipher) { self.cipher = cipher }
}

/// One used slot of the SA table.
final class SAEntry: @unchecked Sendable {
    let slot: Int
    /// The driver cookie returned by stateAdd: generation << 32 | BIT(31) | slot (netdevsim ORs BIT(31) because
    /// 0 means "no handle"; the generation keeps a stale handle from finding a reused slot).
    let handle: UInt64
    /// Insertion order (newer SAs are preferred among equals, as the kernel prefers the newest add_time).
    let order: UInt64
    let id: SAID
    let source: IPAddress
    let direction: OffloadDirection
    let type: OffloadType
    let reqid: UInt32
    let mode: ESPMode
    let selector: Selector
    let encapsulated: Bool
    let esn: Bool
    /// The limits the device enforces; refreshed from the core's SA on every stats update (an `update` with new
    /// limits reaches the device that way).
    let lifetimeBox: XFRMMutex<LifetimeConfig>
    var lifetime: LifetimeConfig { self.lifetimeBox.withLock { $0 } }
    /// A larval (acquire) SA: recorded, never programmed for traffic (as mlx5 does).
    let larval: Bool

    /// Deleted (stateDelete): unusable at once, slot still held until stateFree.
    let deleted = Atomic<Bool>(false)
    /// The hard limit was reached: traffic is dropped.
    let expired = Atomic<Bool>(false)
    let state: XFRMMutex<SAEntryState>

    init(slot: Int, handle: UInt64, order: UInt64, config c: SAConfig, offload: StateOffload,
         transform: ESPTransform?, cipher: DeviceCipher?) {
        self.slot = slot
        self.handle = handle
        self.order = order
        self.id = c.id
        self.source = c.source
        self.direction = offload.direction
        self.type = offload.type
        self.reqid = c.reqid
        self.mode = c.mode
        self.selector = c.selector
        self.encapsulated = c.encapsulation != nil
        self.esn = c.esn
        self.lifetimeBox = XFRMMutex(c.lifetime)
        self.larval = c.crypto == nil
        let window = min(max(c.replayWindow, 0), ReplayWindow.maximumSize)
        var s = SAEntryState(
            transform: transform, cipher: cipher,
            esnTracker: ReplayWindow(size: window, esn: c.esn, top: c.inboundSequence))
        s.counters.inboundSequence = c.inboundSequence
        s.counters.outboundSequence = c.outboundSequence
        self.state = XFRMMutex(s)
    }

    /// Usable for traffic right now (not deleted, not larval).
    @inline(__always) var live: Bool { !self.larval && !self.deleted.load(ordering: .acquiring) }

    /// True when this outbound packet-offload SA can carry `flow` for `template` (≈ xfrm_state_find's match:
    /// proto, SPI, reqid, mode; tunnel endpoints from the template, transport endpoints from the flow; the SA's
    /// selector must cover the flow).
    @inline(__always)
    func serves(_ t: Template, flow: Flow) -> Bool {
        guard t.proto == self.id.proto, t.spi == 0 || t.spi == self.id.spi, t.reqid == 0 || t.reqid == self.reqid,
            t.mode == (self.mode == .tunnel ? 1 : 0)
        else { return false }
        if self.mode == .tunnel {
            if let d = t.destination, !d.isUnspecified, d != self.id.destination { return false }
            if let s = t.source, !s.isUnspecified, s != self.source { return false }
        } else {
            if flow.destination != self.id.destination || flow.source != self.source { return false }
        }
        return self.selector.matches(flow)
    }

    /// True when an inbound packet that came through this SA satisfies `template` (≈ xfrm_state_ok).
    @inline(__always)
    func satisfies(_ t: Template) -> Bool {
        guard t.proto == self.id.proto, t.spi == 0 || t.spi == self.id.spi, t.reqid == 0 || t.reqid == self.reqid,
            t.mode == (self.mode == .tunnel ? 1 : 0)
        else { return false }
        if self.mode == .tunnel {
            if let d = t.destination, !d.isUnspecified, d != self.id.destination { return false }
            if let s = t.source, !s.isUnspecified, s != self.source { return false }
        }
        return true
    }

    /// Drops the keyed state (≈ the driver freeing its context; the keys go with the last reference).
    func wipe() {
        self.deleted.store(true, ordering: .releasing)
        self.state.withLock { s in
            s.transform = nil
            s.cipher = nil
        }
    }
}

/// One used slot of the policy table: the device's copy of what it needs to classify.
final class PolicyEntry: Sendable {
    let slot: Int
    let order: UInt64
    let policy: Policy
    let direction: PolicyDirection
    let selector: Selector
    let action: PolicyAction
    let priority: UInt32
    /// The single template (nil: a policy without templates, a bypass).
    let template: Template?
    let deleted = Atomic<Bool>(false)

    init(slot: Int, order: UInt64, policy: Policy) {
        self.slot = slot
        self.order = order
        self.policy = policy
        self.direction = policy.direction
        self.selector = policy.selector
        self.action = policy.action
        self.priority = policy.priority
        self.template = policy.templates.first
    }

    /// Lower priority value first, then the older policy (the SPD order).
    static func precedes(_ a: PolicyEntry, _ b: PolicyEntry) -> Bool {
        a.priority != b.priority ? a.priority < b.priority : a.order < b.order
    }
}

/// The lookup key of an inbound SA (≈ the RX steering match on daddr + SPI; the protocol is always ESP).
struct RXKey: Hashable {
    var destination: IPAddress
    var spi: UInt32
}

/// What the engine reads: an immutable view of the live entries, built by the control path on every change.
final class TableSnapshot: @unchecked Sendable {
    /// Inbound SAs by (destination, SPI); on duplicates the older entry wins (the newer one is an add the core is
    /// about to undo with EEXIST).
    let rx: [RXKey: SAEntry]
    /// Destinations of inbound SAs: bit 0 = an SA without NAT-T, bit 1 = an SA with NAT-T (to recognise
    /// non-first fragments, which carry no SPI).
    let rxDestinations: [IPAddress: UInt8]
    /// Outbound packet-offload SAs, newest first.
    let tx: [SAEntry]
    /// Live entries by slot (crypto TX finds its SA by handle).
    let slots: [SAEntry?]
    /// OUT policies, and IN + FWD policies, in SPD order.
    let outPolicies: [PolicyEntry]
    let inPolicies: [PolicyEntry]

    init(sas: [SAEntry?], policies: [PolicyEntry?]) {
        var rx: [RXKey: SAEntry] = [:]
        var dests: [IPAddress: UInt8] = [:]
        var tx: [SAEntry] = []
        var slots = [SAEntry?](repeating: nil, count: sas.count)
        let live = sas.compactMap { $0 }.filter { $0.live }.sorted { $0.order < $1.order }
        for e in live {
            slots[e.slot] = e
            if e.direction == .inbound {
                let k = RXKey(destination: e.id.destination, spi: e.id.spi)
                if rx[k] == nil { rx[k] = e }
                dests[e.id.destination, default: 0] |= e.encapsulated ? 2 : 1
            } else if e.type == .packet {
                tx.append(e)
            }
        }
        self.rx = rx
        self.rxDestinations = dests
        self.tx = tx.reversed()
        self.slots = slots
        let pols = policies.compactMap { $0 }.filter { !$0.deleted.load(ordering: .relaxed) }
        self.outPolicies = pols.filter { $0.direction == .outbound }.sorted(by: PolicyEntry.precedes)
        self.inPolicies = pols.filter { $0.direction != .outbound }.sorted(by: PolicyEntry.precedes)
    }

    static let empty = TableSnapshot(sas: [], policies: [])

    /// The live SA a handle names, if any.
    @inline(__always)
    func entry(handle: UInt64) -> SAEntry? {
        let slot = Int(handle & 0x7fff_ffff)
        guard handle & (1 << 31) != 0, slot < self.slots.count, let e = self.slots[slot], e.handle == handle else {
            return nil
        }
        return e
    }
}

/// The control path's tables (under `NICCore.tables`).
struct Tables {
    var sas: [SAEntry?]
    var policies: [PolicyEntry?]
    var nextOrder: UInt64 = 1
    var snapshot: TableSnapshot

    init(saCapacity: Int, policyCapacity: Int) {
        self.sas = [SAEntry?](repeating: nil, count: saCapacity)
        self.policies = [PolicyEntry?](repeating: nil, count: policyCapacity)
        self.snapshot = TableSnapshot(sas: self.sas, policies: self.policies)
    }

    mutating func rebuild() {
        self.snapshot = TableSnapshot(sas: self.sas, policies: self.policies)
    }

    /// The entry a handle names (deleted or not). Without a handle (0: the core did not keep it), the newest entry
    /// with the same SA id and direction. A stale handle finds nothing.
    func find(handle: UInt64, sa: SecurityAssociation, direction: OffloadDirection) -> SAEntry? {
        if handle != 0 {
            let slot = Int(handle & 0x7fff_ffff)
            guard slot < self.sas.count, let e = self.sas[slot], e.handle == handle else { return nil }
            return e
        }
        return self.sas.compactMap { $0 }.filter { $0.id == sa.id && $0.direction == direction }
            .max { $0.order < $1.order }
    }

    /// The newest entry (deleted as asked) equal to `policy`, else the newest with the same key (the core may have
    /// assigned an index after the add).
    func find(policy: Policy, deleted: Bool?) -> PolicyEntry? {
        let candidates = self.policies.compactMap { $0 }.filter { e in
            deleted.map { e.deleted.load(ordering: .relaxed) == $0 } ?? true
        }
        if let e = candidates.filter({ $0.policy == policy }).max(by: { $0.order < $1.order }) { return e }
        // The core programs a policy before the SPD gives it an index, so match on what the policy says (selector,
        // action, priority, templates, mark...) and ignore the database's bookkeeping; among identical ones the
        // oldest goes first (an update deletes the policy it replaced).
        let content = Self.content(policy)
        if let e = candidates.filter({ Self.content($0.policy) == content }).min(by: { $0.order < $1.order }) {
            return e
        }
        return candidates.filter { $0.policy.key == policy.key }.min { $0.order < $1.order }
    }

    /// A policy without the SPD's bookkeeping (index, generation, add time).
    static func content(_ p: Policy) -> Policy {
        var c = p
        c.index = 0
        c.generation = 0
        c.addTime = 0
        return c
    }
}

extension IPAddress {
    /// 0.0.0.0 or :: (a wildcard in templates).
    @inline(__always)
    var isUnspecified: Bool {
        switch self {
        case .v4(let a): a == 0
        case .v6(let h, let l): h == 0 && l == 0
        }
    }
}
