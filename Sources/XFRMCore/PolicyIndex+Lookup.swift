// The lookup half of PolicyIndex (≈ the walk of xfrm_policy_lookup_bytype over the exact and inexact bins): the
// destination tree, the source trees on the flow's path, and the sorted candidate lists of each leaf, with the
// pruning described at the top of PolicyIndex.swift. The hot path: no allocation, no existential, no mutation
// (readers run it concurrently on a Left-Right copy; see LeftRight.swift).

import XFRMPacket

extension PolicyIndex {
    /// Improves `best` with this index's best match for `flow`. Reads only: it may run on several threads at once.
    @inline(__always)
    func lookup(_ flow: Flow, _ best: inout LookupBest) {
        if self.count == 0 { return }
        self.nodes.elements.withUnsafeBufferPointer { nodes in
            self.leaves.elements.withUnsafeBufferPointer { leaves in
                self.lists.elements.withUnsafeBufferPointer { lists in
                    Self.walk(Tables(nodes: nodes, leaves: leaves, lists: lists), flow, &best)
                }
            }
        }
    }

    @inline(__always)
    private static func walk(_ tables: Tables, _ flow: Flow, _ best: inout LookupBest) {
        let dst: AddressBits
        let root: Int32
        switch flow.destination {
        case .v4(let a):
            dst = AddressBits(hi: UInt64(a) &<< 32, lo: 0)
            root = Self.v4Root
        case .v6(let h, let l):
            dst = AddressBits(hi: h, lo: l)
            root = Self.v6Root
        }
        guard flow.source.version == flow.destination.version else {
            // A source of the other family is covered by no prefix of a family-4/6 selector, not even /0
            // (IPPrefix.contains); only family-0 selectors can match, and they all sit at /0 -> /0.
            let srcRoot = tables.nodes[Int(root)].payload
            guard srcRoot >= 0 else { return }
            let leaf = tables.nodes[Int(srcRoot)].payload
            guard leaf >= 0 else { return }
            Self.search(leaf: leaf, tables, requireAnyFamily: true, flow, &best)
            return
        }
        let src = AddressBits(flow.source)
        var d = root
        while d >= 0 {
            let dn = tables.nodes[Int(d)]
            let dlen = Int(dn.length)
            if dlen > 0 && dst.commonPrefixLength(dn.bits) < dlen { break }  // off the flow's path
            if dn.subtreeBound > best.priority { break }  // nothing at or below this node can win
            if dn.payload >= 0 && dn.priorityBound <= best.priority {
                Self.searchSources(tables, root: dn.payload, src: src, flow, &best)
            }
            if dlen >= 128 { break }
            d = dn.child(dst.bit(dlen))
        }
    }

    /// The index's arrays, seen through buffers for the duration of one lookup.
    private struct Tables {
        let nodes: UnsafeBufferPointer<TrieNode>
        let leaves: UnsafeBufferPointer<PolicyLeaf>
        let lists: UnsafeBufferPointer<ContiguousArray<PolicyCandidate>>
    }

    @inline(__always)
    private static func searchSources(_ tables: Tables, root: Int32, src: AddressBits, _ flow: Flow,
                                      _ best: inout LookupBest) {
        var s = root
        while s >= 0 {
            let sn = tables.nodes[Int(s)]
            let slen = Int(sn.length)
            if slen > 0 && src.commonPrefixLength(sn.bits) < slen { break }
            if sn.subtreeBound > best.priority { break }
            if sn.payload >= 0 { Self.search(leaf: sn.payload, tables, requireAnyFamily: false, flow, &best) }
            if slen >= 128 { break }
            s = sn.child(src.bit(slen))
        }
    }

    /// Reads a leaf's any-port list and the list of the flow's destination port.
    @inline(__always)
    private static func search(leaf id: Int32, _ tables: Tables, requireAnyFamily: Bool, _ flow: Flow,
                               _ best: inout LookupBest) {
        let leaf = tables.leaves[Int(id)]
        if leaf.general >= 0 {
            Self.scan(tables.lists[Int(leaf.general)], requireAnyFamily: requireAnyFamily, flow, &best)
        }
        if !leaf.ports.isEmpty {
            let port = flow.destinationPort
            let list: Int32 = leaf.ports.withUnsafeBufferPointer { ports in
                let at = PolicyLeaf.position(of: port, in: ports)
                return at < ports.count && ports[at].port == port ? ports[at].list : -1
            }
            if list >= 0 { Self.scan(tables.lists[Int(list)], requireAnyFamily: requireAnyFamily, flow, &best) }
        }
    }

    /// Reads one sorted candidate list until its first match (the best of the list) or until nothing further in it
    /// can beat `best`.
    @inline(__always)
    private static func scan(_ candidates: ContiguousArray<PolicyCandidate>, requireAnyFamily: Bool,
                             _ flow: Flow, _ best: inout LookupBest) {
        candidates.withUnsafeBufferPointer { list in
            for c in list {
                if !c.precedes(best.priority, best.generation) { return }
                if c.matches(flow) && (!requireAnyFamily || c.anyFamily) {
                    best = LookupBest(priority: c.priority, generation: c.generation, slot: c.slot)
                    return
                }
            }
        }
    }
}
