// The device's own execution context: `engineThreads` real threads run the engine beside the host's threads, as
// the NIC's silicon runs beside the host CPU. Two bounded queues feed it — host → device (`transmit`) and
// wire → device (`receiveFromWire`) — and it produces frames on the wire (`wireTap`, then a connected peer or
// `wireSend`) and packets for the host (`hostReceiveBatch` or `hostReceive`); `wireSend` and `hostReceiveBatch` get
// each engine thread's output once per engine run (`EngineOutbox`). Every buffer comes from and goes back to the
// pool, on every path.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Synchronization
import XFRMCore
import XFRMPacket

/// A fixed-capacity FIFO in preallocated memory (no allocation per push/pop). Not thread-safe.
struct Ring<Element> {
    private let storage: UnsafeMutablePointer<Element>
    let capacity: Int
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.storage = .allocate(capacity: capacity)
    }

    var isEmpty: Bool { self.count == 0 }

    /// False (and nothing stored) when full.
    @inline(__always)
    mutating func push(_ e: Element) -> Bool {
        guard self.count < self.capacity else { return false }
        var i = self.head + self.count
        if i >= self.capacity { i -= self.capacity }
        (self.storage + i).initialize(to: e)
        self.count += 1
        return true
    }

    @inline(__always)
    mutating func pop() -> Element? {
        guard self.count > 0 else { return nil }
        let e = (self.storage + self.head).move()
        self.head += 1
        if self.head == self.capacity { self.head = 0 }
        self.count -= 1
        return e
    }

    /// Frees the memory; the ring must be empty.
    func deallocate() {
        precondition(self.count == 0)
        self.storage.deallocate()
    }
}

/// A pthread mutex with two condition variables: `work` (items queued, or stop) and `idle` (the engine went idle).
final class EngineSync: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let work = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let idle = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        pthread_mutex_init(self.mutex, nil)
        pthread_cond_init(self.work, nil)
        pthread_cond_init(self.idle, nil)
    }

    deinit {
        pthread_cond_destroy(self.idle)
        pthread_cond_destroy(self.work)
        pthread_mutex_destroy(self.mutex)
        self.idle.deallocate()
        self.work.deallocate()
        self.mutex.deallocate()
    }

    @inline(__always) func lock() { pthread_mutex_lock(self.mutex) }
    @inline(__always) func unlock() { pthread_mutex_unlock(self.mutex) }
    @inline(__always) func waitForWork() { pthread_cond_wait(self.work, self.mutex) }
    @inline(__always) func waitForIdle() { pthread_cond_wait(self.idle, self.mutex) }
    @inline(__always) func signalWork() { pthread_cond_signal(self.work) }
    @inline(__always) func broadcastWork() { pthread_cond_broadcast(self.work) }
    @inline(__always) func broadcastIdle() { pthread_cond_broadcast(self.idle) }
}

/// The host's and the wire's callbacks, and the peer at the other end of the wire.
struct Hooks: Sendable {
    var wireTap: (@Sendable ([UInt8]) -> Void)?
    var hostReceive: (@Sendable (PacketBuffer, OffloadMetadata) -> Void)?
    var limitEvent: (@Sendable (UInt64) -> Void)?
    /// The end of the wire when no peer NIC is connected (a real socket): takes every buffer of the batch.
    var wireSend: (@Sendable (inout PacketBatch) -> Void)?
    /// The host's batch intake (preferred over `hostReceive`): the engine thread's index and its packets for the host.
    var hostReceiveBatch: (@Sendable (inout PacketBatch, _ engineThread: Int) -> Void)?
    weak var peer: NICCore?
    /// The engine thread's frames for `wireSend` and packets for `hostReceiveBatch`, handed over once per engine
    /// batch (set on the thread's own copy of the hooks).
    var outbox: EngineOutbox?
}

/// One engine thread's output: frames for the end of the wire and packets for the host, collected while the thread
/// works through its batch, then handed over in one call each (in the daemon: one lock and one sendmmsg(2) for the
/// wire, one push per worker ring for the host, instead of one of each per packet).
final class EngineOutbox: @unchecked Sendable {
    let thread: Int
    var wire = PacketBatch(capacity: NICCore.batch)
    var host = PacketBatch(capacity: NICCore.batch)

    init(thread: Int) { self.thread = thread }

