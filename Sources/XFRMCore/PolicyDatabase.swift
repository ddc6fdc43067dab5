// The Security Policy Database (≈ the SPD half of net/xfrm/xfrm_policy.c): add/update/delete/get/flush/list of
// policies, index allocation, and the per-packet lookup.
//
// Concurrency (≈ the kernel's RCU-protected policy lookup, xfrm_policy_lookup_bytype under rcu_read_lock):
// - The data path takes no lock. `lookup`, `lookup(_:_:usedAt:)`, `markUsed` and `lastUse` read the lookup index
//   (radix trees per direction and kind, index → slot) through a Left-Right pair (LeftRight.swift): two copies,
//   readers announce themselves on a striped read indicator, load which copy is live and read it in place; they
//   never wait, retry or lock. A change is applied to the copy no reader is on, that copy is made live, the writer
//   waits until no reader can still be on the other one, and brings that one up to date by copying the tree
//   nodes, leaves and lists the change wrote (TrackedArray), rather than by walking the trees a second time.
// - Why not an immutable snapshot swapped atomically: a Swift strong reference cannot be loaded and retained
//   atomically without a lock, and an unmanaged snapshot pointer would need hazard pointers or epochs to know when
//   the old snapshot may be freed; worse, a snapshot per change means copying a 1,000,000-policy index per insert
//   (loading 1M policies would be quadratic). Left-Right's indicators are the reclamation scheme (the writer waits
//   for exactly the readers that could see the old state) and nothing big is copied: an insert costs one index
//   insert, a copy of the few records it wrote, and a wait that is empty unless a lookup is in flight. Candidate
//   lists are shared between the copies until one of them changes (copy-on-write), so they are stored once.
// - The policies themselves are stored once, in PolicySlotTable (fixed chunks that never move), addressed by slot.
//   A slot is filled before an index pointing to it is published and emptied only after both copies stopped
//   pointing to it and the write returned (no reader can hold it then); an update's replacement takes a new slot,
//   so a reader still on the old copy reads the old policy intact. A lookup copies its result out while on its
//   copy.
// - Use time is one atomic per slot, written by the data path at most once per second of the clock
//   (PolicySlotTable.markUsed stores only when the second changed): `lookup(_:_:usedAt:)` records it in the same
//   read as the lookup; `markUsed(index:)` (the output cache's once-a-second touch) finds the slot by index the
//   same way, lock-free.
// - Control-plane calls (insert, update, delete, flush, get, list, counts) serialize on one `Mutex`, which also
//   makes them the single Left-Right writer. Per-direction counts are published in an atomic for the input path.
// - The linear scan (`linearLookup`, the reference) reads under the lock.
//
// Semantics follow the kernel where it is observable:
// - Duplicates are decided by Policy.Key (direction, selector, mark value and mask, if_id). `insert(update: false)`
//   refuses a duplicate with EEXIST; `update: true` replaces it and the replacement keeps the old index
//   (xfrm_policy_insert), and a plain insert when there is none.
// - Index 0 asks for an allocated index: a per-database generator that steps by 8 ORed with the direction, 0
//   becoming 8, and skipping any index still in use (xfrm_gen_index). A given index must encode the direction
//   (EINVAL "Policy index doesn't match direction", verify_newpolicy_info) and must not belong to another live
//   policy (EEXIST; the kernel would silently allocate another one instead).
// - `generation` is stamped from a monotonic counter on every insert, updates included: since Linux 6.12 the kernel
//   gives a policy its tie-breaking position (`pos`) when it is linked, and an update links the replacement anew, so
//   a replaced policy loses priority ties to policies that were added before the update.
// - The dump order (`ip xfrm policy list`): __xfrm_policy_link links every new policy into net->xfrm.policy_all with
//   list_add, i.e. at the head, and xfrm_policy_walk reads that list from the head; so the newest policy comes
//   first (an updated policy counts as new). `list()` returns that order: generation descending.
// - Lookup: packet-offloaded policies form their own index consulted first; when one matches it wins whatever the
//   numeric priorities (spec §5.2, the merged design: HW policies "behave as a separate SPD consulted first").
//   Among offloaded policies, and otherwise among software policies, the lowest priority value wins and the older
//   policy (lower generation) wins ties. A policy matches when its selector does (Selector.matches) and its mark
//   does (Mark.matches(flow.mark)), and its if_id equals the flow's (ordinary traffic has if_id 0, so a
//   route-based VPN's policy with an if_id never captures it; ≈ xfrm_policy_match).
// - Selectors are checked as verify_newpolicy_info does (EINVAL for an unknown family or a prefix longer than the
//   family allows), and also refused with EINVAL when a prefix address is not of the selector's family, or when a
//   family-0 selector has a non-zero prefix length (Selector.matches gives those no sensible meaning).
// - `addTime` is kept as given (the database has no clock); the use time of a newly inserted or replacing policy is
//   "never used" (curlft.use_time = 0 in the kernel).

