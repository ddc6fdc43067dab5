// The lookup structure behind PolicyDatabase: for one direction and one kind (packet-offloaded or software) of
// policy, a path-compressed binary trie (radix tree) on the destination prefix per family, whose nodes hold a second
// radix tree on the source prefix, whose nodes hold leaves of candidate lists sorted by (priority, generation): one
// list for the policies of that prefix pair without an exact destination port, and one list per exact destination
// port (found by binary search), so that many port-specific policies on one prefix pair do not turn a lookup into a
// list scan.
//
// A lookup walks the flow's destination path from the family's /0 root; every destination node on that path covers
// the flow's destination. For each one that holds a source tree, it walks the flow's source path the same way, and
// in each leaf on it reads the any-port list and the list of the flow's destination port, taking the first entry
// whose protocol, ports, interface and mark match: the lists are sorted, so that entry is the best of its list.
// A list stops being read as soon as its next entry cannot beat the best found so far (that prunes whole lists
// whose head is already worse), and every node carries lower bounds of the priorities stored below it, so a walk
// also stops, or skips a source tree, once nothing there can win. The cost is bounded by the depth of the trees
// (about log2 of the prefixes plus the distinct prefix lengths on the path), not by the number of policies. The
// bounds are lowered on insert and only reset when a source tree empties, so after deletions they may be loose
// (never wrong): pruning gets weaker, answers stay exact.
//
// Family-0 selectors (AF_UNSPEC, zero-length prefixes) are linked into the /0 root of both families' trees.
// All nodes of all trees live in one array (indices, not references: no ARC traffic on the hot path); freed nodes,
// leaves and lists are recycled through free lists.

import XFRMPacket

/// An address as 128 left-aligned bits (IPv4 in the top 32), so both families share one tree implementation.
struct AddressBits: Equatable, Sendable {
    var hi: UInt64
    var lo: UInt64

    static let zero = AddressBits(hi: 0, lo: 0)

    init(hi: UInt64, lo: UInt64) {
        self.hi = hi
        self.lo = lo
    }

    @inline(__always)
    init(_ address: IPAddress) {
        switch address {
        case .v4(let a):
            self.hi = UInt64(a) &<< 32
            self.lo = 0
        case .v6(let h, let l):
            self.hi = h
            self.lo = l
        }
    }

    /// Only the first `length` bits kept.
    @inline(__always)
    func masked(_ length: Int) -> AddressBits {
        if length <= 0 { return .zero }
        if length < 64 { return AddressBits(hi: self.hi & ~(UInt64.max &>> UInt64(length)), lo: 0) }
        if length == 64 { return AddressBits(hi: self.hi, lo: 0) }
        if length < 128 { return AddressBits(hi: self.hi, lo: self.lo & ~(UInt64.max &>> UInt64(length - 64))) }
        return self
    }

    /// Bit `i` (0 = most significant), for i < 128.
    @inline(__always)
    func bit(_ i: Int) -> Int {
        i < 64 ? Int(truncatingIfNeeded: (self.hi &>> UInt64(63 - i)) & 1)
            : Int(truncatingIfNeeded: (self.lo &>> UInt64(127 - i)) & 1)
    }

    /// How many leading bits the two share (128 when equal).
    @inline(__always)
    func commonPrefixLength(_ other: AddressBits) -> Int {
        let h = self.hi ^ other.hi
        if h != 0 { return h.leadingZeroBitCount }
        return 64 + (self.lo ^ other.lo).leadingZeroBitCount
    }
}

/// One radix-tree node: a prefix, two children and an optional payload (in a destination tree, the root node of a
/// source tree; in a source tree, a leaf id). -1 means none.
struct TrieNode: Sendable {
    var bits: AddressBits
    var length: Int32
    var parent: Int32
    var child0: Int32
    var child1: Int32
    var payload: Int32
    /// In a destination tree: a lower bound of the priority values in the source tree (payload). Raised only when
    /// that tree is emptied, so after removals it may be lower than the true minimum (still a valid bound).
    var priorityBound: UInt32
    /// A lower bound of the priority values under this node (in a destination tree: in its own source tree and
    /// those of its descendants; in a source tree: in its list and its descendants'), kept the same way; a walk
    /// stops where nothing below can beat the best found so far.
    var subtreeBound: UInt32

