import Synchronization
import XFRMPacket

/// Per-flow memory of output decisions (≈ the dst a connected socket caches, with the xfrm bundle in it for
/// protected flows): a flow does not redo the route lookup, nor the policy lookup and SA resolution, per packet.
/// Plain flows (no policy, default accept), single-SA bundles in software or crypto offload, and packet-offload
/// flows are cached, so every mode does the same host work apart from the SA's own. Direct-mapped, one lock per slot; an entry is valid only for
/// the configuration generation it was made in, so any SPD, SAD, default-policy, device or route change empties
/// it at once.
final class OutputCache: @unchecked Sendable {
    enum Decision {
        /// No policy matched and the default accepts: leave on this interface (≈ a plain route in the dst cache).
        case plain(ifindex: Int32, mtu: Int)
        /// Packet offload through `device` with `sa` (≈ the bundle of an offloaded policy).
        case packetOffload(policyIndex: UInt32, sa: SecurityAssociation, device: any XfrmOffloadDevice,
                           offload: StateOffload, limit: Int, tunnel: Bool)
        /// A one-SA bundle in software or crypto offload (≈ a dst with its xfrm bundle).
        case bundle(policyIndex: UInt32, Bundle)
    }

    /// What a protected flow's packets need besides the SA's own work.
    struct Bundle {
        let sa: SecurityAssociation
        /// The outer packet's route.
        let ifindex: Int32
        let mtu: Int
        /// Tunnel mode: the largest inner packet that fits the path after ESP (nil in transport mode).
        let limit: Int?
        /// Crypto offload: the device the route leads to and the SA's binding; each packet still asks the
        /// driver's offload_ok, and goes in software when the device declines it.
        let device: (any XfrmOffloadDevice, StateOffload)?
    }

    /// An immutable decision (a class, so that a lookup hands out one reference instead of copying the enum and
    /// its payload).
    final class Entry: Sendable {
        let flow: Flow
        let generation: UInt64
        let decision: Decision
        init(flow: Flow, generation: UInt64, decision: Decision) {
            (self.flow, self.generation, self.decision) = (flow, generation, decision)
        }
    }

    /// A slot: the entry and when a packet last used it (for the once-a-second policy use time).
    struct Slot {
        var entry: Entry?
        var lastUse: UInt64 = 0
    }

    static let slots = 64
    private let table: UnsafeMutablePointer<Mutex<Slot>>

    init() {
        self.table = .allocate(capacity: Self.slots)
        for i in 0..<Self.slots { (self.table + i).initialize(to: Mutex(Slot())) }
    }

    deinit {
        self.table.deinitialize(count: Self.slots)
        self.table.deallocate()
    }

    /// A cheap mix of the fields that tell flows apart (the table is small and direct-mapped; equality decides).
    @inline(__always)
    private func slot(_ flow: Flow) -> Int {
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
        x ^= UInt64(UInt32(bitPattern: flow.ifindex)) ^ UInt64(flow.ifID) << 32
        x = (x ^ (x >> 29)) &* 0xbf58_476d_1ce4_e5b9
        return Int(truncatingIfNeeded: (x ^ (x >> 32)) % UInt64(Self.slots))
    }

    /// The cached decision for `flow` made in `generation`; stamps its use time and says whether the policy's use
    /// time is due for an update (once per second).
    @inline(__always)
    func lookup(_ flow: Flow, generation: UInt64, now: UInt64) -> (Entry, touchPolicy: Bool)? {
        self.table[self.slot(flow)].withLock { s -> (Entry, Bool)? in
            guard let entry = s.entry else { return nil }
            guard entry.generation == generation else {
                s.entry = nil  // stale: let the SA (and its keys) go
                return nil
            }
            guard entry.flow == flow else { return nil }
            let touch = s.lastUse != now
            if touch { s.lastUse = now }
            return (entry, touch)
        }
    }

    /// Forgets entries made in an older generation, so deleted SAs (and their keys) are not kept alive.
    func dropStale(generation: UInt64) {
        for i in 0..<Self.slots {
            self.table[i].withLock { s in
                if let entry = s.entry, entry.generation != generation { s.entry = nil }
            }
        }
    }

    @inline(__always)
    func store(_ entry: Entry, now: UInt64) {
        self.table[self.slot(entry.flow)].withLock { $0 = Slot(entry: entry, lastUse: now) }
    }
}