import Synchronization
import XFRMPacket

extension PolicyDatabaseError {
    static let exists = PolicyDatabaseError(errno: 17, message: "File exists")
    static let notFound = PolicyDatabaseError(errno: 2, message: "No such file or directory")
}

public final class PolicyDatabase: @unchecked Sendable {
    /// The policies by slot (shared by both lookup copies) and the Left-Right pair of lookup tables.
    private let slots: PolicySlotTable
    private let tables: LeftRight<SPDLookupTables>
    private let state: XFRMMutex<SPDState>

    public init() {
        let slots = PolicySlotTable()
        let tables = LeftRight { SPDLookupTables() }
        self.slots = slots
        self.tables = tables
        self.state = XFRMMutex(SPDState(slots: slots, tables: tables))
    }

    /// add (update == false: EEXIST "File exists" on a duplicate Policy.Key) or update (replace the duplicate,
    /// keeping its index, like the kernel; with no duplicate, update inserts).
    /// index 0 → allocate one as the kernel does (generator steps by 8, low 3 bits = direction; never reuse a live
    /// index); a given index must satisfy index & 7 == direction (EINVAL "Policy index doesn't match direction"),
    /// and must not be in use by a different policy (EEXIST).
    /// Stamps `generation` (monotonic insertion counter; ties in priority go to the older = lower generation).
    /// Returns the stored policy. Lookups on other threads see either the old or the new state, never a mix.
    @discardableResult
    public func insert(_ policy: Policy, update: Bool) throws(PolicyDatabaseError) -> Policy {
        if policy.index != 0 && policy.index & 7 != UInt32(policy.direction.rawValue) {
            throw .invalid("Policy index doesn't match direction")
        }
        try Self.validate(policy.selector)
        return try self.state.withLock { (s: inout SPDState) throws(PolicyDatabaseError) -> Policy in
            let p = try s.insert(policy, update: update)
            self.publishCounts(s)
            return p
        }
    }

    @discardableResult
    public func delete(key: Policy.Key) throws(PolicyDatabaseError) -> Policy {
        try self.state.withLock { (s: inout SPDState) throws(PolicyDatabaseError) -> Policy in
            guard let slot = s.slot(key: key) else { throw .notFound }
            defer { self.publishCounts(s) }
            return s.remove(slots: [slot])[0]
        }
    }

    @discardableResult
    public func delete(index: UInt32, direction: PolicyDirection) throws(PolicyDatabaseError) -> Policy {
        try self.state.withLock { (s: inout SPDState) throws(PolicyDatabaseError) -> Policy in
            guard let slot = s.slot(index: index, direction: direction) else { throw .notFound }
            defer { self.publishCounts(s) }
            return s.remove(slots: [slot])[0]
        }
    }