    init(bits: AddressBits, length: Int, parent: Int32) {
        self.bits = bits
        self.length = Int32(length)
        self.parent = parent
        self.child0 = -1
        self.child1 = -1
        self.payload = -1
        self.priorityBound = .max
        self.subtreeBound = .max
    }

    @inline(__always) func child(_ b: Int) -> Int32 { b == 0 ? self.child0 : self.child1 }
    @inline(__always) mutating func setChild(_ b: Int, _ n: Int32) {
        if b == 0 { self.child0 = n } else { self.child1 = n }
    }
}

/// What the lookup checks of a policy once its prefixes are known to cover the flow, copied out of the Policy so
/// the hot path reads a small flat record.
struct PolicyCandidate: Sendable {
    var priority: UInt32
    var slot: Int32
    var generation: UInt64
    var markValue: UInt32
    var markMask: UInt32
    var ifID: UInt32
    var ifindex: Int32
    var sourcePort: UInt16
    var sourcePortMask: UInt16
    var destinationPort: UInt16
    var destinationPortMask: UInt16
    var proto: UInt8
    /// A family-0 selector (matches a flow whatever its families).
    var anyFamily: Bool

    init(_ policy: Policy, slot: Int32) {
        self.priority = policy.priority
        self.slot = slot
        self.generation = policy.generation
        self.markValue = policy.mark.value
        self.markMask = policy.mark.mask
        self.ifID = policy.ifID
        self.ifindex = policy.selector.ifindex
        self.sourcePort = policy.selector.sourcePort
        self.sourcePortMask = policy.selector.sourcePortMask
        self.destinationPort = policy.selector.destinationPort
        self.destinationPortMask = policy.selector.destinationPortMask
        self.proto = policy.selector.proto
        self.anyFamily = policy.selector.family == 0
    }

    /// Strictly better than (priority, generation): lower priority value, or equal and older.
    @inline(__always)
    func precedes(_ priority: UInt32, _ generation: UInt64) -> Bool {
        self.priority < priority || (self.priority == priority && self.generation < generation)
    }

    /// The non-prefix half of Selector.matches plus Mark.matches and the if_id.
    @inline(__always)
    func matches(_ flow: Flow) -> Bool {
        (self.proto == 0 || self.proto == flow.proto)
            && (flow.destinationPort ^ self.destinationPort) & self.destinationPortMask == 0
            && (flow.sourcePort ^ self.sourcePort) & self.sourcePortMask == 0
            && (self.ifindex == 0 || self.ifindex == flow.ifindex)
            && flow.mark & self.markMask == self.markValue
            && self.ifID == flow.ifID  // ≈ xfrm_policy_match: pol->if_id != if_id → no match
    }
}

/// The candidate lists of one (destination, source) prefix pair: policies with an exact destination port (mask
/// 0xffff) are kept per port, the others in `general`.
struct PolicyLeaf: Sendable {
    struct PortList: Sendable {
        var port: UInt16
        var list: Int32
    }
    /// List id for the policies without an exact destination port, -1 if none.
    var general: Int32 = -1
    /// Sorted by port.
    var ports: ContiguousArray<PortList> = []

    var isEmpty: Bool { self.general < 0 && self.ports.isEmpty }

