import Synchronization
import XFRMPacket

/// Per-flow memory of decisions, direct-mapped, one lock per slot (the data path's only lock for a cached flow). An
/// entry is valid only for the configuration generation it was made in, so any SPD, SAD, default-policy, device or
/// route change empties it at once; `tag` tells apart entries of one flow that depend on more than the flow (the
/// input cache: the SA the packet came through).
final class FlowCache<Value>: @unchecked Sendable {
    /// An immutable decision (a class, so that a lookup hands out one reference instead of copying the value).
    final class Entry: @unchecked Sendable {
        let flow: Flow
        let tag: UInt
        let generation: UInt64
        let value: Value
        init(flow: Flow, tag: UInt = 0, generation: UInt64, value: Value) {
            (self.flow, self.tag, self.generation, self.value) = (flow, tag, generation, value)
        }
    }

    /// A slot: the entry and when a packet last used it (for the once-a-second policy use time).
    struct Slot {
        var entry: Entry?
        var lastUse: UInt64 = 0
    }

    static var slots: Int { 64 }
    private let table: UnsafeMutablePointer<XFRMMutex<Slot>>
    /// The generation the last sweep (`dropStale`) removed everything older than: a sweep at the same generation has
    /// nothing to do, and `store` refuses an entry older than it (made by a worker that read the generation before
    /// the change), so none outlives the sweep.
    private let swept = Atomic<UInt64>(0)

    init() {
        self.table = .allocate(capacity: Self.slots)
        for i in 0..<Self.slots { (self.table + i).initialize(to: XFRMMutex(Slot())) }
    }

    deinit {
        self.table.deinitialize(count: Self.slots)
        self.table.deallocate()
    }

    /// A cheap mix of the fields that tell flows apart (the table is small and direct-mapped; equality decides).
    @inline(__always)
    private func slot(_ flow: Flow, _ tag: UInt) -> Int {
        var x = UInt64(flow.proto) | UInt64(flow.sourcePort) << 8 | UInt64(flow.destinationPort) << 24
            | UInt64(flow.mark) << 40
        switch flow.destination {
        case .v4(let a): x ^= UInt64(a) &* 0x9e37_79b9_7f4a_7c15
        case .v6(let h, let l): x ^= (h ^ l) &* 0x9e37_79b9_7f4a_7c15
        }
        switch flow.source {
        case .v4(let a): x ^= UInt64(a) &* 0xc2b2_ae3d_27d4_eb4f
        case .v6(let h, let l): x ^= (h ^ l) &* 0xc2b2_ae3d_27d4_eb4f
        }
        x ^= UInt64(UInt32(bitPattern: flow.ifindex)) ^ UInt64(flow.ifID) << 32 ^ UInt64(tag) >> 4
        x = (x ^ (x >> 29)) &* 0xbf58_476d_1ce4_e5b9
        return Int(truncatingIfNeeded: (x ^ (x >> 32)) % UInt64(Self.slots))
    }

    /// The cached value for `flow` (and `tag`) made in `generation`; stamps its use time and says whether the
    /// policy's use time is due for an update (once per second).
    @inline(__always)
    func lookup(_ flow: Flow, tag: UInt = 0, generation: UInt64, now: UInt64) -> (Entry, touchPolicy: Bool)? {
        self.table[self.slot(flow, tag)].withLock { s -> (Entry, Bool)? in
            guard let entry = s.entry else { return nil }
            guard entry.generation == generation else {
                // Stale: let the SA (and its keys) go; but an entry newer than this packet's view stays.
                if entry.generation < generation { s.entry = nil }
                return nil
            }
            guard entry.tag == tag, entry.flow == flow else { return nil }
            let touch = s.lastUse != now
            if touch { s.lastUse = now }
            return (entry, touch)
        }
    }

    /// Forgets entries made in an older generation, so deleted SAs (and their keys) are not kept alive.
    func dropStale(generation: UInt64) {
        // Publish the generation before taking any slot's lock: a `store` that takes a slot's lock after this sweep
        // did sees it and refuses an older entry; one that took it before is swept.
        var seen = self.swept.load(ordering: .acquiring)
        while true {
            guard seen < generation else { return }
            let (done, now) = self.swept.compareExchange(expected: seen, desired: generation,
                                                          ordering: .sequentiallyConsistent)
            if done { break }
            seen = now
        }
        for i in 0..<Self.slots {
            self.table[i].withLock { s in
                if let entry = s.entry, entry.generation < generation { s.entry = nil }
            }
        }
    }

    @inline(__always)
    func store(_ entry: Entry, now: UInt64) {
        self.table[self.slot(entry.flow, entry.tag)].withLock { s in
            // A worker that read an older generation does not overwrite a newer entry.
            if let old = s.entry, old.generation > entry.generation { return }
            if entry.generation < self.swept.load(ordering: .relaxed) { return }
            s = Slot(entry: entry, lastUse: now)
        }
    }
}