    /// Queues a frame for the wire or a packet for the host, handing everything over first if its batch is full
    /// (an engine batch makes at most 32 of each, so only if that ever changes).
    @inline(__always)
    func add(_ packet: PacketBatch.Packet, forHost: Bool, hooks: Hooks) {
        if forHost ? self.host.isFull : self.wire.isFull { self.flush(hooks) }
        // The hooks take every buffer they are given, so a flushed batch is empty; a full one here would lose it.
        let added = forHost ? self.host.append(packet) : self.wire.append(packet)
        precondition(added, "a NIC hook kept the buffers it was handed")
    }

    /// Hands over what the thread collected (the callees take every buffer).
    @inline(__always)
    func flush(_ hooks: Hooks) {
        if self.wire.count > 0, let send = hooks.wireSend {
            send(&self.wire)
            self.wire.removeAll()
        }
        if self.host.count > 0, let receive = hooks.hostReceiveBatch {
            receive(&self.host, self.thread)
            self.host.removeAll()
        }
    }
}

/// A packet from the host with its metadata.
struct TXItem {
    var buffer: PacketBuffer
    var metadata: OffloadMetadata
}

/// Everything the device is; `SimulatedNIC` is its public face. The engine threads hold this object (not the
/// `SimulatedNIC`), so dropping the last `SimulatedNIC` reference shuts the engine down.
final class NICCore: @unchecked Sendable {
    let name: String
    let ifindex: Int32
    let modes: Set<OffloadType>
    /// The link MTU (follows `ip link set ... mtu`).
    let mtuValue: Atomic<Int>
    var mtu: Int { self.mtuValue.load(ordering: .relaxed) }
    /// Link state: a device that is down neither sends nor receives (it fails closed).
    let linkUp = Atomic<Bool>(true)
    let supportsForwardPolicies: Bool
    /// The algorithms the device offloads.
    let algorithms: NICAlgorithms
    let pool: PacketPool
    let counters = CounterSet()
    let tables: XFRMMutex<Tables>
    let calls = XFRMMutex(CallRecord())
    /// offload_ok calls (a per-packet callback, so counted apart from `calls`).
    let offloadOKCalls = Atomic<Int>(0)
    let hooks = XFRMMutex(Hooks())
    /// Injected faults (Faults.swift).
    let faults = XFRMMutex(FaultPlan())
    /// The device vanished (Faults.swift): it carries nothing and refuses every add.
    let vanished = Atomic<Bool>(false)

    // Queue state, guarded by `sync`.
    let sync = EngineSync()
    private var txQueue: Ring<TXItem>
    private var rxQueue: Ring<PacketBuffer>
    private var busy = 0
    private var running = 0
    private var stopping = false
    /// An injected stall: the engine takes nothing from its queues.
    private var stalled = false
    private var engineThreadIDs: [pthread_t] = []

    /// Items an engine thread takes per lock round.
    static let batch = 32

    init(name: String, ifindex: Int32, modes: Set<OffloadType>, saCapacity: Int, policyCapacity: Int, mtu: Int,
         supportsForwardPolicies: Bool, algorithms: NICAlgorithms = .all, pool: PacketPool, queueDepth: Int) {
        self.algorithms = algorithms
        precondition(saCapacity > 0 && policyCapacity > 0 && queueDepth > 0, "capacities must be positive")
        self.name = name
        self.ifindex = ifindex
        self.modes = modes
        self.mtuValue = Atomic(mtu)
        self.supportsForwardPolicies = supportsForwardPolicies
        self.pool = pool
        self.tables = XFRMMutex(Tables(saCapacity: saCapacity, policyCapacity: policyCapacity))
        self.txQueue = Ring(capacity: queueDepth)
        self.rxQueue = Ring(capacity: queueDepth)
    }

    deinit {
        // Threads hold the core, so by now they have exited and released whatever was queued.
        self.txQueue.deallocate()
        self.rxQueue.deallocate()
    }

    // MARK: - Threads

    func start(threads: Int) {
        precondition(threads > 0, "the engine needs at least one thread")
        self.sync.lock()
        self.running = threads
        self.sync.unlock()
        for i in 0..<threads {
            let name = "\(self.name)-engine\(i)"
            let t = Thread { [self] in
                // The kernel's name too (/proc/PID/task/TID/comm, at most 15 bytes), so that host CPU can be told
                // from the device's: Foundation's Thread.name does not set it on Linux, and Glibc does not export
                // pthread_setname_np to Swift; writing /proc/thread-self/comm is what it does (Linux 3.17+).
                #if os(Linux)
                let fd = open("/proc/thread-self/comm", O_WRONLY)
                if fd >= 0 {
                    let bytes = Array(name.utf8.prefix(15))
                    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    close(fd)
                }
                #endif
                self.engineLoop(index: i)
            }
            t.name = name
            t.start()
        }
    }

