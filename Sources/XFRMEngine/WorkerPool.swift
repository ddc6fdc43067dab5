#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization
import XFRMCore
import XFRMPacket

/// The engine's workers: N threads, each with its own bounded ring and its own dispatcher (see the pipeline in
/// Engine.swift). The intake calls `submit` with whole batches; every packet goes to the worker its affinity
/// names, so the packets of one SA are handled by one worker, in arrival order.
public final class WorkerPool: @unchecked Sendable {
    public let count: Int
    private let rings: [BoundedRing<PacketBatch.Packet>]
    private let dispatchers: [Dispatcher]
    private let stack: XFRMStack
    private let pool: PacketPool
    private let counters: EngineCounters
    private var threads: [pthread_t] = []
    private let stopping = Atomic<Bool>(false)
    /// The intake's per-worker staging, reused between submits (only the intake thread touches it).
    private var staging: [[PacketBatch.Packet]]
    /// Called by each worker between batches (and at least every 100 ms when idle), e.g. to run timers.
    private let idle: (@Sendable (_ worker: Int) -> Void)?

    /// - Parameter makeDispatcher: builds worker `i`'s dispatcher (each with its own sinks' buffers).
    public init(workers: Int, stack: XFRMStack, pool: PacketPool, counters: EngineCounters,
                ringCapacity: Int = EngineConstants.ringCapacity, idle: (@Sendable (Int) -> Void)? = nil,
                makeDispatcher: (Int) -> Dispatcher) {
        precondition(workers > 0)
        self.count = workers
        self.stack = stack
        self.pool = pool
        self.counters = counters
        self.idle = idle
        self.rings = (0..<workers).map { _ in BoundedRing(capacity: ringCapacity) }
        self.dispatchers = (0..<workers).map(makeDispatcher)
        self.staging = (0..<workers).map { _ in
            var a: [PacketBatch.Packet] = []
            a.reserveCapacity(EngineConstants.batchSize)
            return a
        }
    }

    /// Packets waiting in each worker's ring (queue-depth gauges).
    public var depths: [Int] { self.rings.map(\.depth) }

    /// Hands a batch to the workers by affinity; leaves it empty. Only one intake thread may call this at a time.
    public func submit(_ batch: inout PacketBatch) {
        if self.count == 1 {
            for i in 0..<batch.count { self.staging[0].append(batch[i]) }
        } else {
            for i in 0..<batch.count {
                let key = self.stack.affinity(of: batch[i].buffer, stage: batch[i].stage)
                self.staging[Int(Self.mix(key) % UInt32(self.count))].append(batch[i])
            }
        }
        batch.removeAll()
        for w in 0..<self.count where !self.staging[w].isEmpty {
            self.rings[w].push(contentsOf: &self.staging[w]) { refused in
                self.counters.ringFull.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(refused.buffer)
            }
        }
    }

    /// Hands one packet to its worker, from any thread (an offload device's engine): one lock per packet.
    public func submitOne(_ packet: PacketBatch.Packet) {
        let w = self.count == 1 ? 0 : Int(Self.mix(self.stack.affinity(of: packet.buffer, stage: packet.stage))
            % UInt32(self.count))
        if !self.rings[w].push(packet) {
            self.counters.ringFull.wrappingAdd(1, ordering: .relaxed)
            self.pool.release(packet.buffer)
        }
    }

    /// Spreads SPIs and hashes over the workers (SPIs are often sequential).
    @inline(__always)
    static func mix(_ key: UInt32) -> UInt32 {
        var x = key
        x ^= x >> 16
        x &*= 0x7feb_352d
        x ^= x >> 15
        return x
    }

    public func start() {
        for w in 0..<self.count {
            let context = Unmanaged.passRetained(WorkerContext(pool: self, index: w)).toOpaque()
            var id = pthread_t()
            let rc = pthread_create(&id, nil, { arg in
                let c = Unmanaged<WorkerContext>.fromOpaque(arg!).takeRetainedValue()
                c.pool.work(c.index)
                return nil
            }, context)
            if rc == 0 { self.threads.append(id) } else { Unmanaged<WorkerContext>.fromOpaque(context).release() }
        }
    }

    /// Stops the workers after they have handled what is queued, and waits for them.
    public func stop() {
        self.stopping.store(true, ordering: .relaxed)
        for r in self.rings { r.close() }
        for t in self.threads { pthread_join(t, nil) }
        self.threads = []
    }

    private final class WorkerContext {
        let pool: WorkerPool
        let index: Int
        init(pool: WorkerPool, index: Int) {
            self.pool = pool
            self.index = index
        }
    }

    private func work(_ w: Int) {
        let ring = self.rings[w]
        let dispatcher = self.dispatchers[w]
        var taken: [PacketBatch.Packet] = []
        taken.reserveCapacity(EngineConstants.batchSize)
        var batch = PacketBatch()
        while true {
            let n = ring.pop(into: &taken, max: EngineConstants.batchSize, timeoutMillis: 100)
            if n == 0 {
                if self.stopping.load(ordering: .relaxed) { return }
                self.idle?(w)
                continue
            }
            for p in taken { batch.append(p) }
            taken.removeAll(keepingCapacity: true)
            dispatcher.run(&batch)
        }
    }
}
