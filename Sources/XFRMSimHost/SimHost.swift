// A simulated host: one XFRMStack, its packet pool, and its interfaces — dummy ones (whatever is "transmitted" on
// them is captured) and simulated NICs (offload devices with their own engines and wires) — on the engine's
// dispatcher (XFRMEngine), with the kernel's rules.
//
// Data path (synchronous, batch-friendly; see the pipeline in XFRMEngine/Engine.swift):
//   send:    bytes → pooled buffer → a batch of one → Dispatcher: stack.output → interface sink (dummy: captured;
//            NIC: device TX queue, with the offload metadata) | ICMP error (delivered back locally) | drop
//   receive: NIC engine → hostReceive → RX ring → poll(): batches → Dispatcher: stack.input → local sink
//            (captured) | forward → stack.output → as above | drop
// Callers may send and poll from several threads: each call borrows a lane (a dispatcher with its batch).
// `settle()` runs until every NIC engine is idle and the RX ring is empty, so offline runs are deterministic.

import Synchronization
import XFRMCore
import XFRMEngine
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC

/// A network configuration error on a host.
public struct HostError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { self.description = d }
}

/// One simulated host.
public final class SimHost: @unchecked Sendable {
    public let stack: XFRMStack
    public let pool: PacketPool
    private let nicTable = XFRMMutex<[Int32: SimulatedNIC]>([:])
    /// What the NICs handed to the host, until `poll` runs it (bounded by the pool: it never refuses).
    private let rxRing: BoundedRing<PacketBatch.Packet>
    fileprivate let captured = XFRMMutex<[[UInt8]]>([])
    fileprivate let deliveredCapture = XFRMMutex<[[UInt8]]>([])
    /// The engine's side: interface sinks (the NICs), the local sink, dummy interfaces, the dispatchers' lanes.
    private let sinks = InterfaceSinks()
    public let engineCounters = EngineCounters()
    /// IPv4 fragments from the wire waiting for the rest of their datagram, shared by the lanes.
    public let reassembly: IPv4Reassembly
    private var localSink: CaptureSink!
    private var dummySink: CaptureSink!
    /// Lanes not in use (a lane is created when every one is busy; at most one per concurrent caller).
    private let lanes = BoundedRing<Lane>(capacity: 64)
    /// Capture what leaves dummy interfaces, what NICs put on their wires, and what is delivered locally.
    public let capture: Bool
    /// Counters of the host's own data path (XFRM drops are counted by the stack).
    public var deliveredPackets: UInt64 { self.engineCounters.delivered.load(ordering: .relaxed) }
    public var deliveredBytes: UInt64 { self.engineCounters.deliveredBytes.load(ordering: .relaxed) }
    public var poolExhausted: UInt64 { self.engineCounters.poolExhausted.load(ordering: .relaxed) }

    public init(stack: XFRMStack, poolSlots: Int = 4096, slotSize: Int = 65_536 + 1024, capture: Bool = true) {
        self.stack = stack
        self.pool = PacketPool(count: poolSlots, slotSize: slotSize, headroom: 512)
        self.reassembly = IPv4Reassembly(pool: self.pool, counters: self.engineCounters.reassembly)
        self.capture = capture
        self.rxRing = BoundedRing(capacity: poolSlots)
        self.localSink = CaptureSink(self, delivered: true)
        self.dummySink = CaptureSink(self, delivered: false)
    }

    deinit {
        for nic in self.nics { nic.shutdown() }
    }

    public var nics: [SimulatedNIC] { self.nicTable.withLock { Array($0.values) } }

    public func nic(named name: String) -> SimulatedNIC? {
        self.nicTable.withLock { $0.values.first { $0.name == name } }
    }

    public func nic(ifindex: Int32) -> SimulatedNIC? { self.nicTable.withLock { $0[ifindex] } }

