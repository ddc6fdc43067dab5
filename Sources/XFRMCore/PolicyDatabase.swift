// The Security Policy Database (≈ the SPD half of net/xfrm/xfrm_policy.c): add/update/delete/get/flush/list of
// policies, index allocation, and the per-packet lookup.
//
// Concurrency: all state lives in one struct behind a stdlib `Synchronization.Mutex`. Control-plane calls and the
// data path's `lookup` both take it; a lookup holds it only for the radix-tree walk and the copy of the result (a
// few hundred ns at 100,000 policies; the uncontended lock and unlock cost ~30-40 ns of that), and `markUsed` only
// for a dictionary probe and a store. This is the simple scheme the design
// allows: lookups from several worker threads serialize on the lock, which at these hold times costs less than
// keeping RCU-like snapshots of a 100,000-policy index up to date on every insert. A caller whose lookups contend
// heavily can shard (one database per worker) or cache lookups per flow.
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
    private let state = Mutex(SPDState())

    public init() {}

    /// add (update == false: EEXIST "File exists" on a duplicate Policy.Key) or update (replace the duplicate,
    /// keeping its index, like the kernel; with no duplicate, update inserts).
    /// index 0 → allocate one as the kernel does (generator steps by 8, low 3 bits = direction; never reuse a live
    /// index); a given index must satisfy index & 7 == direction (EINVAL "Policy index doesn't match direction"),
    /// and must not be in use by a different policy (EEXIST).
    /// Stamps `generation` (monotonic insertion counter; ties in priority go to the older = lower generation).
    /// Returns the stored policy.
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
            guard let slot = s.byKey[key] else { throw .notFound }
            defer { self.publishCounts(s) }
            return s.remove(slot: slot)
        }
    }

    @discardableResult
    public func delete(index: UInt32, direction: PolicyDirection) throws(PolicyDatabaseError) -> Policy {
        try self.state.withLock { (s: inout SPDState) throws(PolicyDatabaseError) -> Policy in
            guard let slot = s.slot(index: index, direction: direction) else { throw .notFound }
            defer { self.publishCounts(s) }
            return s.remove(slot: slot)
        }
    }

    /// Deletes the policy at `index` only if it is still the one inserted as `generation` (timers acting on a
    /// snapshot must not remove a replacement that reused the index).
    public func delete(index: UInt32, direction: PolicyDirection, generation: UInt64) throws(PolicyDatabaseError)
        -> Policy
    {
        try self.state.withLock { (s: inout SPDState) throws(PolicyDatabaseError) -> Policy in
            guard let slot = s.slot(index: index, direction: direction),
                s.slots[Int(slot)].policy?.generation == generation
            else { throw .notFound }
            defer { self.publishCounts(s) }
            return s.remove(slot: slot)
        }
    }

    public func get(key: Policy.Key) -> Policy? {
        self.state.withLock { s in s.byKey[key].map { s.slots[Int($0)].policy! } }
    }

    public func get(index: UInt32, direction: PolicyDirection) -> Policy? {
        self.state.withLock { s in s.slot(index: index, direction: direction).map { s.slots[Int($0)].policy! } }
    }

    /// Removes every policy (or only those `where` selects, e.g. those offloaded to one device); returns them, in
    /// list order. The predicate runs under the database's lock (the flush is atomic) and must not call back into
    /// the database.
    @discardableResult
    public func flush(where predicate: (Policy) -> Bool = { _ in true }) -> [Policy] {
        self.state.withLock { s in
            var removed: [Policy] = []
            for slot in s.slotsInListOrder() where predicate(s.slots[Int(slot)].policy!) {
                removed.append(s.remove(slot: slot))
            }
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
        self.state.withLock { s in s.byKey.count }
    }

    /// Every policy in the kernel's dump order: newest first (the kernel links new policies at the head of
    /// policy_all with list_add and dumps from the head; an update links the replacement as new).
    public func list() -> [Policy] {
        self.state.withLock { s in s.slotsInListOrder().map { s.slots[Int($0)].policy! } }
    }

    /// The best policy for a packet: a matching packet-offloaded policy if there is one (lowest priority value,
    /// older on ties), otherwise the matching software policy with the lowest priority value, older on ties.
    /// A policy matches when its selector and its mark match the flow and its if_id is the flow's. No allocation.
    public func lookup(_ direction: PolicyDirection, _ flow: Flow) -> Policy? {
        var result: Policy? = nil
        self.state.withLock { s in
            let slot = s.lookupSlot(direction, flow)
            if slot >= 0 { result = s.slots[Int(slot)].policy }
        }
        return result
    }

    /// Reference implementation: a linear scan with the same semantics as `lookup`.
    public func linearLookup(_ direction: PolicyDirection, _ flow: Flow) -> Policy? {
        self.state.withLock { s in
            var bestSlot: Int32 = -1
            var bestOffloaded = false
            var bestPriority: UInt32 = 0
            var bestGeneration: UInt64 = 0
            s.slots.withUnsafeBufferPointer { slots in
                for slot in s.dense[Int(direction.rawValue)] {
                    let p = slots[Int(slot)].policy.unsafelyUnwrapped
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
            }
            return bestSlot < 0 ? nil : s.slots[Int(bestSlot)].policy
        }
    }

    /// Records a use (curlft.use_time) of the policy with this index; unknown indices are ignored.
    public func markUsed(index: UInt32, direction: PolicyDirection, at seconds: UInt64) {
        self.state.withLock { s in
            if let slot = s.slot(index: index, direction: direction) { s.slots[Int(slot)].lastUse = seconds }
        }
    }

    /// The last recorded use of the policy with this index; nil when it was never used or does not exist.
    public func lastUse(index: UInt32, direction: PolicyDirection) -> UInt64? {
        self.state.withLock { s in s.slot(index: index, direction: direction).flatMap { s.slots[Int($0)].lastUse } }
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

/// One stored policy (nil policy: a free slot) and its use time.
struct SPDEntry {
    var policy: Policy?
    var lastUse: UInt64?
    /// Position in `SPDState.dense[direction]`.
    var densePosition: Int32
}

/// Everything behind the database's lock.
struct SPDState {
    var slots: ContiguousArray<SPDEntry> = []
    var freeSlots: [Int32] = []
    var byKey: [Policy.Key: Int32] = [:]
    var byIndex: [UInt32: Int32] = [:]
    /// Per direction, the slots of its live policies (unordered; for counts and the linear scan).
    var dense: [ContiguousArray<Int32>] = [[], [], []]
    var software: [PolicyIndex] = [PolicyIndex(), PolicyIndex(), PolicyIndex()]
    var offloaded: [PolicyIndex] = [PolicyIndex(), PolicyIndex(), PolicyIndex()]
    /// The kernel's net->xfrm.idx_generator.
    var indexGenerator: UInt32 = 0
    var nextGeneration: UInt64 = 1

    /// The slot of the best policy for `flow`, -1 if none. `mutating` only so that the indexes are used in place
    /// (no copy of their array references on the hot path); it changes nothing.
    mutating func lookupSlot(_ direction: PolicyDirection, _ flow: Flow) -> Int32 {
        let d = Int(direction.rawValue)
        var best = LookupBest()
        self.offloaded[d].lookup(flow, &best)
        if best.slot < 0 { self.software[d].lookup(flow, &best) }
        return best.slot
    }

    func slot(index: UInt32, direction: PolicyDirection) -> Int32? {
        guard let slot = self.byIndex[index], self.slots[Int(slot)].policy!.direction == direction else { return nil }
        return slot
    }

    mutating func insert(_ new: Policy, update: Bool) throws(PolicyDatabaseError) -> Policy {
        let existing = self.byKey[new.key]
        if existing != nil && !update { throw .exists }
        if new.index != 0, let holder = self.byIndex[new.index], holder != existing { throw .exists }

        var policy = new
        if let existing {
            policy.index = self.slots[Int(existing)].policy!.index
            self.remove(slot: existing)
        } else if policy.index == 0 {
            policy.index = self.allocateIndex(direction: policy.direction)
        }
        policy.generation = self.nextGeneration
        self.nextGeneration += 1

        let d = Int(policy.direction.rawValue)
        let entry = SPDEntry(policy: policy, lastUse: nil, densePosition: Int32(self.dense[d].count))
        let slot: Int32
        if let free = self.freeSlots.popLast() {
            slot = free
            self.slots[Int(slot)] = entry
        } else {
            slot = Int32(self.slots.count)
            self.slots.append(entry)
        }
        self.dense[d].append(slot)
        self.byKey[policy.key] = slot
        self.byIndex[policy.index] = slot
        let candidate = PolicyCandidate(policy, slot: slot)
        if policy.offload != nil {
            self.offloaded[d].insert(candidate, selector: policy.selector)
        } else {
            self.software[d].insert(candidate, selector: policy.selector)
        }
        return policy
    }

    /// xfrm_gen_index: generator | direction, stepping by 8, 0 read as 8, skipping live indices.
    private mutating func allocateIndex(direction: PolicyDirection) -> UInt32 {
        while true {
            var index = self.indexGenerator | UInt32(direction.rawValue)
            self.indexGenerator &+= 8
            if index == 0 { index = 8 }
            if self.byIndex[index] == nil { return index }
        }
    }

    @discardableResult
    mutating func remove(slot: Int32) -> Policy {
        let entry = self.slots[Int(slot)]
        let policy = entry.policy!
        let d = Int(policy.direction.rawValue)
        if policy.offload != nil {
            self.offloaded[d].remove(slot: slot, priority: policy.priority, generation: policy.generation,
                                     selector: policy.selector)
        } else {
            self.software[d].remove(slot: slot, priority: policy.priority, generation: policy.generation,
                                    selector: policy.selector)
        }
        self.byKey[policy.key] = nil
        self.byIndex[policy.index] = nil
        let position = Int(entry.densePosition)
        let last = self.dense[d].removeLast()
        if last != slot {
            self.dense[d][position] = last
            self.slots[Int(last)].densePosition = Int32(position)
        }
        self.slots[Int(slot)] = SPDEntry(policy: nil, lastUse: nil, densePosition: -1)
        self.freeSlots.append(slot)
        return policy
    }

    /// Live slots, newest generation first.
    func slotsInListOrder() -> [Int32] {
        var all: [(generation: UInt64, slot: Int32)] = []
        all.reserveCapacity(self.byKey.count)
        for dir in self.dense {
            for slot in dir { all.append((self.slots[Int(slot)].policy!.generation, slot)) }
        }
        all.sort { $0.generation > $1.generation }
        return all.map(\.slot)
    }
}
