// Policy.Key → slot, for the duplicate test of add/update and for delete/get by key (≈ the kernel finding a
// policy by selector in its bydst chains, xfrm_policy_bysel_ctx). A Swift Dictionary keyed by Policy.Key stores the
// ~90-byte key inline in every bucket, and keeps a quarter of its buckets empty: at 1,000,000 policies that alone
// is ~190 bytes per policy, and every resize moves all the keys. This table stores 8 bytes per bucket (32 bits of
// the key's hash and the slot) and compares the real key only when the hash bits agree, reading it from the slot
// table, where the policy is stored anyway. Open addressing with linear probing; deletions leave tombstones, which
// a rehash (on growth, or when tombstones pile up) drops. Writer-only (under the database's lock).

struct PolicyKeyTable {
    /// (hash bits << 32) | slot; `empty` and `deleted` are never a valid entry (slots are < 2^31).
    private var buckets: ContiguousArray<UInt64>
    private(set) var count = 0
    private var tombstones = 0

    private static var empty: UInt64 { .max }
    private static var deleted: UInt64 { .max - 1 }

    init() { self.buckets = ContiguousArray(repeating: Self.empty, count: 16) }

    @inline(__always)
    private static func hashBits(_ key: Policy.Key) -> UInt32 { UInt32(truncatingIfNeeded: key.hashValue) }

    /// The slot of the policy with this key. `keyOf` gives the key of the policy in a slot.
    func find(_ key: Policy.Key, keyOf: (Int32) -> Policy.Key) -> Int32? {
        let h = Self.hashBits(key)
        let mask = self.buckets.count - 1
        var i = Int(h) & mask
        while true {
            let e = self.buckets[i]
            if e == Self.empty { return nil }
            if e != Self.deleted && UInt32(truncatingIfNeeded: e >> 32) == h {
                let slot = Int32(truncatingIfNeeded: e)
                if keyOf(slot) == key { return slot }
            }
            i = (i + 1) & mask
        }
    }

    /// Records `slot` for `key`, which must not be in the table.
    mutating func insert(_ key: Policy.Key, slot: Int32) {
        if (self.count + self.tombstones + 1) * 4 > self.buckets.count * 3 {
            self.rehash(capacity: self.count + 1 > self.buckets.count / 2 ? self.buckets.count * 2 : self.buckets.count)
        }
        let h = Self.hashBits(key)
        let mask = self.buckets.count - 1
        var i = Int(h) & mask
        while self.buckets[i] != Self.empty && self.buckets[i] != Self.deleted { i = (i + 1) & mask }
        if self.buckets[i] == Self.deleted { self.tombstones -= 1 }
        self.buckets[i] = UInt64(h) << 32 | UInt64(UInt32(bitPattern: slot))
        self.count += 1
    }

    /// Forgets `key`, which is stored for `slot`.
    mutating func remove(_ key: Policy.Key, slot: Int32) {
        let h = Self.hashBits(key)
        let entry = UInt64(h) << 32 | UInt64(UInt32(bitPattern: slot))
        let mask = self.buckets.count - 1
        var i = Int(h) & mask
        while self.buckets[i] != entry {
            precondition(self.buckets[i] != Self.empty, "PolicyKeyTable: removing a key that is not there")
            i = (i + 1) & mask
        }
        self.buckets[i] = Self.deleted
        self.count -= 1
        self.tombstones += 1
    }

    /// Re-inserts every live entry into `capacity` buckets (a power of two); the hash bits are enough for that.
    private mutating func rehash(capacity: Int) {
        let old = self.buckets
        self.buckets = ContiguousArray(repeating: Self.empty, count: capacity)
        self.tombstones = 0
        let mask = capacity - 1
        for e in old where e != Self.empty && e != Self.deleted {
            var i = Int(UInt32(truncatingIfNeeded: e >> 32)) & mask
            while self.buckets[i] != Self.empty { i = (i + 1) & mask }
            self.buckets[i] = e
        }
    }
}
