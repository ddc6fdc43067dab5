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
// leaves and lists are recycled through free lists. The arrays are TrackedArrays: PolicyDatabase keeps two copies
// of every index (Left-Right, for lock-free lookups), and the second copy takes over just the records an insert or
// removal wrote (`replicate`).
//
// This file: the structure, insertion and removal. The records are in PolicyIndexRecords.swift, the lookup in
// PolicyIndex+Lookup.swift.

import XFRMPacket

/// The two-level radix index for one direction and kind of policy.
struct PolicyIndex: Equatable {
    // Read by the lookup (PolicyIndex+Lookup.swift). Tracked, so that the other Left-Right copy is updated by
    // copying what a change wrote (`replicate`), not by running the change again.
    private(set) var nodes: TrackedArray<TrieNode>
    private(set) var lists = TrackedArray<ContiguousArray<PolicyCandidate>>()
    private(set) var leaves = TrackedArray<PolicyLeaf>()
    private var freeNodes = TrackedIDStack()
    private var freeLeaves = TrackedIDStack()
    private var freeLists = TrackedIDStack()
    /// Policies indexed (a family-0 policy counts once).
    private(set) var count = 0

    static let v4Root: Int32 = 0
    static let v6Root: Int32 = 1

    init() {
        self.nodes = TrackedArray([
            TrieNode(bits: .zero, length: 0, parent: -1),
            TrieNode(bits: .zero, length: 0, parent: -1),
        ])
    }

    /// Makes this copy equal to `live`, which ran the changes this copy has not seen since its last replication
    /// (see TrackedArray).
    mutating func replicate(from live: borrowing PolicyIndex) {
        self.nodes.replicate(from: live.nodes)
        self.lists.replicate(from: live.lists)
        self.leaves.replicate(from: live.leaves)
        self.freeNodes.replicate(from: live.freeNodes)
        self.freeLeaves.replicate(from: live.freeLeaves)
        self.freeLists.replicate(from: live.freeLists)
        self.count = live.count
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
        self.freeLists.push(list)
        if portPosition >= 0 {
            self.leaves[Int(leaf)].ports.remove(at: portPosition)
        } else {
            self.leaves[Int(leaf)].general = -1
        }
        guard self.leaves[Int(leaf)].isEmpty else { return }
        self.leaves[Int(leaf)] = PolicyLeaf()
        self.freeLeaves.push(leaf)
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
        if let id = self.freeNodes.pop() {
            self.nodes[Int(id)] = n
            return id
        }
        self.nodes.append(n)
        return Int32(self.nodes.count - 1)
    }

    private mutating func freeNode(_ id: Int32) {
        self.nodes[Int(id)] = TrieNode(bits: .zero, length: 0, parent: -1)
        self.freeNodes.push(id)
    }

    private mutating func allocateLeaf() -> Int32 {
        if let id = self.freeLeaves.pop() { return id }
        self.leaves.append(PolicyLeaf())
        return Int32(self.leaves.count - 1)
    }

    private mutating func allocateList() -> Int32 {
        if let id = self.freeLists.pop() { return id }
        self.lists.append([])
        return Int32(self.lists.count - 1)
    }
}
