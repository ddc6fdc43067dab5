import Synchronization
import XFRMPacket

/// The SAD's index for output resolution (≈ the kernel's `state_bydst` hash in net/xfrm/xfrm_state.c, keyed by
/// xfrm_dst_hash on destination, source and reqid; the protocol is part of the key here as well, since every
/// candidate must match it).
///
/// `xfrm_state_find` looks in two chains: the one for the flow's exact (destination, source, reqid), then the one
/// whose source is the wildcard address. `StateDatabase.resolve` does the same with `visit(_:_:)`, so the slow path
/// of a flow's first packet costs the few SAs of its tunnel instead of a scan of the whole SAD.
///
/// Each chain keeps its SAs oldest first (inserts append, in generation order), and `visit` walks it backwards,
/// newest first, as the old full scan did. The index also counts per-CPU SAs (RFC 9611) per (destination,
/// reqid, protocol), which is what the engine asks when it decides whether a tunnel's flows may spread over
/// workers.
struct StateOutputIndex {
    /// A chain's key: a hash of (destination, source, reqid, protocol). Chains are compared by hash only (8 bytes
    /// per entry instead of two addresses), so a chain may hold SAs of another key; the scan checks every field.
    typealias Key = UInt64

    /// A tunnel as a template names it (the source may come from the route): what per-CPU SAs are counted by.
    struct Target: Hashable {
        let destination: IPAddress
        let reqid: UInt32
        let proto: UInt8
    }

    private var chains: [Key: SAChain] = [:]
    private var perCPUByTarget: [Target: Int] = [:]
    /// Linked SAs bound to a CPU (XFRMA_SA_PCPU).
    private(set) var perCPU = 0 {
        didSet { self.published.value.store(self.perCPU, ordering: .relaxed) }
    }
    /// `perCPU`, readable without the SAD's lock (the output path asks it per packet).
    let published = PublishedCount()

    final class PublishedCount: Sendable {
        let value = Atomic<Int>(0)
    }

    @inline(__always)
    static func key(destination: IPAddress, source: IPAddress, reqid: UInt32, proto: UInt8) -> Key {
        var h = Hasher()
        h.combine(destination)
        h.combine(source)
        h.combine(reqid)
        h.combine(proto)
        return UInt64(bitPattern: Int64(h.finalize()))
    }

    static func key(_ sa: SecurityAssociation) -> Key {
        let c = sa.config
        return Self.key(destination: c.id.destination, source: c.source, reqid: c.reqid, proto: c.id.proto)
    }

    static func target(_ sa: SecurityAssociation) -> Target {
        Target(destination: sa.config.id.destination, reqid: sa.config.reqid, proto: sa.config.id.proto)
    }

    /// Links an SA; it must be newer (a higher generation) than every SA already linked.
    mutating func insert(_ sa: SecurityAssociation) {
        self.chains.link(sa, under: Self.key(sa))
        if sa.config.pcpuNum != nil {
            self.perCPU += 1
            self.perCPUByTarget[Self.target(sa), default: 0] += 1
        }
    }

    mutating func remove(_ sa: SecurityAssociation) {
        guard self.chains.unlink(sa, under: Self.key(sa)) else { return }
        if sa.config.pcpuNum != nil {
            self.perCPU -= 1
            let t = Self.target(sa)
            if let n = self.perCPUByTarget[t], n > 1 { self.perCPUByTarget[t] = n - 1 } else { self.perCPUByTarget[t] = nil }
        }
    }

    /// Calls `body` with the chain's SAs, newest first, until it returns true; returns whether it did.
    @inline(__always)
    func visit(_ key: Key, _ body: (SecurityAssociation) -> Bool) -> Bool {
        guard let chain = self.chains[key] else { return false }
        for sa in chain where body(sa) { return true }
        return false
    }

    /// Whether any per-CPU SA serves this tunnel.
    func hasPerCPU(_ target: Target) -> Bool { self.perCPU > 0 && self.perCPUByTarget[target] != nil }
}