    /// `link add NAME type simnic [mtu N] [sa-capacity N] [offload crypto|packet|both] [peer NAME]`.
    @discardableResult
    public func addSimulatedNIC(name: String, mtu: Int = 1500, saCapacity: Int = 33, modes: Set<OffloadType>,
                                peer: SimulatedNIC? = nil, supportsForwardPolicies: Bool = false,
                                algorithms: NICAlgorithms = .all, engineThreads: Int = 1) throws(HostError)
        -> SimulatedNIC
    {
        let iface: Interface
        do throws(NetworkError) {
            iface = try self.stack.network.addInterface(name: name, kind: "simnic", mtu: mtu)
        } catch {
            throw HostError(error.message)
        }
        let nic = SimulatedNIC(name: name, ifindex: iface.index, modes: modes, saCapacity: saCapacity, mtu: mtu,
                               supportsForwardPolicies: supportsForwardPolicies, algorithms: algorithms, pool: self.pool,
                               engineThreads: engineThreads)
        do throws(DeviceError) {
            try self.stack.attachDevice(nic, ifindex: iface.index)
        } catch {
            _ = try? self.stack.network.deleteInterface(name: name)
            nic.shutdown()
            throw HostError(error.message)
        }
        // The NIC follows its interface: down until `link set up`, and every later state or MTU change.
        nic.setLinkUp(iface.isUp)
        nic.setMTU(iface.mtu)
        let ifindex = iface.index
        self.stack.network.observe { [weak nic] i in
            guard i.index == ifindex, let nic else { return }
            nic.setLinkUp(i.isUp)
            nic.setMTU(i.mtu)
        }
        self.wire(nic)
        self.sinks.set(nic, ifindex: iface.index)
        if let peer { nic.connect(peer: peer) }
        self.nicTable.withLock { $0[iface.index] = nic }
        return nic
    }

    /// Connects a NIC's host side and taps to this host.
    public func wire(_ nic: SimulatedNIC) {
        let ifindex = nic.ifindex
        let pool = nic.pool
        nic.hostReceive = { [weak self] buffer, meta in
            guard let self else {
                pool.release(buffer)  // the host is gone: the buffer still goes back
                return
            }
            if !self.rxRing.push(PacketBatch.Packet(buffer, stage: .input, ifindex: ifindex, metadata: meta)) {
                self.engineCounters.ringFull.wrappingAdd(1, ordering: .relaxed)
                pool.release(buffer)
            }
        }
        nic.limitEvent = { [weak self] _ in self?.stack.deviceLimitEvent() }
        if self.capture {
            nic.wireTap = { [weak self] bytes in self?.captured.withLock { $0.append(bytes) } }
        }
    }

    /// Removes a NIC (`link del`): its SAs and policies go with it.
    public func removeNIC(name: String) throws(HostError) {
        guard let nic = self.nic(named: name) else { throw HostError("Cannot find device \"\(name)\"") }
        // The link goes down first, so no route leads out through it (egress skips a down interface): once the
        // device's offloaded policies are flushed below, a packet they protected finds no policy, and it must then
        // find no way out through this device either rather than leave in clear (the fault tests caught one such
        // frame under load).
        _ = try? self.stack.network.modify(name: name) { (i: inout Interface) throws(NetworkError) in i.isUp = false }
        self.stack.deviceDown(ifindex: nic.ifindex, detach: true)
        nic.disconnect()
        nic.shutdown()
        self.nicTable.withLock { _ = $0.removeValue(forKey: nic.ifindex) }
        self.sinks.set(nil, ifindex: nic.ifindex)
        _ = try? self.stack.network.deleteInterface(name: name)
    }

    // MARK: - Data path

    /// A dispatcher and its batch, borrowed by one call at a time.
    private final class Lane {
        let dispatcher: Dispatcher
        var batch = PacketBatch()
        var taken: [PacketBatch.Packet] = []
        init(_ d: Dispatcher) {
            self.dispatcher = d
            self.taken.reserveCapacity(PacketBatch.defaultCapacity)
        }
    }

    private func withLane<R>(_ body: (Lane) -> R) -> R {
        let lane = self.lanes.popFirst() ?? Lane(self.makeDispatcher())
        defer { self.lanes.push(lane) }
        return body(lane)
    }

