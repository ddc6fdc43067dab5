// What PolicyDatabase keeps, split by who reads it (see the concurrency paragraph of PolicyDatabase.swift):
// - SPDLookupTables, in two Left-Right copies read by lookups without a lock: per direction the radix indexes of
//   packet-offloaded and software policies (≈ the kernel's per-direction policy_bydst tables and inexact bins), and
//   index → slot (≈ policy_byidx), so that a packet can record a use by index without the lock;
// - SPDState, behind the database's lock: the key → slot map (≈ the duplicate test of xfrm_policy_insert), the
//   per-direction slot lists (counts, the linear scan, listings), slot allocation, the index and generation
//   counters. The policies themselves live once, in the shared PolicySlotTable.

import XFRMPacket

/// The lookup side, one Left-Right copy. Readers call only the non-mutating methods. A change (`link`, `unlink`)
/// runs on one copy; the other copy then copies what it wrote (`replicate`, see TrackedArray).
struct SPDLookupTables: Equatable {
    var software = ContiguousArray([PolicyIndex(), PolicyIndex(), PolicyIndex()])
    var offloaded = ContiguousArray([PolicyIndex(), PolicyIndex(), PolicyIndex()])
    /// Policy index → slot. A policy's index encodes its direction (index & 7), so the index alone is the key.
    private(set) var byIndex: [UInt32: Int32] = [:]
    /// Keys of `byIndex` written since this copy last received a replication.
    private var byIndexDirty: [UInt32] = []
    /// The indexes a change wrote since this copy last received a replication: bit d for software[d], bit 3 + d
    /// for offloaded[d].
    private var touched: UInt8 = 0

    static func == (a: Self, b: Self) -> Bool {
        a.software == b.software && a.offloaded == b.offloaded && a.byIndex == b.byIndex
    }

    /// Makes this copy equal to `live` (which ran the changes since this copy's last replication).
    mutating func replicate(from live: UnsafePointer<SPDLookupTables>) {
        // Also the indexes this copy changed last time: their dirty lists are cleared by the replication.
        let mask = live.pointee.touched | self.touched
        for d in 0..<3 {
            if mask & (1 << d) != 0 { self.software[d].replicate(from: live.pointee.software[d]) }
            if mask & (8 << d) != 0 { self.offloaded[d].replicate(from: live.pointee.offloaded[d]) }
        }
        self.touched = 0
        self.byIndexDirty.removeAll(keepingCapacity: true)
        for key in live.pointee.byIndexDirty { self.byIndex[key] = live.pointee.byIndex[key] }
    }

    /// The slot of the best policy for `flow`, -1 if none: offloaded policies first, then software ones.
    @inline(__always)
    func lookupSlot(_ direction: PolicyDirection, _ flow: Flow) -> Int32 {
        let d = Int(direction.rawValue)
        var best = LookupBest()
        self.offloaded[d].lookup(flow, &best)
        if best.slot < 0 { self.software[d].lookup(flow, &best) }
        return best.slot
    }

    /// The slot of the policy with this index in `direction`, if any.
    @inline(__always)
    func slot(index: UInt32, direction: PolicyDirection) -> Int32? {
        guard index & 7 == UInt32(direction.rawValue) else { return nil }
        return self.byIndex[index]
    }

    mutating func link(_ policy: Policy, slot: Int32) {
        let d = Int(policy.direction.rawValue)
        self.touched |= (policy.offload != nil ? 8 : 1) << d
        let candidate = PolicyCandidate(policy, slot: slot)
        if policy.offload != nil {
            self.offloaded[d].insert(candidate, selector: policy.selector)
        } else {
            self.software[d].insert(candidate, selector: policy.selector)
        }
        self.byIndex[policy.index] = slot
        self.byIndexDirty.append(policy.index)
    }

    mutating func unlink(_ policy: Policy, slot: Int32) {
        let d = Int(policy.direction.rawValue)
        self.touched |= (policy.offload != nil ? 8 : 1) << d
        if policy.offload != nil {
            self.offloaded[d].remove(slot: slot, priority: policy.priority, generation: policy.generation,
                                     selector: policy.selector)
        } else {
            self.software[d].remove(slot: slot, priority: policy.priority, generation: policy.generation,
                                    selector: policy.selector)
        }
        if self.byIndex[policy.index] == slot {
            self.byIndex[policy.index] = nil
            self.byIndexDirty.append(policy.index)
        }
    }
}

/// One change to the lookup side, applied to each Left-Right copy in turn.
enum SPDChange {
    case link(Policy, Int32)
    case unlink(Policy, Int32)
}

/// Everything behind the database's lock.
struct SPDState {
    let slots: PolicySlotTable
    let tables: LeftRight<SPDLookupTables>
    /// Slots handed out so far (slots below are live or free).
    var slotCount: Int32 = 0
    /// Free slots: no index points to them and no reader holds them.
    var freeSlots: [Int32] = []
    /// Per slot, its position in `dense[direction]`.
    var densePosition: ContiguousArray<Int32> = []
    /// Policy.Key → slot.
    private var keys = PolicyKeyTable()
    /// Per direction, the slots of its live policies (unordered; for counts and the linear scan).
    var dense: [ContiguousArray<Int32>] = [[], [], []]
    /// The kernel's net->xfrm.idx_generator.
    var indexGenerator: UInt32 = 0
    var nextGeneration: UInt64 = 1
    /// Live policies with a time limit (the timers' work: none, and they skip the SPD).
    var timed = 0

