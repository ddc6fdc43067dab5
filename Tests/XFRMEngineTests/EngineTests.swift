import Synchronization
import Testing
import XFRMCore
import XFRMEngine
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// A sink that records the bytes it was given (from any worker) and returns the buffers to their pool.
final class RecordingSink: PacketSink, @unchecked Sendable {
    let pool: PacketPool
    let packets = XFRMMutex<[[UInt8]]>([])
    init(pool: PacketPool) { self.pool = pool }
    func write(_ batch: inout PacketBatch) {
        for i in 0..<batch.count {
            let bytes = batch[i].buffer.bytes
            self.packets.withLock { $0.append(bytes) }
            self.pool.release(batch[i].buffer)
        }
        batch.removeAll()
    }
    var count: Int { self.packets.withLock { $0.count } }
}

/// Host A (192.0.2.1, eth0 ifindex 2) with `tunnels` tunnel SAs towards 192.0.2.2, one per inner /24
/// (10.0.N.0/24 → 10.1.N.0/24, SPI 0x1000 + N, reqid N), and host B with the matching inbound SAs and policies.
/// `outer6`: the tunnels run between 2001:db8::1 and 2001:db8::2 instead.
struct EnginePair {
    let a = XFRMStack()
    let b = XFRMStack()
    let pool = PacketPool(count: 8192, slotSize: 2048, headroom: 256)

    init(tunnels: Int, outer6: Bool = false) throws {
        let (ea, eb) = outer6 ? ("2001:db8::1", "2001:db8::2") : ("192.0.2.1", "192.0.2.2")
        for (s, outer) in [(self.a, ea), (self.b, eb)] {
            try s.network.addInterface(name: "eth0", kind: "dummy")
            try s.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try s.network.addAddress(IPPrefix(outer + (outer6 ? "/64" : "/24"))!, device: "eth0")
            try s.network.addRoute(IPPrefix("0.0.0.0/0")!, device: "eth0", via: nil)
            if outer6 { try s.network.addRoute(IPPrefix("::/0")!, device: "eth0", via: nil) }
        }
        for n in 1...tunnels {
            let t = Template(source: IPAddress(ea), destination: IPAddress(eb), mode: 1, reqid: UInt32(n))
            let sel = Selector(family: 4, source: IPPrefix("10.0.\(n).0/24")!, destination: IPPrefix("10.1.\(n).0/24")!)
            try self.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
            try self.b.addPolicy(Policy(selector: sel, direction: .inbound, templates: [t]), update: false)
            try self.b.addPolicy(Policy(selector: sel, direction: .forward, templates: [t]), update: false)
            for s in [self.a, self.b] {
                let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20, seed: 9),
                                                    icvBits: 128)
                try s.addState(s.makeSA(SAConfig(
                    id: SAID(destination: IPAddress(eb)!, spi: 0x1000 + UInt32(n)),
                    source: IPAddress(ea)!, selector: .any(family: 0), reqid: UInt32(n), mode: .tunnel,
                    replayWindow: 32, crypto: crypto)))
            }
        }
    }

    func packet(tunnel n: Int, index: Int) -> PacketBuffer {
        var buf = self.pool.allocate()!
        let bytes = PacketFactory.ipv4(source: "10.0.\(n).1", destination: "10.1.\(n).1", proto: 17,
                                       payload: PacketFactory.udp(payload: PacketFactory.pattern(64 + index % 7)))
        _ = buf.append(contentsOf: bytes)
        return buf
    }
}

@Suite("Engine: rings, workers by SA affinity, the dispatcher's rules")
struct EngineTests {
    @Test("a ring is FIFO, refuses what does not fit (counted, handed back), and a pop times out when empty")
    func ringBounds() {
        let ring = BoundedRing<Int>(capacity: 4)
        var items = [1, 2, 3, 4, 5, 6]
        var refused: [Int] = []
        ring.push(contentsOf: &items) { refused.append($0) }
        #expect(items.isEmpty && refused == [5, 6] && ring.dropped.load(ordering: .relaxed) == 2)
        #expect(ring.push(7) == false && ring.dropped.load(ordering: .relaxed) == 3)
        var out: [Int] = []
        #expect(ring.pop(into: &out, max: 3, timeoutMillis: 0) == 3 && out == [1, 2, 3])
        #expect(ring.push(8))
        out.removeAll()
        #expect(ring.pop(into: &out, max: 10, timeoutMillis: 0) == 2 && out == [4, 8])
        #expect(ring.pop(into: &out, max: 10, timeoutMillis: 20) == 0)
        ring.close()
        #expect(ring.push(9) == false && ring.popFirst() == nil)
    }