    private func makeDispatcher() -> Dispatcher {
        Dispatcher(stack: self.stack, pool: self.pool, rules: .kernel, counters: self.engineCounters,
                   interfaces: self.sinks, local: self.localSink, unknownInterface: self.dummySink,
                   reassembly: self.reassembly)
    }

    /// Sends a locally generated IP packet.
    public func send(_ bytes: [UInt8]) {
        guard var buf = self.pool.allocate() else {
            self.engineCounters.poolExhausted.wrappingAdd(1, ordering: .relaxed)
            return
        }
        guard buf.append(contentsOf: bytes) else {
            self.pool.release(buf)
            return
        }
        self.sendBuffer(&buf)
    }

    /// Sends a packet already in a pooled buffer; the host takes the buffer.
    public func sendBuffer(_ buf: inout PacketBuffer, forwarded: Bool = false) {
        self.withLane { lane in
            lane.batch.append(PacketBatch.Packet(buf, stage: forwarded ? .forward : .output))
            lane.dispatcher.run(&lane.batch)
        }
    }

    /// Receives a packet on a dummy interface (as if from its wire).
    public func receive(_ bytes: [UInt8], ifindex: Int32) {
        guard var buf = self.pool.allocate() else {
            self.engineCounters.poolExhausted.wrappingAdd(1, ordering: .relaxed)
            return
        }
        guard buf.append(contentsOf: bytes) else {
            self.pool.release(buf)
            return
        }
        self.withLane { lane in
            lane.batch.append(PacketBatch.Packet(buf, stage: .input, ifindex: ifindex))
            lane.dispatcher.run(&lane.batch)
        }
    }

    /// Processes up to `limit` packets the NICs handed to the host, a batch at a time; returns how many.
    @discardableResult
    public func poll(limit: Int = .max) -> Int {
        var total = 0
        self.withLane { lane in
            while total < limit {
                let want = min(limit - total, lane.batch.capacity)
                let n = self.rxRing.pop(into: &lane.taken, max: want, timeoutMillis: 0)
                if n == 0 { break }
                for p in lane.taken { lane.batch.append(p) }
                lane.taken.removeAll(keepingCapacity: true)
                lane.dispatcher.run(&lane.batch)
                total += n
            }
        }
        self.stack.pollDeviceEvents()
        return total
    }

    /// Packets waiting in the RX ring.
    public var pendingReceive: Int { self.rxRing.depth }

    /// Runs until every NIC (of this host and `others`) is idle and every RX queue is empty.
    public func settle(with others: [SimHost] = []) {
        let hosts = [self] + others
        while true {
            for h in hosts { for nic in h.nics { nic.drain() } }
            var progress = 0
            for h in hosts { progress += h.poll() }
            if progress == 0 {
                for h in hosts { for nic in h.nics { nic.drain() } }
                if hosts.allSatisfy({ $0.pendingReceive == 0 }) { break }
            }
        }
    }

    /// Takes every captured packet (left, put on a wire, or delivered), in order.
    public func takeCaptured() -> [[UInt8]] {
        self.captured.withLock { c in
            let out = c
            c.removeAll()
            return out
        }
    }

    /// Takes the packets delivered locally since the last call.
    public func takeDelivered() -> [[UInt8]] {
        self.deliveredCapture.withLock { c in
            let out = c
            c.removeAll()
            return out
        }
    }
}

// MARK: - Sinks

/// What leaves a dummy interface (`delivered` false) or is delivered locally (true): captured — delivered packets
/// also in the capture of deliveries — and returned to the pool.
private final class CaptureSink: PacketSink {
    unowned let host: SimHost
    let delivered: Bool
    init(_ host: SimHost, delivered: Bool) {
        self.host = host
        self.delivered = delivered
    }
    func write(_ batch: inout PacketBatch) {
        for i in 0..<batch.count {
            if self.host.capture {
                let bytes = batch[i].buffer.bytes
                self.host.captured.withLock { $0.append(bytes) }
                if self.delivered { self.host.deliveredCapture.withLock { $0.append(bytes) } }
            }
            self.host.pool.release(batch[i].buffer)
        }
        batch.removeAll()
    }
}