    /// Deletes the policy at `index` only if it is still the one inserted as `generation` (timers acting on a
    /// snapshot must not remove a replacement that reused the index).
    public func delete(index: UInt32, direction: PolicyDirection, generation: UInt64) throws(PolicyDatabaseError)
        -> Policy
    {
        try self.state.withLock { (s: inout SPDState) throws(PolicyDatabaseError) -> Policy in
            guard let slot = s.slot(index: index, direction: direction), s.policy(slot).generation == generation
            else { throw .notFound }
            defer { self.publishCounts(s) }
            return s.remove(slots: [slot])[0]
        }
    }

    public func get(key: Policy.Key) -> Policy? {
        self.state.withLock { s in s.slot(key: key).map { s.policy($0) } }
    }

    public func get(index: UInt32, direction: PolicyDirection) -> Policy? {
        self.state.withLock { s in s.slot(index: index, direction: direction).map { s.policy($0) } }
    }

    /// Removes every policy (or only those `where` selects, e.g. those offloaded to one device); returns them, in
    /// list order. The predicate runs under the database's lock (the flush is atomic) and must not call back into
    /// the database.
    @discardableResult
    public func flush(where predicate: (Policy) -> Bool = { _ in true }) -> [Policy] {
        self.state.withLock { s in
            let victims = s.slotsInListOrder().filter { predicate(s.policy($0)) }
            let removed = victims.isEmpty ? [] : s.remove(slots: victims)
            self.publishCounts(s)
            return removed
        }
    }

    /// Policies in `direction`, read without the lock (the input path asks per packet, ≈ policy_count[dir]).
    @inline(__always)
    public func count(_ direction: PolicyDirection) -> Int {
        Int((self.counts.load(ordering: .acquiring) >> (21 * UInt64(direction.rawValue))) & 0x1f_ffff)
    }

    /// Per-direction counts packed 21 bits each (saturating at 2^21 − 1: only zero/non-zero matters on the
    /// data path), published after every change under the lock.
    private let counts = Atomic<UInt64>(0)

    private func publishCounts(_ s: borrowing SPDState) {
        var packed: UInt64 = 0
        for d in 0..<3 { packed |= UInt64(min(s.dense[d].count, 0x1f_ffff)) << (21 * UInt64(d)) }
        self.counts.store(packed, ordering: .releasing)
    }

    public var totalCount: Int {
        self.state.withLock { s in s.count }
    }

    /// Every policy in the kernel's dump order: newest first (the kernel links new policies at the head of
    /// policy_all with list_add and dumps from the head; an update links the replacement as new).
    public func list() -> [Policy] {
        self.state.withLock { s in s.slotsInListOrder().map { s.policy($0) } }
    }

    /// Whether any policy has a time limit.
    public var hasTimedPolicies: Bool { self.state.withLock { $0.timed > 0 } }

    /// The policies with a time limit (add or use, soft or hard), in list order: what the timers look at. Without
    /// any (the usual SPD), no pass at all; otherwise one pass that copies only the timed ones.
    public func timedList() -> [Policy] {
        self.state.withLock { s in
            guard s.timed > 0 else { return [] }
            var timed: [(generation: UInt64, policy: Policy)] = []
            for dir in s.dense {
                for slot in dir {
                    let p = s.policy(slot)
                    if p.lifetime.hasTimeLimit { timed.append((p.generation, p)) }
                }
            }
            timed.sort { $0.generation > $1.generation }
            return timed.map(\.policy)
        }
    }

    /// The best policy for a packet: a matching packet-offloaded policy if there is one (lowest priority value,
    /// older on ties), otherwise the matching software policy with the lowest priority value, older on ties.
    /// A policy matches when its selector and its mark match the flow and its if_id is the flow's. No allocation,
    /// no lock (see Concurrency above).
    @inline(__always)
    public func lookup(_ direction: PolicyDirection, _ flow: Flow) -> Policy? {
        let slots = self.slots
        return self.tables.read { t in
            let slot = t.pointee.lookupSlot(direction, flow)
            return slot < 0 ? nil : slots.policy(slot)
        }
    }

