import Synchronization
import XFRMCore
import XFRMPacket

/// What a host does with the stack's verdicts (the part of the data path that was `SimHost.dispatch`): packets to
/// transmit go to their interface's sink, packets for this host to the local sink, forwarded packets through the
/// output path again, ICMP errors back to their sender, drops back to the pool. One dispatcher per worker: it
/// keeps a batch per sink and writes each sink once per batch.
public final class Dispatcher {
    /// How a host's data path differs from the kernel's.
    public struct Rules: Sendable {
        /// Only what ESP produced leaves, only what came out of ESP is delivered (a daemon whose wire carries only
        /// ESP and whose local side is a TUN): everything else is dropped and counted.
        public var protectedOnly: Bool
        /// A forwarded packet is handed to the local sink (the host's own kernel routes it) rather than sent
        /// through the output path again.
        public var forwardLocally: Bool

        public init(protectedOnly: Bool, forwardLocally: Bool) {
            self.protectedOnly = protectedOnly
            self.forwardLocally = forwardLocally
        }

        /// The simulated hosts: the kernel's behaviour.
        public static let kernel = Rules(protectedOnly: false, forwardLocally: false)
        /// A gateway daemon between a TUN and ESP sockets.
        public static let daemon = Rules(protectedOnly: true, forwardLocally: true)
    }

    public let stack: XFRMStack
    public let pool: PacketPool
    public let rules: Rules
    public let counters: EngineCounters
    private let interfaces: InterfaceSinks
    private let local: any PacketSink
    private let ike: (any PacketSink)?
    private let unknownInterface: (any PacketSink)?
    /// Per sink, the packets going to it from this batch (a handful of sinks: a linear search by identity).
    private var pending: [(sink: any PacketSink, batch: PacketBatch)] = []
    private var again = PacketBatch(capacity: Dispatcher.maximumBatch)
    /// The CPU this dispatcher's thread stands for (its worker index; 0 for an intake thread running its batches to
    /// completion): the output path picks per-CPU SAs by it (RFC 9611).
    public var cpu: UInt32 = 0
    private var spare = PacketBatch(capacity: Dispatcher.maximumBatch)

    /// - Parameters:
    ///   - interfaces: the sink of each interface (shared by a host's dispatchers).
    ///   - local: what is delivered to this host.
    ///   - ike: IKE and keepalives from the NAT-T port (a key manager), or nil to drop and count them.
    ///   - unknownInterface: for interfaces without a sink of their own (nil: dropped and counted as `noSink`).
    public init(stack: XFRMStack, pool: PacketPool, rules: Rules, counters: EngineCounters, interfaces: InterfaceSinks,
                local: any PacketSink, ike: (any PacketSink)? = nil, unknownInterface: (any PacketSink)? = nil) {
        self.stack = stack
        self.pool = pool
        self.rules = rules
        self.counters = counters
        self.interfaces = interfaces
        self.local = local
        self.ike = ike
        self.unknownInterface = unknownInterface
    }

    /// Runs the batch through the stack and hands every buffer on; leaves the batch empty (the caller keeps its
    /// batch and its capacity).
    public func run(_ batch: inout PacketBatch) {
        precondition(batch.count <= Self.maximumBatch, "a batch larger than the dispatcher takes")
        self.runOnce(&batch)
        // Forwarded packets and routed ICMP errors go round once more (bounded: an error is never answered).
        var round = 0
        while !self.again.isEmpty {
            round += 1
            swap(&self.spare, &self.again)
            if round > 2 {
                for i in 0..<self.spare.count { self.pool.release(self.spare[i].buffer) }
                self.spare.removeAll()
                break
            }
            self.runOnce(&self.spare)
        }
    }

    /// The largest batch `run` takes (each packet can go round once more, so `again` holds as many).
    public static let maximumBatch = 2 * EngineConstants.batchSize

    private func runOnce(_ batch: inout PacketBatch) {
        self.stack.process(&batch, cpu: self.cpu)
        let table = self.interfaces.snapshot
        for i in 0..<batch.count { self.route(batch[i], table) }
        batch.removeAll()
        self.flush()
    }