    @Test("workers keep each SA's packets in order: sequence numbers leave increasing and the peer drops none")
    func perSAOrder() throws {
        let tunnels = 6
        let perTunnel = 300
        let p = try EnginePair(tunnels: tunnels)
        let counters = EngineCounters()
        let wire = RecordingSink(pool: p.pool)
        let local = RecordingSink(pool: p.pool)
        let workers = WorkerPool(workers: 3, stack: p.a, pool: p.pool, counters: counters) { _ in
            let sinks = InterfaceSinks()
            sinks.set(wire, ifindex: 2)
            return Dispatcher(stack: p.a, pool: p.pool, rules: .daemon, counters: counters, interfaces: sinks,
                              local: local)
        }
        // Each SA has its own affinity key, so the SAs spread over the workers (else ordering would be trivial).
        let used = Set((1...tunnels).map { n in
            let buf = p.packet(tunnel: n, index: 0)
            defer { p.pool.release(buf) }
            return p.a.affinity(of: buf, stage: .output)
        })
        #expect(used.count == tunnels)
        workers.start()
        var batch = PacketBatch()
        for i in 0..<perTunnel {
            for n in 1...tunnels {
                batch.append(PacketBatch.Packet(p.packet(tunnel: n, index: i), stage: .output))
                if batch.isFull { workers.submit(&batch) }
            }
        }
        workers.submit(&batch)
        workers.stop()
        let sent = wire.packets.withLock { $0 }
        #expect(sent.count == tunnels * perTunnel && counters.ringFull.load(ordering: .relaxed) == 0)
        var last: [UInt32: UInt32] = [:]
        var inOrder = true
        for bytes in sent {
            let spi = UInt32(bytes[20]) << 24 | UInt32(bytes[21]) << 16 | UInt32(bytes[22]) << 8 | UInt32(bytes[23])
            let seq = UInt32(bytes[24]) << 24 | UInt32(bytes[25]) << 16 | UInt32(bytes[26]) << 8 | UInt32(bytes[27])
            if seq != (last[spi] ?? 0) + 1 { inOrder = false }
            last[spi] = seq
        }
        #expect(inOrder && last.count == tunnels && last.values.allSatisfy { $0 == UInt32(perTunnel) })
        // B's input through its own workers: every packet decapsulated and delivered, no replay drop.
        let bCounters = EngineCounters()
        let delivered = RecordingSink(pool: p.pool)
        let bWorkers = WorkerPool(workers: 2, stack: p.b, pool: p.pool, counters: bCounters) { _ in
            Dispatcher(stack: p.b, pool: p.pool, rules: .daemon, counters: bCounters, interfaces: InterfaceSinks(),
                       local: delivered)
        }
        bWorkers.start()
        for bytes in sent {
            var buf = p.pool.allocate()!
            _ = buf.append(contentsOf: bytes)
            batch.append(PacketBatch.Packet(buf, stage: .input, ifindex: 2))
            if batch.isFull { bWorkers.submit(&batch) }
        }
        bWorkers.submit(&batch)
        bWorkers.stop()
        #expect(delivered.count == sent.count)
        #expect(p.b.statistics[.inStateSeqError] == 0 && p.b.statistics[.inNoStates] == 0)
        #expect(p.pool.available == p.pool.slotCount, "every buffer went back to the pool")
    }

    @Test("daemon rules: output no SA transformed and input that never was ESP are dropped and counted")
    func daemonRules() throws {
        let p = try EnginePair(tunnels: 1)
        for (rules, expectDropped) in [(Dispatcher.Rules.daemon, true), (.kernel, false)] {
            let counters = EngineCounters()
            let wire = RecordingSink(pool: p.pool)
            let local = RecordingSink(pool: p.pool)
            let sinks = InterfaceSinks()
            sinks.set(wire, ifindex: 2)
            let d = Dispatcher(stack: p.a, pool: p.pool, rules: rules, counters: counters, interfaces: sinks,
                               local: local)
            var batch = PacketBatch()
            // No policy covers 10.9.9.9: the default accepts it, so the stack would send it as is.
            var plain = p.pool.allocate()!
            _ = plain.append(contentsOf: PacketFactory.ipv4(source: "10.0.1.1", destination: "10.9.9.9", proto: 17,
                                                            payload: PacketFactory.udp(payload: [1, 2, 3])))
            batch.append(PacketBatch.Packet(plain, stage: .output))
            // Plain UDP for this host, from the wire: the IN policy check passes (no policy covers it).
            var clear = p.pool.allocate()!
            _ = clear.append(contentsOf: PacketFactory.ipv4(source: "192.0.2.2", destination: "192.0.2.1", proto: 17,
                                                            payload: PacketFactory.udp(payload: [4, 5, 6])))
            batch.append(PacketBatch.Packet(clear, stage: .input, ifindex: 2))
            batch.append(PacketBatch.Packet(p.packet(tunnel: 1, index: 0), stage: .output))
            d.run(&batch)
            #expect(batch.isEmpty)
            #expect(counters.unprotected.load(ordering: .relaxed) == (expectDropped ? 1 : 0))
            #expect(counters.notDecapsulated.load(ordering: .relaxed) == (expectDropped ? 1 : 0))
            // The daemon answers the unprotected packet with ICMP unreachable (UnreachableTests); the kernel
            // rules deliver the clear input instead.
            #expect(wire.count == (expectDropped ? 1 : 2) && local.count == 1)
            #expect(counters.unreachable.load(ordering: .relaxed) == (expectDropped ? 1 : 0))
        }
        #expect(p.pool.available == p.pool.slotCount)
    }

    @Test("a stopped worker pool that was submitted to is freed with its last reference (no cycle through its staging)")
    func stoppedPoolIsFreed() throws {
        let p = try EnginePair(tunnels: 2)
        weak var freed: WorkerPool?
        do {
            let counters = EngineCounters()
            let wire = RecordingSink(pool: p.pool)
            let workers = WorkerPool(workers: 2, stack: p.a, pool: p.pool, counters: counters) { _ in
                let sinks = InterfaceSinks()
                sinks.set(wire, ifindex: 2)
                return Dispatcher(stack: p.a, pool: p.pool, rules: .daemon, counters: counters, interfaces: sinks,
                                  local: RecordingSink(pool: p.pool))
            }
            freed = workers
            workers.start()
            var batch = PacketBatch()
            batch.append(PacketBatch.Packet(p.packet(tunnel: 1, index: 0), stage: .output))
            workers.submit(&batch)  // the pool's own staging
            batch.append(PacketBatch.Packet(p.packet(tunnel: 2, index: 0), stage: .output))
            workers.makeSubmitter().submit(&batch)  // an intake's
            workers.stop()
            #expect(wire.count == 2)
        }
        #expect(freed == nil)
        #expect(p.pool.available == p.pool.slotCount)
    }
}
