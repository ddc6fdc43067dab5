#if canImport(Glibc)
import Glibc
#endif
import Testing
import XFRMCore
import XFRMEngine
import XFRMPacket

@Suite("Engine overload: full worker rings")
struct EngineOverloadTests {
    @Test("a full worker ring drops and counts ring_full, returning every refused buffer; the queued packets still go out and later batches flow")
    func ringFull() throws {
        let p = try EnginePair(tunnels: 1)
        let counters = EngineCounters()
        let wire = RecordingSink(pool: p.pool)
        let local = RecordingSink(pool: p.pool)
        let workers = WorkerPool(workers: 1, stack: p.a, pool: p.pool, counters: counters, ringCapacity: 16) { _ in
            let sinks = InterfaceSinks()
            sinks.set(wire, ifindex: 2)
            return Dispatcher(stack: p.a, pool: p.pool, rules: .daemon, counters: counters, interfaces: sinks,
                              local: local)
        }
        // Not started yet: nothing drains the ring.
        var batch = PacketBatch()
        for i in 0..<100 {
            batch.append(PacketBatch.Packet(p.packet(tunnel: 1, index: i), stage: .output))
            if batch.isFull { workers.submit(&batch) }
        }
        workers.submit(&batch)
        let refused = counters.ringFull.load(ordering: .relaxed)
        #expect(refused == 100 - 16)
        #expect(p.pool.available == p.pool.slotCount - 16, "refused buffers went back to the pool")
        workers.start()
        // The load falls: the worker empties its ring (bounded wait).
        for _ in 0..<500 where workers.depths[0] > 0 { usleep(2000) }
        #expect(workers.depths[0] == 0)
        for i in 0..<10 {
            batch.append(PacketBatch.Packet(p.packet(tunnel: 1, index: i), stage: .output))
        }
        workers.submit(&batch)
        workers.stop()
        #expect(wire.count == 16 + 10)
        #expect(UInt64(wire.count) + refused == 110, "submitted = sent + ring_full")
        #expect(counters.ringFull.load(ordering: .relaxed) == refused)
        #expect(p.pool.available == p.pool.slotCount)
    }
}
