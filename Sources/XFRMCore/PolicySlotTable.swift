// The SPD's policies by slot, shared by the control plane and lock-free readers (≈ the xfrm_policy objects the
// kernel's lookup tables point to, and their curlft.use_time). The lookup index (two Left-Right copies) stores slot
// numbers; the policies themselves are stored once, here, in fixed chunks that never move: growing the table adds
// a chunk and, now and then, a larger chunk directory; a replaced directory is kept until the table goes (it is
// small: 8 bytes per 4,096 slots, and the directories together are at most twice the last one), so a reader holding
// an older directory still reads valid memory.
//
// Who writes what: the writer (under the database's lock) fills a slot before the index that points to it is
// published, and clears it only after the index no longer points to it and no reader can still hold it (after
// LeftRight.write returned; see PolicyDatabase). A slot's use time is written by readers, atomically, at most once
// per second of the stack's clock per slot: a packet whose second is already recorded only loads it (≈ the kernel
// writing pol->curlft.use_time with WRITE_ONCE on every lookup, minus the store when nothing changes, so that
// packets of one policy on several cores do not keep pulling one cache line between them).

import Synchronization

/// One slot: its policy (nil: free) and its use time.
struct PolicySlot: ~Copyable {
    var policy: Policy?
    /// The last use in seconds + 1; 0: never used.
    let lastUse: Atomic<UInt64>
}

final class PolicySlotTable: @unchecked Sendable {
    private static var chunkShift: Int { 12 }
    private static var chunkSize: Int { 1 << Self.chunkShift }

    private typealias Chunk = UnsafeMutablePointer<PolicySlot>
    /// The live chunk directory (read by readers).
    private let directory: Atomic<UnsafeMutablePointer<Chunk>?>
    // Writer-only state (under the database's lock).
    private var directoryCapacity = 4
    private var chunkCount = 0
    private var retiredDirectories: [UnsafeMutablePointer<Chunk>] = []

    init() {
        let d = UnsafeMutablePointer<Chunk>.allocate(capacity: 4)
        self.directory = Atomic(d)
    }

    deinit {
        let d = self.directory.load(ordering: .relaxed)!
        for c in 0..<self.chunkCount {
            d[c].deinitialize(count: Self.chunkSize)
            d[c].deallocate()
        }
        d.deallocate()
        for old in self.retiredDirectories { old.deallocate() }
    }

    /// Slots 0..<capacity exist.
    var capacity: Int { self.chunkCount << Self.chunkShift }

    /// Writer: adds a chunk (and, when full, a directory twice as large; the old one is kept for readers).
    func grow() {
        var d = self.directory.load(ordering: .relaxed)!
        if self.chunkCount == self.directoryCapacity {
            let bigger = UnsafeMutablePointer<Chunk>.allocate(capacity: 2 * self.directoryCapacity)
            bigger.initialize(from: d, count: self.chunkCount)
            self.retiredDirectories.append(d)
            self.directoryCapacity *= 2
            d = bigger
        }
        let chunk = Chunk.allocate(capacity: Self.chunkSize)
        for i in 0..<Self.chunkSize { (chunk + i).initialize(to: PolicySlot(policy: nil, lastUse: Atomic(0))) }
        (d + self.chunkCount).initialize(to: chunk)
        self.chunkCount += 1
        // Readers only ever look at slots an index published after this store, with its own ordering; releasing
        // makes the new directory's contents visible to a reader that loads it.
        self.directory.store(d, ordering: .releasing)
    }

    @inline(__always)
    private func entry(_ slot: Int32) -> UnsafeMutablePointer<PolicySlot> {
        let s = Int(slot)
        return self.directory.load(ordering: .acquiring).unsafelyUnwrapped[s &>> Self.chunkShift]
            + (s & (Self.chunkSize - 1))
    }

    /// The policy in a live slot (readers: only for a slot found in the index they are on).
    @inline(__always)
    func policy(_ slot: Int32) -> Policy { self.entry(slot).pointee.policy.unsafelyUnwrapped }

    /// The key of the policy in a live slot.
    @inline(__always)
    func key(_ slot: Int32) -> Policy.Key { self.entry(slot).pointee.policy.unsafelyUnwrapped.key }

    /// Writer: fills a free slot, use time "never", before any index points to it.
    func store(_ policy: Policy, at slot: Int32) {
        let e = self.entry(slot)
        e.pointee.policy = policy
        e.pointee.lastUse.store(0, ordering: .relaxed)
    }

    /// Writer: empties a slot no index points to and no reader holds any more.
    func clear(_ slot: Int32) {
        let e = self.entry(slot)
        e.pointee.policy = nil
        e.pointee.lastUse.store(0, ordering: .relaxed)
    }

    /// Records a use at `seconds`; stores only when the recorded second differs.
    @inline(__always)
    func markUsed(_ slot: Int32, at seconds: UInt64) {
        let e = self.entry(slot)
        if e.pointee.lastUse.load(ordering: .relaxed) != seconds &+ 1 {
            e.pointee.lastUse.store(seconds &+ 1, ordering: .relaxed)
        }
    }

    /// The last recorded use, nil if never used.
    func lastUse(_ slot: Int32) -> UInt64? {
        let v = self.entry(slot).pointee.lastUse.load(ordering: .relaxed)
        return v == 0 ? nil : v - 1
    }
}