    private var onEngineThread: Bool {
        let me = pthread_self()
        return self.engineThreadIDs.contains { pthread_equal($0, me) != 0 }
    }

    private func engineLoop(index: Int) {
        let txBatch = UnsafeMutablePointer<TXItem>.allocate(capacity: NICCore.batch)
        let rxBatch = UnsafeMutablePointer<PacketBuffer>.allocate(capacity: NICCore.batch)
        let outbox = EngineOutbox(thread: index)
        defer {
            txBatch.deallocate()
            rxBatch.deallocate()
        }
        self.sync.lock()
        self.engineThreadIDs.append(pthread_self())
        while true {
            while (self.stalled || self.txQueue.isEmpty && self.rxQueue.isEmpty) && !self.stopping {
                self.sync.waitForWork()
            }
            if self.stopping { break }
            var nt = 0
            while nt < NICCore.batch, let item = self.txQueue.pop() {
                (txBatch + nt).initialize(to: item)
                nt += 1
            }
            var nr = 0
            while nr < NICCore.batch, let b = self.rxQueue.pop() {
                (rxBatch + nr).initialize(to: b)
                nr += 1
            }
            self.busy += 1
            self.sync.unlock()

            var hooks = self.hooks.withLock { $0 }
            hooks.outbox = hooks.wireSend == nil && hooks.hostReceiveBatch == nil ? nil : outbox
            let snapshot = self.tables.withLock { $0.snapshot }
            for i in 0..<nr { self.receiveOne((rxBatch + i).move(), hooks: hooks, snapshot: snapshot) }
            for i in 0..<nt {
                let item = (txBatch + i).move()
                self.transmitOne(item.buffer, metadata: item.metadata, hooks: hooks, snapshot: snapshot)
            }
            outbox.flush(hooks)

            self.sync.lock()
            self.busy -= 1
            if self.busy == 0 && self.txQueue.isEmpty && self.rxQueue.isEmpty { self.sync.broadcastIdle() }
        }
        // Stopping: the last thread out releases what is still queued.
        self.running -= 1
        if self.running == 0 { self.releaseQueued() }
        self.sync.broadcastIdle()
        self.sync.unlock()
    }

    /// Stops the engine threads and waits for them (unless called from one of them); queued packets are released.
    func shutdown() {
        self.sync.lock()
        self.stopping = true
        self.sync.broadcastWork()
        if !self.onEngineThread {
            while self.running > 0 { self.sync.waitForIdle() }
        }
        self.sync.unlock()
    }

    /// Blocks until both queues are empty and no engine thread is working (returns at once on an engine thread,
    /// which cannot wait for itself, and after shutdown; while stalled it waits only for the batch in hand).
    func drain() {
        self.sync.lock()
        if !self.onEngineThread {
            while self.running > 0
                && (self.busy > 0 || !self.stalled && (!self.txQueue.isEmpty || !self.rxQueue.isEmpty))
            {
                self.sync.waitForIdle()
            }
        }
        self.sync.unlock()
    }

    /// Starts or ends an injected stall.
    func setStalled(_ stalled: Bool) {
        self.sync.lock()
        self.stalled = stalled
        self.sync.broadcastWork()
        self.sync.broadcastIdle()
        self.sync.unlock()
    }

    /// Drops (and counts) everything queued, as a device that vanished loses its rings.
    func dropQueued() {
        self.sync.lock()
        self.releaseQueued()
        self.sync.broadcastIdle()
        self.sync.unlock()
    }

    /// Returns everything queued to the pool, counted as shutdown drops. Call with `sync` locked.
    private func releaseQueued() {
        while let item = self.txQueue.pop() {
            self.pool.release(item.buffer)
            self.counters.txDrop(.txShutdown)
        }
        while let b = self.rxQueue.pop() {
            self.pool.release(b)
            self.counters.rxDrop(.rxShutdown)
        }
    }

    // MARK: - Queues

