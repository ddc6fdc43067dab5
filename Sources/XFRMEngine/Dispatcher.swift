#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
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
        /// IPv4 and IPv6 fragments from the wire are reassembled before the stack sees them (IPv4Reassembly); a
        /// daemon's sockets get whole datagrams, which the host's kernel put together.
        public var reassemble: Bool
        /// With `protectedOnly`: output nothing protected is answered with ICMP "host unreachable" (ICMPv6 "address
        /// unreachable") to its sender through the local sink, as an XFRM interface answers traffic it has no
        /// policy for (xfrmi_xmit → dst_link_failure), within the kernel's rate limits (`ICMPRateLimit`). When the
        /// host's output is an XFRM interface's (`ifID` not 0), output a block policy refuses or an ACQUIRE holds
        /// back (larval_drop's -EREMOTE) is answered too, as xfrmi_xmit2 answers its lookup's failures.
        public var unreachableWhenUnprotected: Bool

        public init(protectedOnly: Bool, forwardLocally: Bool, reassemble: Bool = false,
                    unreachableWhenUnprotected: Bool = false) {
            self.protectedOnly = protectedOnly
            self.forwardLocally = forwardLocally
            self.reassemble = reassemble
            self.unreachableWhenUnprotected = unreachableWhenUnprotected
        }

        /// The simulated hosts: the kernel's behaviour.
        public static let kernel = Rules(protectedOnly: false, forwardLocally: false, reassemble: true)
        /// A gateway daemon between a TUN and ESP sockets.
        public static let daemon = Rules(protectedOnly: true, forwardLocally: true, reassemble: false,
                                         unreachableWhenUnprotected: true)
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
    /// The stored `var`s the per-packet path touches skip Swift's dynamic exclusivity check: a dispatcher belongs to
    /// one thread, and the check (a thread-local access set per access) took about 1.5 % of the daemons' CPU in a
    /// profile of the NAT-T tunnel (`perf record -a`, `swift_beginAccess` mostly under `enqueue`).
    @exclusivity(unchecked) private var pending: [(sink: any PacketSink, batch: PacketBatch)] = []
    @exclusivity(unchecked) private var again = PacketBatch(capacity: Dispatcher.maximumBatch)
    /// The CPU this dispatcher's thread stands for (its worker index; 0 for an intake thread running its batches to
    /// completion): the output path picks per-CPU SAs by it (RFC 9611).
    public var cpu: UInt32 = 0
    /// The XFRM interface id the host's outbound packets were routed into (xfrmd `--if-id`; 0: none): only policies
    /// with it protect them.
    public var ifID: UInt32 = 0
    @exclusivity(unchecked) private var spare = PacketBatch(capacity: Dispatcher.maximumBatch)
    /// The second and later fragments of the packet being cut (`fragment`): room for a 4 KB buffer's packet at the
    /// smallest IPv4 MTU (68: 48 payload bytes each), or a 64 KB one at 576 (a packet needing more is dropped and
    /// counted).
    @exclusivity(unchecked) private var fragments = PacketBatch(capacity: 256)
    /// The identification given to a packet to be cut that had 0.
    private var identification = UInt16.random(in: 1...UInt16.max)
    /// `rules.unreachableWhenUnprotected`'s rate limits, from the first error on (CLOCK_MONOTONIC_COARSE).
    private var icmpLimit: ICMPRateLimit? = nil
    /// Fragments from the wire waiting for the rest of their datagram (`rules.reassemble`), else nil.
    public let reassembly: IPv4Reassembly?

    /// - Parameters:
    ///   - interfaces: the sink of each interface (shared by a host's dispatchers).
    ///   - local: what is delivered to this host.
    ///   - ike: IKE and keepalives from the NAT-T port (a key manager), or nil to drop and count them.
    ///   - unknownInterface: for interfaces without a sink of their own (nil: dropped and counted as `noSink`).
    ///   - reassembly: with `rules.reassemble`, the host's reassembly its dispatchers share (nil: one of its own).
    public init(stack: XFRMStack, pool: PacketPool, rules: Rules, counters: EngineCounters, interfaces: InterfaceSinks,
                local: any PacketSink, ike: (any PacketSink)? = nil, unknownInterface: (any PacketSink)? = nil,
                reassembly: IPv4Reassembly? = nil) {
        self.stack = stack
        self.pool = pool
        self.rules = rules
        self.counters = counters
        self.interfaces = interfaces
        self.local = local
        self.ike = ike
        self.unknownInterface = unknownInterface
        self.reassembly = rules.reassemble
            ? reassembly ?? IPv4Reassembly(pool: pool, counters: counters.reassembly) : nil
    }

    /// Runs the batch through the stack and hands every buffer on; leaves the batch empty (the caller keeps its
    /// batch and its capacity).
    public func run(_ batch: inout PacketBatch) {
        precondition(batch.count <= Self.maximumBatch, "a batch larger than the dispatcher takes")
        if let r = self.reassembly { Self.reassemble(&batch, r, stack: self.stack) }
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

    /// Takes the IPv4 fragments from the wire out of the batch, in place, and puts each datagram they complete where
    /// its last fragment was; discards the datagrams that took too long.
    private static func reassemble(_ batch: inout PacketBatch, _ r: IPv4Reassembly, stack: XFRMStack) {
        var now: UInt64? = nil  // the clock is read only when there are fragments
        if r.heldFragments > 0 {  // an atomic load: no lock without fragments
            now = stack.clock.now
            r.sweep(now: now!)
        }
        var kept = 0
        for i in 0..<batch.count {
            let packet = batch[i]
            // Only fragments for this host: transit fragments are forwarded as they are (≈ ip_local_deliver).
            if packet.stage == .input && IPv4Reassembly.isFragment(packet.buffer)
                && XFRMStack.destination(of: packet.buffer).map(stack.network.isLocal) == true
            {
                if now == nil { now = stack.clock.now }
                guard let whole = r.take(packet.buffer, now: now!) else { continue }
                batch[kept] = PacketBatch.Packet(whole, stage: .input, ifindex: packet.ifindex)
            } else if kept != i {
                batch[kept] = packet
            }
            kept += 1
        }
        batch.truncate(to: kept)
    }

    /// The largest batch `run` takes (each packet can go round once more, so `again` holds as many).
    public static let maximumBatch = 2 * EngineConstants.batchSize

    private func runOnce(_ batch: inout PacketBatch) {
        self.stack.process(&batch, cpu: self.cpu, ifID: self.ifID)
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
            if self.rules.protectedOnly && !transformed { return self.unprotected(buffer) }
            self.toInterface(ifindex, PacketBatch.Packet(buffer, stage: packet.stage), table)
        case .output(.fragment(let ifindex, let mtu), let transformed):
            if self.rules.protectedOnly && !transformed { return self.unprotected(buffer) }
            self.fragment(buffer, mtu: mtu, ifindex: ifindex, stage: packet.stage, table)
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
        case .output(.dropped(let counter?), _)
            where packet.stage == .output && self.ifID != 0 && self.rules.unreachableWhenUnprotected
                && (counter == .outPolBlock || counter == .outNoStates):
            // An XFRM interface answers its lookup's failures too (xfrmi_xmit2: a block policy's -EPERM, an
            // ACQUIRE's larval_drop -EREMOTE → dst_link_failure); counted in xfrm_stat already.
            self.answerUnreachable(buffer)
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

    /// Sends a packet larger than its interface's MTU as fragments — IPv4 without DF (IPv4Fragmentation), or IPv6
    /// ESP this host sealed (IPv6Fragmentation, a random 32-bit identification per packet as RFC 7739 asks) — the
    /// first in its own buffer, the others in buffers from the pool, in order. A packet that cannot be cut (no buffer
    /// for every fragment, more fragments than a batch holds, an MTU too small) is dropped and counted as
    /// `fragmentFailed` (≈ IPSTATS_MIB_FRAGFAILS); one cut is `fragmented` (FRAGOKS), its pieces `fragmentsCreated`
    /// (FRAGCREATES).
    private func fragment(_ buffer: PacketBuffer, mtu: Int, ifindex: Int32, stage: PacketBatch.Stage,
                          _ table: [Int32: any PacketSink]) {
        if buffer.count >= 1 && buffer.data.loadByte(at: 0) >> 4 == 6 {
            self.fragment6(buffer, mtu: mtu, ifindex: ifindex, stage: stage, table)
            return
        }
        guard let plan = IPv4Fragmentation.plan(buffer.data, count: buffer.count, mtu: mtu) else {
            return self.fragmentFailed(buffer)
        }
        // Identification 0 would be replaced per packet by the host's raw socket (raw_send_hdrinc calls
        // ip_select_ident for it), leaving fragments nobody can join: such a packet gets one of ours first.
        if buffer.data.loadBE16(at: 4) == 0 && plan.offset == 0 && !plan.moreFragments {  // a whole packet only
            self.identification = self.identification == UInt16.max ? 1 : self.identification + 1
            buffer.data.storeBE16(self.identification, at: 4)
            IPv4Header.updateChecksum(buffer.data, headerLength: plan.headerLength)
        }
        guard self.cutPieces(plan.count, stage: stage, {
            IPv4Fragmentation.writeFragment($0, of: buffer.data, plan: plan, into: &$1)
        }) else { return self.fragmentFailed(buffer) }
        var first = buffer
        IPv4Fragmentation.makeFirst(&first, plan: plan)
        self.sendFragments(first, count: plan.count, ifindex: ifindex, stage: stage, table)
    }

    private func fragment6(_ buffer: PacketBuffer, mtu: Int, ifindex: Int32, stage: PacketBatch.Stage,
                           _ table: [Int32: any PacketSink]) {
        // One getrandom(2) per packet cut: the slow path already copies every piece.
        let id = UInt32.random(in: 1...UInt32.max)
        guard let plan = IPv6Fragmentation.plan(buffer.data, count: buffer.count, mtu: mtu, identification: id) else {
            return self.fragmentFailed(buffer)
        }
        var first = buffer
        guard self.cutPieces(plan.count, stage: stage, {
                IPv6Fragmentation.writeFragment($0, of: buffer.data, plan: plan, into: &$1)
            }),
            IPv6Fragmentation.makeFirst(&first, plan: plan)
        else {
            return self.fragmentFailed(buffer)
        }
        self.sendFragments(first, count: plan.count, ifindex: ifindex, stage: stage, table)
    }

    /// Writes pieces 1..<count (the first stays in the packet's own buffer) into pool buffers appended to
    /// `fragments`, each by the family's `write`; false when there are more pieces than a batch holds, a buffer ran
    /// out or a piece could not be written (the caller then drops everything through `fragmentFailed`).
    private func cutPieces(_ count: Int, stage: PacketBatch.Stage,
                           _ write: (Int, inout PacketBuffer) -> Bool) -> Bool {
        guard count - 1 <= self.fragments.capacity else { return false }
        for i in 1..<count {
            guard var piece = self.pool.allocate() else { return false }
            guard write(i, &piece) else {
                self.pool.release(piece)
                return false
            }
            self.fragments.append(PacketBatch.Packet(piece, stage: stage))
        }
        return true
    }

    /// The first fragment, then the others `fragments` holds, to the interface; counted.
    private func sendFragments(_ first: PacketBuffer, count: Int, ifindex: Int32, stage: PacketBatch.Stage,
                               _ table: [Int32: any PacketSink]) {
        self.toInterface(ifindex, PacketBatch.Packet(first, stage: stage), table)
        for i in 0..<self.fragments.count { self.toInterface(ifindex, self.fragments[i], table) }
        self.fragments.removeAll()
        self.counters.fragmented.wrappingAdd(1, ordering: .relaxed)
        self.counters.fragmentsCreated.wrappingAdd(UInt64(count), ordering: .relaxed)
    }

    /// Drops a packet that could not be cut, and any fragments of it already made.
    private func fragmentFailed(_ buffer: PacketBuffer) {
        for i in 0..<self.fragments.count { self.pool.release(self.fragments[i].buffer) }
        self.fragments.removeAll()
        self.counters.fragmentFailed.wrappingAdd(1, ordering: .relaxed)
        self.pool.release(buffer)
    }

    /// Output nothing protected (`rules.protectedOnly`): counted and dropped; with `unreachableWhenUnprotected`,
    /// answered with ICMP unreachable to its sender when an error may answer it and the rate limits allow.
    private func unprotected(_ buffer: PacketBuffer) {
        self.counters.unprotected.wrappingAdd(1, ordering: .relaxed)
        if self.rules.unreachableWhenUnprotected { return self.answerUnreachable(buffer) }
        self.pool.release(buffer)
    }

    /// Turns `buffer` into ICMP unreachable to its sender and hands it to the local sink when an error may answer
    /// it and the rate limits allow (counted `unreachable`); otherwise releases it.
    private func answerUnreachable(_ buffer: PacketBuffer) {
        var buffer = buffer
        if self.stack.makeUnreachable(&buffer) {
            let p = buffer.data
            let sender: IPAddress = p.loadByte(at: 0) >> 4 == 4 ? .loadV4(from: p, at: 16) : .loadV6(from: p, at: 24)
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)  // only when an error is due
            let now = UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
            if self.icmpLimit == nil { self.icmpLimit = ICMPRateLimit(now: now) }
            if self.icmpLimit!.allow(now: now, peer: self.stack.network.isLocal(sender) ? nil : sender) {
                self.counters.unreachable.wrappingAdd(1, ordering: .relaxed)
                self.enqueue(PacketBatch.Packet(buffer, stage: .input), to: self.local)
                return
            }
        }
        self.pool.release(buffer)
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