    /// The position of `port` in `ports`, or where it would go.
    @inline(__always)
    static func position(of port: UInt16, in ports: UnsafeBufferPointer<PortList>) -> Int {
        var lo = 0
        var hi = ports.count
        while lo < hi {
            let mid = (lo + hi) &>> 1
            if ports[mid].port < port { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}

/// The best candidate found so far by a lookup (slot -1: none).
struct LookupBest {
    var priority: UInt32 = .max
    var generation: UInt64 = .max
    var slot: Int32 = -1
}

/// The two-level radix index for one direction and kind of policy.
struct PolicyIndex: Sendable {
    private var nodes: ContiguousArray<TrieNode>
    private var freeNodes: [Int32] = []
    private var lists: ContiguousArray<ContiguousArray<PolicyCandidate>> = []
    private var leaves: ContiguousArray<PolicyLeaf> = []
    private var freeLeaves: [Int32] = []
    private var freeLists: [Int32] = []
    /// Policies indexed (a family-0 policy counts once).
    private(set) var count = 0

    private static let v4Root: Int32 = 0
    private static let v6Root: Int32 = 1

    init() {
        self.nodes = [
            TrieNode(bits: .zero, length: 0, parent: -1),
            TrieNode(bits: .zero, length: 0, parent: -1),
        ]
    }

    // MARK: Insertion and removal

    /// Links `candidate` under the policy's selector (already validated by the database).
    mutating func insert(_ candidate: PolicyCandidate, selector: Selector) {
        if selector.family == 0 {
            self.insert(candidate, root: Self.v4Root, dst: .zero, dstLength: 0, src: .zero, srcLength: 0)
            self.insert(candidate, root: Self.v6Root, dst: .zero, dstLength: 0, src: .zero, srcLength: 0)
        } else {
            let dl = Int(selector.destination.length)
            let sl = Int(selector.source.length)
            self.insert(
                candidate, root: selector.family == 6 ? Self.v6Root : Self.v4Root,
                dst: AddressBits(selector.destination.address).masked(dl), dstLength: dl,
                src: AddressBits(selector.source.address).masked(sl), srcLength: sl)
        }
        self.count += 1
    }

    /// Unlinks the candidate for `slot` that was inserted with this selector, priority and generation.
    mutating func remove(slot: Int32, priority: UInt32, generation: UInt64, selector: Selector) {
        let port: UInt16? = selector.destinationPortMask == 0xffff ? selector.destinationPort : nil
        if selector.family == 0 {
            self.remove(slot, priority, generation, port, root: Self.v4Root, dst: .zero, dstLength: 0, src: .zero,
                        srcLength: 0)
            self.remove(slot, priority, generation, port, root: Self.v6Root, dst: .zero, dstLength: 0, src: .zero,
                        srcLength: 0)
        } else {
            let dl = Int(selector.destination.length)
            let sl = Int(selector.source.length)
            self.remove(
                slot, priority, generation, port, root: selector.family == 6 ? Self.v6Root : Self.v4Root,
                dst: AddressBits(selector.destination.address).masked(dl), dstLength: dl,
                src: AddressBits(selector.source.address).masked(sl), srcLength: sl)
        }
        self.count -= 1
    }

    private mutating func insert(_ candidate: PolicyCandidate, root: Int32, dst: AddressBits, dstLength: Int,
                                 src: AddressBits, srcLength: Int) {
        let d = self.findOrCreate(root: root, bits: dst, length: dstLength)
        var srcRoot = self.nodes[Int(d)].payload
        if srcRoot < 0 {
            srcRoot = self.allocateNode(TrieNode(bits: .zero, length: 0, parent: -1))
            self.nodes[Int(d)].payload = srcRoot
            self.nodes[Int(d)].priorityBound = .max
        }
        self.nodes[Int(d)].priorityBound = min(self.nodes[Int(d)].priorityBound, candidate.priority)
        self.lowerSubtreeBounds(from: d, to: candidate.priority)
        let s = self.findOrCreate(root: srcRoot, bits: src, length: srcLength)
        self.lowerSubtreeBounds(from: s, to: candidate.priority)
        var leaf = self.nodes[Int(s)].payload
        if leaf < 0 {
            leaf = self.allocateLeaf()
            self.nodes[Int(s)].payload = leaf
        }
        let list: Int32
        if candidate.destinationPortMask == 0xffff {
            let port = candidate.destinationPort
            let at = self.leaves[Int(leaf)].ports.withUnsafeBufferPointer { PolicyLeaf.position(of: port, in: $0) }
            if at < self.leaves[Int(leaf)].ports.count && self.leaves[Int(leaf)].ports[at].port == port {
                list = self.leaves[Int(leaf)].ports[at].list
            } else {
                list = self.allocateList()
                self.leaves[Int(leaf)].ports.insert(PolicyLeaf.PortList(port: port, list: list), at: at)
            }
        } else {
            if self.leaves[Int(leaf)].general < 0 { self.leaves[Int(leaf)].general = self.allocateList() }
            list = self.leaves[Int(leaf)].general
        }
        // Sorted by (priority, generation); a new policy normally lands at the end of its priority group.
        let position = Self.position(in: self.lists[Int(list)], priority: candidate.priority,
                                     generation: candidate.generation)
        self.lists[Int(list)].insert(candidate, at: position)
    }

    private mutating func remove(_ slot: Int32, _ priority: UInt32, _ generation: UInt64, _ port: UInt16?, root: Int32,
                                 dst: AddressBits, dstLength: Int, src: AddressBits, srcLength: Int) {
        guard let d = self.findExact(root: root, bits: dst, length: dstLength) else {
            preconditionFailure("PolicyIndex: destination prefix of an indexed policy is missing")
        }
        let srcRoot = self.nodes[Int(d)].payload
        guard srcRoot >= 0, let s = self.findExact(root: srcRoot, bits: src, length: srcLength) else {
            preconditionFailure("PolicyIndex: source prefix of an indexed policy is missing")
        }
        let leaf = self.nodes[Int(s)].payload
        precondition(leaf >= 0, "PolicyIndex: leaf of an indexed policy is missing")
        let list: Int32
        var portPosition = -1
        if let port {
            portPosition = self.leaves[Int(leaf)].ports.withUnsafeBufferPointer {
                PolicyLeaf.position(of: port, in: $0)
            }
            precondition(portPosition < self.leaves[Int(leaf)].ports.count
                         && self.leaves[Int(leaf)].ports[portPosition].port == port,
                         "PolicyIndex: port list of an indexed policy is missing")
            list = self.leaves[Int(leaf)].ports[portPosition].list
        } else {
            list = self.leaves[Int(leaf)].general
            precondition(list >= 0, "PolicyIndex: candidate list of an indexed policy is missing")
        }
        var i = Self.position(in: self.lists[Int(list)], priority: priority, generation: generation)
        // `position` returns the first entry not before (priority, generation): the entry itself.
        while i < self.lists[Int(list)].count && self.lists[Int(list)][i].slot != slot { i += 1 }
        precondition(i < self.lists[Int(list)].count, "PolicyIndex: indexed policy not in its list")
        self.lists[Int(list)].remove(at: i)
        guard self.lists[Int(list)].isEmpty else { return }

        // The list is empty: drop it, then possibly the leaf, the source node, the source tree and the destination
        // node.
        self.lists[Int(list)] = []
        self.freeLists.append(list)
        if portPosition >= 0 {
            self.leaves[Int(leaf)].ports.remove(at: portPosition)
        } else {
            self.leaves[Int(leaf)].general = -1
        }
        guard self.leaves[Int(leaf)].isEmpty else { return }
        self.leaves[Int(leaf)] = PolicyLeaf()
        self.freeLeaves.append(leaf)
        self.nodes[Int(s)].payload = -1
        self.prune(s)
        let r = self.nodes[Int(srcRoot)]
        if r.payload < 0 && r.child0 < 0 && r.child1 < 0 {
            self.freeNode(srcRoot)
            self.nodes[Int(d)].payload = -1
            self.nodes[Int(d)].priorityBound = .max
            self.prune(d)
        }
    }

    /// Makes `priority` count in the subtree bounds of `node` and its ancestors in its tree. Parents never have a
    /// higher bound than their children, so the walk stops at the first node already low enough.
    private mutating func lowerSubtreeBounds(from node: Int32, to priority: UInt32) {
        var up = node
        while up >= 0 && self.nodes[Int(up)].subtreeBound > priority {
            self.nodes[Int(up)].subtreeBound = priority
            up = self.nodes[Int(up)].parent
        }
    }

    /// First position in `list` whose entry does not come before (priority, generation).
    private static func position(in list: ContiguousArray<PolicyCandidate>, priority: UInt32,
                                 generation: UInt64) -> Int {
        var lo = 0
        var hi = list.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if list[mid].precedes(priority, generation) { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The node for exactly bits/length in the tree at `root` (a /0 node), created (splitting an edge if needed).
    private mutating func findOrCreate(root: Int32, bits: AddressBits, length: Int) -> Int32 {
        var node = root
        while true {
            let n = self.nodes[Int(node)]
            if Int(n.length) == length { return node }
            let b = bits.bit(Int(n.length))
            let c = n.child(b)
            if c < 0 {
                let leaf = self.allocateNode(TrieNode(bits: bits, length: length, parent: node))
                self.nodes[Int(node)].setChild(b, leaf)
                return leaf
            }
            let cn = self.nodes[Int(c)]
            let common = min(bits.commonPrefixLength(cn.bits), Int(cn.length), length)
            if common == Int(cn.length) {
                node = c  // the child's prefix covers ours: descend
                continue
            }
            // The child's edge diverges from our prefix at `common` (> n.length, since both took branch b there):
            // a node at `common` goes in between.
            var m = TrieNode(bits: bits.masked(common), length: common, parent: node)
            m.subtreeBound = cn.subtreeBound
            let middle = self.allocateNode(m)
            self.nodes[Int(node)].setChild(b, middle)
            self.nodes[Int(middle)].setChild(cn.bits.bit(common), c)
            self.nodes[Int(c)].parent = middle
            if common == length { return middle }
            let leaf = self.allocateNode(TrieNode(bits: bits, length: length, parent: middle))
            self.nodes[Int(middle)].setChild(bits.bit(common), leaf)
            return leaf
        }
    }

    private func findExact(root: Int32, bits: AddressBits, length: Int) -> Int32? {
        var node = root
        while node >= 0 {
            let n = self.nodes[Int(node)]
            if Int(n.length) > length || bits.commonPrefixLength(n.bits) < Int(n.length) { return nil }
            if Int(n.length) == length { return node }
            node = n.child(bits.bit(Int(n.length)))
        }
        return nil
    }

    /// Removes `node` if it no longer carries anything (no payload, at most one child), then its parent likewise.
    /// Tree roots (parent -1) are never removed here.
    private mutating func prune(_ start: Int32) {
        var node = start
        while true {
            let n = self.nodes[Int(node)]
            if n.parent < 0 || n.payload >= 0 || (n.child0 >= 0 && n.child1 >= 0) { return }
            let only = n.child0 >= 0 ? n.child0 : n.child1
            let p = n.parent
            if self.nodes[Int(p)].child0 == node { self.nodes[Int(p)].child0 = only } else { self.nodes[Int(p)].child1 = only }
            if only >= 0 { self.nodes[Int(only)].parent = p }
            self.freeNode(node)
            if only >= 0 { return }  // the parent keeps as many children as before
            node = p
        }
    }

    private mutating func allocateNode(_ n: TrieNode) -> Int32 {
        if let id = self.freeNodes.popLast() {
            self.nodes[Int(id)] = n
            return id
        }
        self.nodes.append(n)
        return Int32(self.nodes.count - 1)
    }

    private mutating func freeNode(_ id: Int32) {
        self.nodes[Int(id)] = TrieNode(bits: .zero, length: 0, parent: -1)
        self.freeNodes.append(id)
    }

    private mutating func allocateLeaf() -> Int32 {
        if let id = self.freeLeaves.popLast() { return id }
        self.leaves.append(PolicyLeaf())
        return Int32(self.leaves.count - 1)
    }

    private mutating func allocateList() -> Int32 {
        if let id = self.freeLists.popLast() { return id }
        self.lists.append([])
        return Int32(self.lists.count - 1)
    }

    // MARK: Lookup (the hot path: no allocation, no existential)

    /// Improves `best` with this index's best match for `flow`. `mutating` only so that callers access the index
    /// in place (no retain of its arrays); nothing is changed.
    @inline(__always)
    mutating func lookup(_ flow: Flow, _ best: inout LookupBest) {
        if self.count == 0 { return }
        self.nodes.withUnsafeBufferPointer { nodes in
            self.leaves.withUnsafeBufferPointer { leaves in
                self.lists.withUnsafeBufferPointer { lists in
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