    init(slots: PolicySlotTable, tables: LeftRight<SPDLookupTables>) {
        self.slots = slots
        self.tables = tables
    }

    /// The lookup side as the writer sees it between writes.
    var view: UnsafePointer<SPDLookupTables> { self.tables.writerView }

    func slot(index: UInt32, direction: PolicyDirection) -> Int32? {
        self.view.pointee.slot(index: index, direction: direction)
    }

    func policy(_ slot: Int32) -> Policy { self.slots.policy(slot) }

    /// The slot of the policy with this key.
    func slot(key: Policy.Key) -> Int32? { self.keys.find(key) { self.slots.key($0) } }

    var count: Int { self.keys.count }

    /// Inserts (or, with update, replaces) a policy: fills a slot, links it in both lookup copies (one
    /// Left-Right write, together with the unlinking of the policy it replaces), then frees the replaced slot.
    mutating func insert(_ new: Policy, update: Bool) throws(PolicyDatabaseError) -> Policy {
        let existing = self.slot(key: new.key)
        if existing != nil && !update { throw .exists }
        if new.index != 0, let holder = self.view.pointee.byIndex[new.index], holder != existing { throw .exists }

        var policy = new
        var changes: [SPDChange] = []
        if let existing {
            let old = self.unlinkFromState(slot: existing)
            policy.index = old.index
            changes.append(.unlink(old, existing))
        } else if policy.index == 0 {
            policy.index = self.allocateIndex(direction: policy.direction)
        }
        policy.generation = self.nextGeneration
        self.nextGeneration += 1

        let slot = self.allocateSlot()
        self.slots.store(policy, at: slot)
        if policy.lifetime.hasTimeLimit { self.timed += 1 }
        let d = Int(policy.direction.rawValue)
        self.densePosition[Int(slot)] = Int32(self.dense[d].count)
        self.dense[d].append(slot)
        self.keys.insert(policy.key, slot: slot)
        changes.append(.link(policy, slot))
        self.apply(changes)
        return policy
    }

    /// Removes the policies in these live slots (one Left-Right write for all of them); returns them in order.
    mutating func remove(slots victims: [Int32]) -> [Policy] {
        var changes: [SPDChange] = []
        changes.reserveCapacity(victims.count)
        var removed: [Policy] = []
        removed.reserveCapacity(victims.count)
        for slot in victims {
            let p = self.unlinkFromState(slot: slot)
            removed.append(p)
            changes.append(.unlink(p, slot))
        }
        self.apply(changes)
        return removed
    }

    /// Publishes the changes to the lookup side, then frees the slots they unlinked: only now can no reader hold
    /// them (LeftRight.write returns once no reader can see the old state).
    private mutating func apply(_ changes: [SPDChange]) {
        self.tables.write { t in
            for change in changes {
                switch change {
                case .link(let p, let slot): t.link(p, slot: slot)
                case .unlink(let p, let slot): t.unlink(p, slot: slot)
                }
            }
        } replicate: { t, live in
            t.replicate(from: live)
        }
        for case .unlink(_, let slot) in changes {
            self.slots.clear(slot)
            self.freeSlots.append(slot)
        }
    }

    /// Drops a live slot's policy from the locked state (key, direction list); the lookup side and the slot itself
    /// are the caller's (`apply`).
    private mutating func unlinkFromState(slot: Int32) -> Policy {
        let policy = self.slots.policy(slot)
        let d = Int(policy.direction.rawValue)
        if policy.lifetime.hasTimeLimit { self.timed -= 1 }
        self.keys.remove(policy.key, slot: slot)
        let position = Int(self.densePosition[Int(slot)])
        let last = self.dense[d].removeLast()
        if last != slot {
            self.dense[d][position] = last
            self.densePosition[Int(last)] = Int32(position)
        }
        self.densePosition[Int(slot)] = -1
        return policy
    }

    private mutating func allocateSlot() -> Int32 {
        if let free = self.freeSlots.popLast() { return free }
        let slot = self.slotCount
        if Int(slot) >= self.slots.capacity { self.slots.grow() }
        self.slotCount += 1
        self.densePosition.append(-1)
        return slot
    }

    /// xfrm_gen_index: generator | direction, stepping by 8, 0 read as 8, skipping live indices.
    private mutating func allocateIndex(direction: PolicyDirection) -> UInt32 {
        while true {
            var index = self.indexGenerator | UInt32(direction.rawValue)
            self.indexGenerator &+= 8
            if index == 0 { index = 8 }
            if self.view.pointee.byIndex[index] == nil { return index }
        }
    }

    /// Live slots, newest generation first.
    func slotsInListOrder() -> [Int32] {
        var all: [(generation: UInt64, slot: Int32)] = []
        all.reserveCapacity(self.count)
        for dir in self.dense {
            for slot in dir { all.append((self.slots.policy(slot).generation, slot)) }
        }
        all.sort { $0.generation > $1.generation }
        return all.map(\.slot)
    }
}
