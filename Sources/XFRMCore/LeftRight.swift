// Left-Right (Ramalhete and Correia, "Left-Right: A Concurrency Control Technique with Wait-Free Population
// Oblivious Reads", 2015): two copies of a read-mostly value, readers that never wait and never lock, and a single
// writer at a time (the caller serializes writers, e.g. with its own lock). It stands in for the kernel's RCU
// around the policy hash tables and inexact bins (xfrm_policy_lookup_bytype under rcu_read_lock, xfrm_hash_resize
// publishing new tables with rcu_assign_pointer and freeing old ones after synchronize_rcu).
//
// Readers: announce themselves on the read indicator of the current version (one atomic add on one of 16
// cache-line-padded counters picked by thread), load which copy is live, read it in place, and leave (one atomic
// subtract). No loop, no CAS: a read is wait-free. A writer: changes the copy readers are not on, makes it the live
// one, waits until no reader can still be on the other (toggling the version so that readers arriving meanwhile
// cannot keep it waiting forever), then brings the other copy up to date (by running the change again, or, as the
// SPD does, by copying just what the change wrote). Both copies are equal when `write` returns.
//
// Why this and not an atomically swapped snapshot object: a Swift strong reference cannot be loaded and retained
// atomically without a lock (the retain can race with the writer's last release), and an unmanaged pointer needs a
// reclamation scheme (hazard pointers, epochs) to know when the old snapshot may be freed — the read indicators
// here are exactly that (nothing a reader could still hold is freed or changed), and the copies are mutated in
// place, so an insert costs one in-place index insert plus copying what it wrote into the other copy, not a
// rebuild of a 1,000,000-policy snapshot.
//
// Memory safety: the copy a writer mutates has no reader on it (the indicators guarantee it), so the in-place
// mutation of its arrays and dictionaries (which may reallocate and free their buffers) cannot pull memory from under
// a reader. Readers must only read: any mutating access from a reader (even a `mutating` method that writes
// nothing, through an Array subscript's uniqueness check) could copy-on-write into the shared copy; the body of
// `read` therefore gets an `UnsafePointer`. Transient retains a reader may take of buffers in its copy are balanced
// before it leaves, so the writer finds them uniquely referenced again and mutates in place.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

final class LeftRight<Value>: @unchecked Sendable {
    /// The two copies (allocated once, freed in deinit).
    private let copies: UnsafeMutablePointer<Value>
    /// Which copy readers go to (0 or 1).
    private let live = Atomic<Int>(0)
    /// Which of the two read indicators arriving readers use (0 or 1).
    private let version = Atomic<Int>(0)
    /// Two read indicators of `stripes` counters, each counter alone on a 128-byte line so that readers on
    /// different threads do not bounce one cache line (a thread's stripe comes from its pthread id; any stripe is
    /// correct, since a reader leaves through the counter it arrived on).
    private let indicators: UnsafeMutablePointer<Atomic<Int>>
    private static var stripes: Int { 16 }
    private static var spacing: Int { 16 }  // counters apart: 16 × 8 bytes = 128 bytes

    /// `make` is called twice: the copies must not share mutable storage that a write would change in place.
    init(_ make: () -> Value) {
        self.copies = .allocate(capacity: 2)
        (self.copies + 0).initialize(to: make())
        (self.copies + 1).initialize(to: make())
        let n = 2 * Self.stripes * Self.spacing
        self.indicators = .allocate(capacity: n)
        for i in 0..<n { (self.indicators + i).initialize(to: Atomic<Int>(0)) }
    }

    deinit {
        self.copies.deinitialize(count: 2)
        self.copies.deallocate()
        self.indicators.deinitialize(count: 2 * Self.stripes * Self.spacing)
        self.indicators.deallocate()
    }

    @inline(__always)
    private func counter(version v: Int, stripe: Int) -> Int { (v * Self.stripes + stripe) * Self.spacing }

    @inline(__always)
    private static func stripe() -> Int {
        #if canImport(Darwin)
        let id = UInt64(UInt(bitPattern: pthread_self()))
        #else
        let id = UInt64(pthread_self())
        #endif
        return Int(truncatingIfNeeded: ((id >> 12) &* 0x9e37_79b9_7f4a_7c15) >> 60)  // 4 bits: 16 stripes
    }

    /// Runs `body` on the live copy; wait-free, lock-free. `body` must not mutate the value, keep the pointer, or
    /// call `write`.
    @inline(__always)
    func read<R>(_ body: (UnsafePointer<Value>) -> R) -> R {
        let v = self.version.load(ordering: .sequentiallyConsistent)
        let c = self.counter(version: v, stripe: Self.stripe())
        self.indicators[c].wrappingAdd(1, ordering: .sequentiallyConsistent)
        let l = self.live.load(ordering: .sequentiallyConsistent)
        let result = body(UnsafePointer(self.copies + l))
        self.indicators[c].wrappingSubtract(1, ordering: .sequentiallyConsistent)
        return result
    }

    /// The copy writers see between writes (both copies are equal then). Only for the serialized writer, and only
    /// to read: for example to validate a change before making it.
    var writerView: UnsafePointer<Value> { UnsafePointer(self.copies + self.live.load(ordering: .relaxed)) }

    /// Applies `change` to the copy no reader is on and publishes it, waits until no reader can be on the other
    /// copy, and brings that one up to date with `replicate` (given the copy to update and the live one, which it
    /// may only read; it may of course run the same change again). Returns once no reader can see the old state.
    /// Callers serialize writes.
    func write(_ change: (inout Value) -> Void, replicate: (inout Value, UnsafePointer<Value>) -> Void) {
        let l = self.live.load(ordering: .relaxed)
        change(&self.copies[1 - l])
        self.live.store(1 - l, ordering: .sequentiallyConsistent)
        // Readers that loaded `live` before the store may still be on copy l; wait them out through both
        // indicators (the arrival version is read before `live`, so each such reader is counted in one of them).
        let v = self.version.load(ordering: .relaxed)
        self.waitUntilEmpty(version: 1 - v)
        self.version.store(1 - v, ordering: .sequentiallyConsistent)
        self.waitUntilEmpty(version: v)
        replicate(&self.copies[l], UnsafePointer(self.copies + (1 - l)))
    }

    /// Both copies, for checks while no write runs (the caller holds the writers' lock).
    var bothCopies: (UnsafePointer<Value>, UnsafePointer<Value>) {
        (UnsafePointer(self.copies), UnsafePointer(self.copies + 1))
    }

    private func waitUntilEmpty(version v: Int) {
        var spins = 0
        for s in 0..<Self.stripes {
            let c = self.counter(version: v, stripe: s)
            while self.indicators[c].load(ordering: .sequentiallyConsistent) != 0 {
                // A reader holds a copy for a few hundred ns; one that was preempted may hold it for a time slice,
                // so stop burning the core it may need after a short spin.
                spins += 1
                if spins > 64 { sched_yield() }
            }
        }
    }
}
