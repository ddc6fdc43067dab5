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
    fileprivate let rings: [BoundedRing<PacketBatch.Packet>]
    private let dispatchers: [Dispatcher]
    fileprivate let stack: XFRMStack
    fileprivate let pool: PacketPool
    fileprivate let counters: EngineCounters
    private var threads: [pthread_t] = []
    private let stopping = Atomic<Bool>(false)
    private lazy var defaultStaging = Staging(workers: self.count)
    /// Called by each worker between batches (and at least every 100 ms when idle), e.g. to run timers.
    private let idle: (@Sendable (_ worker: Int) -> Void)?
    /// The XFRM interface id outbound packets were routed into (0: none): the workers' output path and the affinity
    /// of outbound packets look up policies with it.
    public let ifID: UInt32

    /// - Parameter makeDispatcher: builds worker `i`'s dispatcher (each with its own sinks' buffers).
    public init(workers: Int, stack: XFRMStack, pool: PacketPool, counters: EngineCounters,
                ringCapacity: Int = EngineConstants.ringCapacity, idle: (@Sendable (Int) -> Void)? = nil,
                ifID: UInt32 = 0, makeDispatcher: (Int) -> Dispatcher) {
        precondition(workers > 0)
        self.count = workers
        self.ifID = ifID
        self.stack = stack
        self.pool = pool
        self.counters = counters
        self.idle = idle
        self.rings = (0..<workers).map { _ in BoundedRing(capacity: ringCapacity) }
        // Worker i is CPU i for per-CPU SAs (RFC 9611): its dispatcher passes i to the output path.
        self.dispatchers = (0..<workers).map { i in
            let d = makeDispatcher(i)
            d.cpu = UInt32(i)
            d.ifID = ifID
            return d
        }
    }

    /// Packets waiting in each worker's ring (queue-depth gauges).
    public var depths: [Int] { self.rings.map(\.depth) }

    /// One intake thread's handle for submitting batches (its staging arrays are its own, so several intakes can
    /// submit at once; each keeps its own arrival order).
    public final class Submitter {
        let pool: WorkerPool
        let staging: Staging

        init(_ pool: WorkerPool) {
            self.pool = pool
            self.staging = Staging(workers: pool.count)
        }

        /// Hands a batch to the workers by affinity; leaves it empty.
        public func submit(_ batch: inout PacketBatch) { self.staging.submit(&batch, to: self.pool) }
    }

    /// An intake's per-worker staging arrays. It holds no reference to the pool, so the pool keeps its own
    /// (`submit`) without a reference cycle: a pool that held a submitter holding the pool was never freed, nor
    /// its stack, dispatchers, rings or packet pool (found by LeakSanitizer, issue 10).
    final class Staging {
        var perWorker: [[PacketBatch.Packet]]

        init(workers: Int) {
            self.perWorker = (0..<workers).map { _ in
                var a: [PacketBatch.Packet] = []
                a.reserveCapacity(EngineConstants.batchSize)
                return a
            }
        }

        func submit(_ batch: inout PacketBatch, to pool: WorkerPool) {
            if pool.count == 1 {
                for i in 0..<batch.count { self.perWorker[0].append(batch[i]) }
            } else {
                for i in 0..<batch.count {
                    self.perWorker[Int(WorkerPool.mix(pool.affinity(of: batch[i])) % UInt32(pool.count))]
                        .append(batch[i])
                }
            }
            batch.removeAll()
            for w in 0..<pool.count where !self.perWorker[w].isEmpty {
                pool.rings[w].push(contentsOf: &self.perWorker[w]) { refused in
                    pool.counters.ringFull.wrappingAdd(1, ordering: .relaxed)
                    pool.pool.release(refused.buffer)
                }
            }
        }
    }

    /// A submitter for one intake thread.
    public func makeSubmitter() -> Submitter { Submitter(self) }

    /// Hands a batch to the workers by affinity through the pool's own staging arrays; leaves it empty. Only one thread
    /// may call this at a time (other intakes use `makeSubmitter()`).
    public func submit(_ batch: inout PacketBatch) { self.defaultStaging.submit(&batch, to: self) }

    /// What picks a packet's worker: the stack's affinity (the SPI, or the inner flow), or, for a packet an offload
    /// device already handled, its SA's handle (a packet-offloaded one is plaintext by now, with no SPI to read).
    @inline(__always)
    func affinity(of packet: PacketBatch.Packet) -> UInt32 {
        let handle = packet.metadata?.handle ?? 0
        return handle != 0 ? UInt32(truncatingIfNeeded: handle ^ handle >> 32)
            : self.stack.affinity(of: packet.buffer, stage: packet.stage, ifID: self.ifID)
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
