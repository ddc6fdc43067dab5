// A simulated IPsec offload NIC implementing both offload modes (≈ netdevsim's ipsec.c for the driver contract,
// with mlx5's packet-offload rules and data path): its own bounded SA and policy tables, its own engine threads,
// a wire (tap or a peer NIC) and a host side.
//
//   host ──transmit──▶ [TX queue] ──▶ engine threads ──▶ wire (wireTap; a connected peer, or wireSend in batches)
//   host ◀─hostReceiveBatch / hostReceive── engine threads ◀── [RX queue] ◀──receiveFromWire── wire
//
// The core calls the XfrmOffloadDevice callbacks on the control path; `transmit` and `receiveFromWire` return at
// once (bounded queues that drop and count when full); `drain()` waits until the engine is idle.

import XFRMCore
import XFRMPacket

public final class SimulatedNIC: XfrmOffloadDevice, CustomDebugStringConvertible, @unchecked Sendable {
    let core: NICCore

    public let ifindex: Int32
    public let saCapacity: Int
    public let policyCapacity: Int
    /// The link MTU.
    public var mtu: Int { self.core.mtu }
    public let supportsForwardPolicies: Bool
    public let pool: PacketPool
    public let engineThreads: Int
    /// Depth of each of the two queues (host → device, wire → device).
    public let queueDepth: Int

    /// - Parameters:
    ///   - modes: the offload types the device takes (`[.crypto]`, `[.packet]` or both).
    ///   - saCapacity: SA slots shared by RX and TX (netdevsim has 33).
    ///   - pool: where every buffer the device handles comes from and goes back to.
    ///   - engineThreads: threads running the device's engine.
    ///   - queueDepth: packets each queue holds before it drops.
    public init(name: String, ifindex: Int32, modes: Set<OffloadType>, saCapacity: Int = 33,
                policyCapacity: Int = 64, mtu: Int = 1500, supportsForwardPolicies: Bool = false,
                algorithms: NICAlgorithms = .all, pool: PacketPool, engineThreads: Int = 1, queueDepth: Int = 1024) {
        self.core = NICCore(
            name: name, ifindex: ifindex, modes: modes, saCapacity: saCapacity, policyCapacity: policyCapacity,
            mtu: mtu, supportsForwardPolicies: supportsForwardPolicies, algorithms: algorithms, pool: pool,
            queueDepth: queueDepth)
        self.ifindex = ifindex
        self.saCapacity = saCapacity
        self.policyCapacity = policyCapacity
        self.supportsForwardPolicies = supportsForwardPolicies
        self.pool = pool
        self.engineThreads = engineThreads
        self.queueDepth = queueDepth
        self.core.start(threads: engineThreads)
    }

    deinit { self.core.shutdown() }

    // MARK: - XfrmOffloadDevice

    public var name: String { self.core.name }
    public var modes: Set<OffloadType> { self.core.modes }
    /// The algorithms the device offloads (`algos`).
    public var algorithms: NICAlgorithms { self.core.algorithms }
    public var features: DeviceFeatures { [.hwESP, .hwESPTxChecksum] }
    public var callbacks: DeviceCallbacks {
        [.stateAdd, .stateDelete, .stateFree, .offloadOK, .advanceESN, .updateStats, .policyAdd, .policyDelete,
         .policyFree]
    }
    public var supportedTypes: Set<OffloadType> { self.core.modes }

    public func stateAdd(_ sa: SecurityAssociation, offload: StateOffload) throws(DeviceError) -> UInt64 {
        try self.core.stateAdd(sa, offload: offload)
    }

    public func stateDelete(_ sa: SecurityAssociation, offload: StateOffload) {
        self.core.stateDelete(sa, offload: offload)
    }

    public func stateFree(_ sa: SecurityAssociation, offload: StateOffload) {
        self.core.stateFree(sa, offload: offload)
    }

    public func offloadOK(_ packet: PacketBuffer, sa: SecurityAssociation, offload: StateOffload) -> Bool {
        self.core.offloadOK(packet, sa: sa, offload: offload)
    }

    public func advanceESN(_ sa: SecurityAssociation, offload: StateOffload) {
        self.core.advanceESN(sa, offload: offload)
    }

    public func updateStats(_ sa: SecurityAssociation, offload: StateOffload) -> DeviceSACounters {
        self.core.updateStats(sa, offload: offload)
    }

    public func policyAdd(_ policy: Policy) throws(DeviceError) {
        try self.core.policyAdd(policy)
    }

    public func policyDelete(_ policy: Policy) {
        self.core.policyDelete(policy)
    }

    public func policyFree(_ policy: Policy) {
        self.core.policyFree(policy)
    }

    /// Host → device: queues the packet and returns at once; the device owns the buffer from here (a full queue
    /// drops it and counts `txDropped`).
    public func transmit(_ packet: PacketBuffer, metadata: OffloadMetadata) {
        self.core.enqueueTX(packet, metadata: metadata)
    }

    // MARK: - Wire and host

    /// Wire → device: a copy of `bytes` in a buffer from the pool (dropped and counted if the pool is empty).
    public func receiveFromWire(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { self.core.enqueueRX(bytes: $0) }
    }

