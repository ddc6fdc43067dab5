import Synchronization

/// A preallocated set of fixed-size packet slots, so the steady state allocates nothing per packet
/// (≈ wireguard-go's bounded WaitPool; swift-nio's pooled receive buffers).
///
/// `allocate()` returns nil when every slot is in use — backpressure, never a hidden allocation.
public final class PacketPool: @unchecked Sendable {
    /// Implementation constants.
    public static let defaultSlotSize = 2048
    public static let defaultHeadroom = 128

    public let slotSize: Int
    public let slotCount: Int
    public let headroom: Int
    private let memory: UnsafeMutableRawPointer
    private let free: XFRMMutex<FreeList>

    private struct FreeList: ~Copyable {
        var stack: UnsafeMutablePointer<Int32>
        var top: Int
    }

    /// Creates `count` slots of `slotSize` bytes; packets start `headroom` bytes into their slot.
    public init(count: Int, slotSize: Int = PacketPool.defaultSlotSize, headroom: Int = PacketPool.defaultHeadroom) {
        precondition(count > 0 && count < Int(Int32.max) && slotSize > headroom && headroom >= 0)
        self.slotSize = slotSize
        self.slotCount = count
        self.headroom = headroom
        self.memory = UnsafeMutableRawPointer.allocate(byteCount: count * slotSize, alignment: 64)
        self.memory.initializeMemory(as: UInt8.self, repeating: 0, count: count * slotSize)
        let stack = UnsafeMutablePointer<Int32>.allocate(capacity: count)
        for i in 0..<count { stack[i] = Int32(count - 1 - i) }
        self.free = XFRMMutex(FreeList(stack: stack, top: count))
    }

    deinit {
        self.free.withLock { $0.stack.deallocate() }
        self.memory.deallocate()
    }

    /// Number of slots not in use.
    public var available: Int { self.free.withLock { $0.top } }

    /// Takes a free slot, empty with the pool's headroom; nil when the pool is exhausted.
    @inline(__always)
    public func allocate() -> PacketBuffer? {
        let slot: Int32? = self.free.withLock { list in
            guard list.top > 0 else { return nil }
            list.top -= 1
            return list.stack[list.top]
        }
        guard let slot else { return nil }
        return PacketBuffer(
            storage: self.memory + Int(slot) * self.slotSize, capacity: self.slotSize, headroom: self.headroom,
            slot: slot)
    }

    /// Returns a buffer's slot to the pool. The buffer must have come from this pool and must not be used again.
    @inline(__always)
    public func release(_ buffer: PacketBuffer) {
        precondition(buffer.slot >= 0 && Int(buffer.slot) < self.slotCount
            && buffer.storage == self.memory + Int(buffer.slot) * self.slotSize, "buffer is not from this pool")
        self.free.withLock { list in
            precondition(list.top < self.slotCount, "double release")
            list.stack[list.top] = buffer.slot
            list.top += 1
        }
    }
}