    @inline(__always)
    private func route(_ packet: PacketBatch.Packet, _ table: [Int32: any PacketSink]) {
        let buffer = packet.buffer
        switch packet.verdict {
        case .output(.transmit(let ifindex), let transformed):
            if self.rules.protectedOnly && !transformed {
                self.counters.unprotected.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buffer)
                return
            }
            self.toInterface(ifindex, PacketBatch.Packet(buffer, stage: packet.stage), table)
        case .output(.offload(let ifindex, let meta), _):
            // Packet offload (plaintext the device protects or drops) or crypto offload (ESP the device seals).
            var p = PacketBatch.Packet(buffer, stage: packet.stage)
            p.metadata = meta
            self.toInterface(ifindex, p, table)
        case .output(.icmpError, _):
            // Back to the sender: here for local traffic, routed back for forwarded traffic.
            let forwarded = packet.stage == .forward
            if !forwarded || self.rules.forwardLocally
                || XFRMStack.destination(of: buffer).map(self.stack.network.isLocal) ?? true
            {
                self.toLocal(buffer)
            } else {
                self.again.append(PacketBatch.Packet(buffer, stage: .output))
            }
        case .input(.deliver, let decapsulated), .input(.forward, let decapsulated):
            if self.rules.protectedOnly && !decapsulated {
                self.counters.notDecapsulated.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buffer)
            } else if case .input(.forward, _) = packet.verdict, !self.rules.forwardLocally {
                self.again.append(PacketBatch.Packet(buffer, stage: .forward))
            } else {
                self.toLocal(buffer)
            }
        case .input(.ike, _):
            if let ike = self.ike {
                self.enqueue(PacketBatch.Packet(buffer, stage: .input), to: ike)
            } else {
                self.counters.ike.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buffer)
            }
        case .output(.dropped, _), .input(.dropped, _), .pending:
            self.pool.release(buffer)
        }
    }

    @inline(__always)
    private func toInterface(_ ifindex: Int32, _ packet: PacketBatch.Packet, _ table: [Int32: any PacketSink]) {
        guard let sink = table[ifindex] ?? self.unknownInterface else {
            self.counters.noSink.wrappingAdd(1, ordering: .relaxed)
            self.pool.release(packet.buffer)
            return
        }
        self.counters.transmitted.wrappingAdd(1, ordering: .relaxed)
        self.enqueue(packet, to: sink)
    }

    @inline(__always)
    private func toLocal(_ buffer: PacketBuffer) {
        self.counters.delivered.wrappingAdd(1, ordering: .relaxed)
        self.counters.deliveredBytes.wrappingAdd(UInt64(buffer.count), ordering: .relaxed)
        self.enqueue(PacketBatch.Packet(buffer, stage: .input), to: self.local)
    }

    private func enqueue(_ packet: PacketBatch.Packet, to sink: any PacketSink) {
        var i = 0
        while i < self.pending.count && self.pending[i].sink !== sink { i += 1 }
        if i == self.pending.count { self.pending.append((sink, PacketBatch())) }
        if self.pending[i].batch.isFull { sink.write(&self.pending[i].batch) }
        self.pending[i].batch.append(packet)
    }

    /// Writes every sink's pending batch.
    private func flush() {
        for i in self.pending.indices where !self.pending[i].batch.isEmpty {
            self.pending[i].sink.write(&self.pending[i].batch)
        }
    }
}

/// The sink of each interface, read once per batch (a read-mostly table kept as a snapshot).
public final class InterfaceSinks: @unchecked Sendable {
    /// Sinks are shared by a host's workers; each is safe to call from several threads (its own contract).
    private struct Table: @unchecked Sendable {
        var sinks: [Int32: any PacketSink] = [:]
    }
    private let table = XFRMMutex(Table())

    public init() {}

    public var snapshot: [Int32: any PacketSink] { self.table.withLock { $0.sinks } }

    public func set(_ sink: (any PacketSink)?, ifindex: Int32) {
        let box = Table(sinks: [ifindex: sink].compactMapValues { $0 })
        self.table.withLock { t in
            if let s = box.sinks[ifindex] { t.sinks[ifindex] = s } else { t.sinks[ifindex] = nil }
        }
    }

    public func sink(ifindex: Int32) -> (any PacketSink)? { self.table.withLock { $0.sinks[ifindex] } }
}
