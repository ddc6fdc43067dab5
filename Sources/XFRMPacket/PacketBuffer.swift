// A packet in a fixed slot of memory with headroom in front and tailroom behind, so that headers, IVs, trailers
// and ICVs are written in place (≈ sk_buff's head/data/tail/end; wireguard-go's offset).
//
//   storage                 start                     end                    capacity
//   |------ headroom --------|====== packet bytes =====|------ tailroom -------|
//
// `prepend` ≈ skb_push, `append` ≈ skb_put, `trimFront` ≈ skb_pull, `trimBack` ≈ skb_trim.

/// One packet's bytes in a slot it does not own; the pool (or the creator) owns the memory.
///
/// A `PacketBuffer` is a view: copies alias the same bytes. Exactly one holder treats it as the packet at a time —
/// the path it is travelling through — and returns it to its pool when done.
public struct PacketBuffer: @unchecked Sendable {
    /// Base address of the slot.
    public let storage: UnsafeMutableRawPointer
    /// Size of the slot in bytes.
    public let capacity: Int
    /// Offset of the first packet byte.
    public private(set) var start: Int
    /// Offset one past the last packet byte.
    public private(set) var end: Int
    /// Index of the slot in its pool, or -1 for a buffer not from a pool.
    public let slot: Int32

    /// Wraps caller-owned memory; the packet starts empty at `headroom`.
    public init(storage: UnsafeMutableRawPointer, capacity: Int, headroom: Int, slot: Int32 = -1) {
        precondition(headroom >= 0 && headroom <= capacity, "headroom outside the slot")
        self.storage = storage
        self.capacity = capacity
        self.start = headroom
        self.end = headroom
        self.slot = slot
    }

    /// Number of packet bytes.
    @inline(__always) public var count: Int { self.end - self.start }
    /// Free bytes in front of the packet.
    @inline(__always) public var headroom: Int { self.start }
    /// Free bytes behind the packet.
    @inline(__always) public var tailroom: Int { self.capacity - self.end }
    /// Address of the first packet byte.
    @inline(__always) public var data: UnsafeMutableRawPointer { self.storage + self.start }

    /// Empties the packet and places its start `headroom` bytes into the slot.
    @inline(__always) public mutating func reset(headroom: Int) {
        precondition(headroom >= 0 && headroom <= self.capacity, "headroom outside the slot")
        self.start = headroom
        self.end = headroom
    }

    /// Grows the packet at the front by `n` bytes and returns the new first byte (≈ skb_push). Requires headroom.
    @inline(__always) @discardableResult
    public mutating func prepend(_ n: Int) -> UnsafeMutableRawPointer {
        precondition(n >= 0 && n <= self.start, "prepend beyond headroom")
        self.start -= n
        return self.storage + self.start
    }

    /// Grows the packet at the back by `n` bytes and returns the first new byte (≈ skb_put). Requires tailroom.
    @inline(__always) @discardableResult
    public mutating func append(_ n: Int) -> UnsafeMutableRawPointer {
        precondition(n >= 0 && n <= self.capacity - self.end, "append beyond tailroom")
        let p = self.storage + self.end
        self.end += n
        return p
    }

    /// Removes `n` bytes from the front (≈ skb_pull).
    @inline(__always) public mutating func trimFront(_ n: Int) {
        precondition(n >= 0 && n <= self.count, "trimFront beyond the packet")
        self.start += n
    }

    /// Removes `n` bytes from the back (≈ skb_trim to count - n).
    @inline(__always) public mutating func trimBack(_ n: Int) {
        precondition(n >= 0 && n <= self.count, "trimBack beyond the packet")
        self.end -= n
    }

    /// Appends a copy of `bytes`; returns false (and changes nothing) when the tailroom is too small.
    @discardableResult
    @inlinable
    public mutating func append<C: Collection<UInt8>>(contentsOf bytes: C) -> Bool {
        let n = bytes.count
        guard n <= self.tailroom else { return false }
        let p = self.append(n)
        let copied: Bool? = bytes.withContiguousStorageIfAvailable { src in
            p.copyMemory(from: src.baseAddress!, byteCount: n)
            return true
        }
        if copied == nil {
            var i = 0
            for b in bytes {
                p.storeByte(b, at: i)
                i += 1
            }
        }
        return true
    }

    /// Appends a copy of raw bytes (memcpy); false (and nothing changed) when the tailroom is too small.
    @discardableResult
    @inline(__always)
    public mutating func append(bytes: UnsafeRawBufferPointer) -> Bool {
        guard bytes.count <= self.tailroom else { return false }
        if let base = bytes.baseAddress { self.append(bytes.count).copyMemory(from: base, byteCount: bytes.count) }
        return true
    }

    /// The packet's bytes as a new array (tests, tools and the control plane; never per packet).
    public var bytes: [UInt8] {
        Array(UnsafeRawBufferPointer(start: self.data, count: self.count))
    }

    /// Scoped read access to the packet bytes.
    @inline(__always)
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: self.data, count: self.count))
    }

    /// Scoped write access to the packet bytes.
    @inline(__always)
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeMutableRawBufferPointer(start: self.data, count: self.count))
    }
}
