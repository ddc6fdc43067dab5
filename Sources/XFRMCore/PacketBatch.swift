import XFRMPacket

/// A batch of packets going through the stack together (≈ the `bufs [][]byte` of wireguard-go's batch-first
/// tun/conn interfaces): sources read into it, `XFRMStack.process` fills each packet's verdict, and the engine's
/// dispatcher hands the buffers to their sinks. Its storage is reserved once, so the steady state allocates nothing.
public struct PacketBatch: Sendable {
    /// Packets per batch when nobody says otherwise (wireguard-go's IdealBatchSize is 128; recvmmsg's sweet spot on
    /// this kind of machine is lower).
    public static let defaultCapacity = 64

    /// What the stack is to do with a packet.
    public enum Stage: Sendable, Equatable {
        /// Locally generated (from a TUN, a socket, a test): `output`.
        case output
        /// Routed through this host after `input` said `.forward`: `output(forwarded:)`.
        case forward
        /// Received from the wire: `input`.
        case input
    }

    /// What the stack decided (filled by `XFRMStack.process`).
    public enum Verdict: Sendable, Equatable {
        case pending
        /// `transformed`: an SA (in software or by crypto offload) produced the packet.
        case output(OutputResult, transformed: Bool)
        /// `decapsulated`: the packet came out of ESP (software or the device).
        case input(InputResult, decapsulated: Bool)
    }

    /// One packet and what goes with it.
    public struct Packet: Sendable {
        public var buffer: PacketBuffer
        public var stage: Stage
        /// The interface it arrived on (input) or 0.
        public var ifindex: Int32
        /// What an offload device said about it on receive (input), if anything.
        public var metadata: OffloadMetadata?
        public var verdict: Verdict

        @inlinable
        public init(_ buffer: PacketBuffer, stage: Stage, ifindex: Int32 = 0, metadata: OffloadMetadata? = nil) {
            self.buffer = buffer
            self.stage = stage
            self.ifindex = ifindex
            self.metadata = metadata
            self.verdict = .pending
        }
    }

    public let capacity: Int
    @usableFromInline internal var packets: [Packet]

    public init(capacity: Int = PacketBatch.defaultCapacity) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.packets = []
        self.packets.reserveCapacity(capacity)
    }

    @inlinable public var count: Int { self.packets.count }
    @inlinable public var isEmpty: Bool { self.packets.isEmpty }
    @inlinable public var isFull: Bool { self.packets.count >= self.capacity }

    /// Adds a packet; false (and nothing added) when the batch is full.
    @inlinable
    @discardableResult
    public mutating func append(_ packet: Packet) -> Bool {
        guard self.packets.count < self.capacity else { return false }
        self.packets.append(packet)
        return true
    }

    @inlinable
    public subscript(_ i: Int) -> Packet {
        get { self.packets[i] }
        _modify { yield &self.packets[i] }
    }

    /// Empties the batch, keeping its storage (the buffers must have gone to their sinks or back to the pool).
    @inlinable
    public mutating func removeAll() { self.packets.removeAll(keepingCapacity: true) }

    /// Keeps the first `n` packets (the others' buffers must have been handed on), keeping the storage.
    @inlinable
    public mutating func truncate(to n: Int) {
        precondition(n >= 0 && n <= self.packets.count)
        self.packets.removeLast(self.packets.count - n)
    }
}
