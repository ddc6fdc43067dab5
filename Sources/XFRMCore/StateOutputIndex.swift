import XFRMPacket

/// The SAD's index for output resolution (≈ the kernel's `state_bydst` hash in net/xfrm/xfrm_state.c, keyed by
/// xfrm_dst_hash on destination, source and reqid; the protocol is part of the key here as well, since every
/// candidate must match it).
///
/// `xfrm_state_find` looks in two chains: the one for the flow's exact (destination, source, reqid), then the one
/// whose source is the wildcard address. `StateDatabase.resolve` does the same with `bucket(_:)`, so the slow path
/// of a flow's first packet costs the few SAs of its tunnel instead of a scan of the whole SAD.
///
/// Each bucket keeps its SAs oldest first (inserts append, in generation order), so walking it backwards visits
/// them newest first, as the old full scan did. The index also counts per-CPU SAs (RFC 9611) per (destination,
/// reqid, protocol), which is what the engine asks when it decides whether a tunnel's flows may spread over
/// workers.
struct StateOutputIndex {
    struct Key: Hashable {
        let destination: IPAddress
        let source: IPAddress
        let reqid: UInt32
        let proto: UInt8
    }

    /// A tunnel as a template names it (the source may come from the route): what per-CPU SAs are counted by.
    struct Target: Hashable {
        let destination: IPAddress
        let reqid: UInt32
        let proto: UInt8
    }

    private var buckets: [Key: [SecurityAssociation]] = [:]
    private var perCPUByTarget: [Target: Int] = [:]
    /// Linked SAs bound to a CPU (XFRMA_SA_PCPU).
    private(set) var perCPU = 0

    static func key(_ sa: SecurityAssociation) -> Key {
        let c = sa.config
        return Key(destination: c.id.destination, source: c.source, reqid: c.reqid, proto: c.id.proto)
    }

    static func target(_ sa: SecurityAssociation) -> Target {
        Target(destination: sa.config.id.destination, reqid: sa.config.reqid, proto: sa.config.id.proto)
    }

    /// Links an SA; it must be newer (a higher generation) than every SA already linked.
    mutating func insert(_ sa: SecurityAssociation) {
        self.buckets[Self.key(sa), default: []].append(sa)
        if sa.config.pcpuNum != nil {
            self.perCPU += 1
            self.perCPUByTarget[Self.target(sa), default: 0] += 1
        }
    }

    mutating func remove(_ sa: SecurityAssociation) {
        let key = Self.key(sa)
        guard var list = self.buckets[key], let i = list.lastIndex(where: { $0 === sa }) else { return }
        list.remove(at: i)
        self.buckets[key] = list.isEmpty ? nil : list
        if sa.config.pcpuNum != nil {
            self.perCPU -= 1
            let t = Self.target(sa)
            if let n = self.perCPUByTarget[t], n > 1 { self.perCPUByTarget[t] = n - 1 } else { self.perCPUByTarget[t] = nil }
        }
    }

    /// The SAs for exactly this destination, source, reqid and protocol, oldest first.
    @inline(__always)
    func bucket(_ key: Key) -> [SecurityAssociation]? { self.buckets[key] }

    /// Whether any per-CPU SA serves this tunnel.
    func hasPerCPU(_ target: Target) -> Bool { self.perCPU > 0 && self.perCPUByTarget[target] != nil }
}
