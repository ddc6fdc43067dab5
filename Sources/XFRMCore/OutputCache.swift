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

    struct Entry {
        var flow: Flow
        var generation: UInt64
        var decision: Decision
        var lastUse: UInt64
    }

    static let slots = 64
    private let table: UnsafeMutablePointer<Mutex<Entry?>>

    init() {
        self.table = .allocate(capacity: Self.slots)
        for i in 0..<Self.slots { (self.table + i).initialize(to: Mutex(nil)) }
    }

    deinit {
        self.table.deinitialize(count: Self.slots)
        self.table.deallocate()
    }

    @inline(__always)
    private func slot(_ flow: Flow) -> Int {
        var h = Hasher()
        h.combine(flow)
        return Int(UInt(bitPattern: h.finalize()) % UInt(Self.slots))
    }

    /// The cached decision for `flow` made in `generation`; stamps its use time and says whether the policy's use
    /// time is due for an update (once per second).
    @inline(__always)
    func lookup(_ flow: Flow, generation: UInt64, now: UInt64) -> (Entry, touchPolicy: Bool)? {
        self.table[self.slot(flow)].withLock { e -> (Entry, Bool)? in
            guard let entry = e else { return nil }
            guard entry.generation == generation else {
                e = nil  // stale: let the SA (and its keys) go
                return nil
            }
            guard entry.flow == flow else { return nil }
            let touch = entry.lastUse != now
            if touch { e!.lastUse = now }
            return (entry, touch)
        }
    }

    /// Forgets entries made in an older generation, so deleted SAs (and their keys) are not kept alive.
    func dropStale(generation: UInt64) {
        for i in 0..<Self.slots {
            self.table[i].withLock { e in
                if let entry = e, entry.generation != generation { e = nil }
            }
        }
    }

    @inline(__always)
    func store(_ entry: Entry) {
        self.table[self.slot(entry.flow)].withLock { $0 = entry }
    }
}