    /// Wire → device without a copy. The buffer must come from this device's pool; the device owns it after the call.
    public func receiveFromWire(_ buffer: PacketBuffer) {
        self.core.enqueueRX(buffer)
    }

    /// Called (on an engine thread) with a copy of every frame the device puts on its wire: a raw IP packet.
    public var wireTap: (@Sendable ([UInt8]) -> Void)? {
        get { self.core.hooks.withLock { $0.wireTap } }
        set { self.core.hooks.withLock { $0.wireTap = newValue } }
    }

    /// Called on an engine thread with the frames for a wire that has no peer NIC (a daemon's real sockets), once
    /// per engine batch (up to 32, in the order the thread sent them): it takes every buffer (the batch's `.output`
    /// packets) and returns each to the pool when sent.
    public var wireSend: (@Sendable (inout PacketBatch) -> Void)? {
        get { self.core.hooks.withLock { $0.wireSend } }
        set { self.core.hooks.withLock { $0.wireSend = newValue } }
    }

    /// Called on an engine thread with its packets for the host (`.input` packets with this device's ifindex and
    /// their offload metadata), once per engine batch, and the thread's index (0 ..< engineThreads): one intake
    /// per thread can stage them for workers. It takes every buffer. When set, `hostReceive` is not called.
    public var hostReceiveBatch: (@Sendable (inout PacketBatch, _ engineThread: Int) -> Void)? {
        get { self.core.hooks.withLock { $0.hostReceiveBatch } }
        set { self.core.hooks.withLock { $0.hostReceiveBatch = newValue } }
    }

    /// Called on an engine thread with each packet for the host; the host returns the buffer to the pool.
    public var hostReceive: (@Sendable (PacketBuffer, OffloadMetadata) -> Void)? {
        get { self.core.hooks.withLock { $0.hostReceive } }
        set { self.core.hooks.withLock { $0.hostReceive = newValue } }
    }

    /// Called on an engine thread with an SA's handle when it crosses its soft limit and again at its hard limit
    /// (the core then pulls counts with updateStats and runs expiry). Must not call `drain()`.
    public var limitEvent: (@Sendable (_ handle: UInt64) -> Void)? {
        get { self.core.hooks.withLock { $0.limitEvent } }
        set { self.core.hooks.withLock { $0.limitEvent = newValue } }
    }

    /// Sets the link state (`ip link set up|down`): a device that is down drops everything, in both directions.
    /// A vanished device stays down.
    public func setLinkUp(_ up: Bool) {
        self.core.linkUp.store(up && !self.core.vanished.load(ordering: .acquiring), ordering: .releasing)
    }

    /// Follows `ip link set ... mtu N`.
    public func setMTU(_ mtu: Int) { self.core.mtuValue.store(mtu, ordering: .relaxed) }

    /// Joins this NIC and `peer` by a wire, both ways: what one puts on its wire arrives at the other's
    /// receive queue (in a buffer of the receiver's pool), with no host involved.
    public func connect(peer: SimulatedNIC) {
        self.core.hooks.withLock { $0.peer = peer.core }
        peer.core.hooks.withLock { $0.peer = self.core }
    }

    /// Cuts the wire (both ends).
    public func disconnect() {
        let peer = self.core.hooks.withLock { h in
            let p = h.peer
            h.peer = nil
            return p
        }
        peer?.hooks.withLock { $0.peer = nil }
    }

    /// Blocks until both queues are empty and the engine is idle. Frames already handed to a connected peer are
    /// in the peer's queue: drain the peer too.
    public func drain() { self.core.drain() }

    /// Stops the engine threads; anything still queued is returned to the pool. Later packets are dropped.
    public func shutdown() { self.core.shutdown() }

    // MARK: - Inspection

    /// How many times the core called each callback.
    public var callCounts: DeviceCallCounts {
        var c = self.core.calls.withLock { $0.counts }
        c.offloadOK = self.core.offloadOKCalls.load(ordering: .relaxed)
        return c
    }
    /// The callbacks in the order the core made them (`offloadOK` excluded; the last few thousand).
    public var callLog: [DeviceCall] { self.core.calls.withLock { $0.log } }

    /// A device-wide counter.
    public func counter(_ c: NICCounter) -> UInt64 { self.core.counters[c] }
    public var txDropped: UInt64 { self.core.counters[.txDropped] }
    public var rxDropped: UInt64 { self.core.counters[.rxDropped] }

    /// Used SA slots (including deleted SAs not yet freed), of which outbound, and used policy slots.
    public var saCount: Int { self.core.tables.withLock { $0.sas.count { $0 != nil } } }
    public var txSACount: Int {
        self.core.tables.withLock { $0.sas.count { $0 != nil && $0!.direction != .inbound } }
    }
    public var policyCount: Int { self.core.tables.withLock { $0.policies.count { $0 != nil } } }

    /// The device's counters for the SA a handle names (nil once freed).
    public func saCounters(handle: UInt64) -> DeviceSACounters? { self.core.counters(handle: handle) }

    /// The debug text (≈ netdevsim's debugfs ipsec file) for `link show -s`.
    public var debugDescription: String { self.core.debugText }
}