    /// `lookup`, recording a use of the policy found at `seconds` (curlft.use_time, as the kernel's lookup
    /// does): the per-packet call of the data path, one lock-free read for both.
    @inline(__always)
    public func lookup(_ direction: PolicyDirection, _ flow: Flow, usedAt seconds: UInt64) -> Policy? {
        let slots = self.slots
        return self.tables.read { t in
            let slot = t.pointee.lookupSlot(direction, flow)
            if slot < 0 { return nil }
            slots.markUsed(slot, at: seconds)
            return slots.policy(slot)
        }
    }

    /// Whether the two Left-Right copies of the lookup tables are equal, as they must be between writes (tests).
    func lookupCopiesAgree() -> Bool {
        self.state.withLock { _ in
            let (a, b) = self.tables.bothCopies
            return a.pointee == b.pointee
        }
    }

    /// Reference implementation: a linear scan with the same semantics as `lookup` (under the lock).
    public func linearLookup(_ direction: PolicyDirection, _ flow: Flow) -> Policy? {
        self.state.withLock { s in
            var bestSlot: Int32 = -1
            var bestOffloaded = false
            var bestPriority: UInt32 = 0
            var bestGeneration: UInt64 = 0
            for slot in s.dense[Int(direction.rawValue)] {
                let p = s.policy(slot)
                guard p.selector.matches(flow), p.mark.matches(flow.mark), p.ifID == flow.ifID else { continue }
                let offloaded = p.offload != nil
                let better: Bool
                if bestSlot < 0 {
                    better = true
                } else if offloaded != bestOffloaded {
                    better = offloaded
                } else {
                    better = p.priority < bestPriority
                        || (p.priority == bestPriority && p.generation < bestGeneration)
                }
                if better {
                    bestSlot = slot
                    bestOffloaded = offloaded
                    bestPriority = p.priority
                    bestGeneration = p.generation
                }
            }
            return bestSlot < 0 ? nil : s.policy(bestSlot)
        }
    }

    /// Records a use (curlft.use_time) of the policy with this index; unknown indices are ignored. Lock-free; the
    /// slot's use time is stored only when the second changes.
    public func markUsed(index: UInt32, direction: PolicyDirection, at seconds: UInt64) {
        let slots = self.slots
        self.tables.read { t in
            if let slot = t.pointee.slot(index: index, direction: direction) { slots.markUsed(slot, at: seconds) }
        }
    }

    /// The last recorded use of the policy with this index; nil when it was never used or does not exist.
    public func lastUse(index: UInt32, direction: PolicyDirection) -> UInt64? {
        let slots = self.slots
        return self.tables.read { t in
            t.pointee.slot(index: index, direction: direction).flatMap { slots.lastUse($0) }
        }
    }

    /// verify_newpolicy_info's selector checks, plus what this model needs for its index: the prefix addresses
    /// belong to the selector's family, and a family-0 (AF_UNSPEC) selector has zero-length prefixes.
    private static func validate(_ sel: Selector) throws(PolicyDatabaseError) {
        switch sel.family {
        case 4:
            if sel.destination.length > 32 || sel.source.length > 32 {
                throw .invalid("Invalid prefix length in selector (must be <= 32 for IPv4)")
            }
            if sel.destination.address.version != 4 || sel.source.address.version != 4 {
                throw .invalid("Selector addresses don't match the selector family")
            }
        case 6:
            if sel.destination.length > 128 || sel.source.length > 128 {
                throw .invalid("Invalid prefix length in selector (must be <= 128 for IPv6)")
            }
            if sel.destination.address.version != 6 || sel.source.address.version != 6 {
                throw .invalid("Selector addresses don't match the selector family")
            }
        case 0:
            if sel.destination.length != 0 || sel.source.length != 0 {
                throw .invalid("A selector of family AF_UNSPEC must have zero-length prefixes")
            }
        default:
            throw .invalid("Invalid selector family")
        }
    }
}