    /// Host → device. Never blocks: a full queue drops (and counts) the packet.
    func enqueueTX(_ buffer: PacketBuffer, metadata: OffloadMetadata) {
        guard self.linkUp.load(ordering: .acquiring) else {
            self.pool.release(buffer)
            self.counters.txDrop(.txShutdown)
            return
        }
        self.sync.lock()
        if self.stopping {
            self.sync.unlock()
            self.pool.release(buffer)
            self.counters.txDrop(.txShutdown)
            return
        }
        let ok = self.txQueue.push(TXItem(buffer: buffer, metadata: metadata))
        if ok { self.sync.signalWork() }
        self.sync.unlock()
        if !ok {
            self.pool.release(buffer)
            self.counters.txDrop(.txQueueFull)
        }
    }

    /// Wire → device; `buffer` must come from this device's pool.
    func enqueueRX(_ buffer: PacketBuffer) {
        guard self.linkUp.load(ordering: .acquiring) else {
            self.pool.release(buffer)
            self.counters.rxDrop(.rxShutdown)
            return
        }
        self.sync.lock()
        if self.stopping {
            self.sync.unlock()
            self.pool.release(buffer)
            self.counters.rxDrop(.rxShutdown)
            return
        }
        let ok = self.rxQueue.push(buffer)
        if ok { self.sync.signalWork() }
        self.sync.unlock()
        if !ok {
            self.pool.release(buffer)
            self.counters.rxDrop(.rxQueueFull)
        }
    }

    /// Wire → device from bytes: copied into a buffer from the pool.
    func enqueueRX(bytes: UnsafeRawBufferPointer) {
        guard bytes.count <= self.pool.slotSize - self.pool.headroom, var b = self.pool.allocate() else {
            self.counters.rxDrop(.rxNoBuffer)
            return
        }
        if let base = bytes.baseAddress, bytes.count > 0 {
            b.append(bytes.count).copyMemory(from: base, byteCount: bytes.count)
        }
        self.enqueueRX(b)
    }

    /// A frame arriving from the peer's wire: handed over as is when both ends share a pool, else copied into a
    /// buffer of ours and the sender's returned to its pool.
    func arriveFromWire(_ buffer: PacketBuffer, senderPool: PacketPool) {
        if senderPool === self.pool {
            self.enqueueRX(buffer)
            return
        }
        buffer.withUnsafeBytes { self.enqueueRX(bytes: $0) }
        senderPool.release(buffer)
    }

    // MARK: - Device → wire, device → host

    /// Puts a frame on the wire: MTU check, counters, the tap (a copy), then the peer or the end of the wire.
    @inline(__always)
    func putOnWire(_ buffer: PacketBuffer, hooks: Hooks) {
        guard self.linkUp.load(ordering: .acquiring) else {
            self.pool.release(buffer)
            self.counters.txDrop(.txShutdown)
            return
        }
        guard buffer.count <= self.mtu else {
            self.pool.release(buffer)
            self.counters.txDrop(.txOversize)
            return
        }
        self.counters.add(.txPackets)
        self.counters.add(.txBytes, UInt64(buffer.count))
        if let tap = hooks.wireTap { tap(buffer.bytes) }
        if let peer = hooks.peer {
            peer.arriveFromWire(buffer, senderPool: self.pool)
        } else if let outbox = hooks.outbox, hooks.wireSend != nil {
            outbox.add(PacketBatch.Packet(buffer, stage: .output), forHost: false, hooks: hooks)
        } else {
            self.pool.release(buffer)
        }
    }

    /// Hands a packet to the host (which returns the buffer to the pool).
    @inline(__always)
    func deliverToHost(_ buffer: PacketBuffer, _ metadata: OffloadMetadata, hooks: Hooks) {
        if let outbox = hooks.outbox, hooks.hostReceiveBatch != nil {
            let packet = PacketBatch.Packet(buffer, stage: .input, ifindex: self.ifindex, metadata: metadata)
            outbox.add(packet, forHost: true, hooks: hooks)
            return
        }
        guard let host = hooks.hostReceive else {
            self.pool.release(buffer)
            self.counters.rxDrop(.rxNoHost)
            return
        }
        host(buffer, metadata)
    }

    /// Raises a lifetime event for an SA (after its lock is released: the core pulls stats from inside).
    @inline(__always)
    func raise(_ crossing: SAEntryState.LimitCrossing, _ entry: SAEntry, hooks: Hooks) {
        guard crossing != .none, let event = hooks.limitEvent else { return }
        event(entry.handle)
    }
}
