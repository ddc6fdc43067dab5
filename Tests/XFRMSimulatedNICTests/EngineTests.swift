import Dispatch
import Foundation
import Synchronization
import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC
import XFRMTestKit

/// True exactly once.
final class Once: Sendable {
    private let fired = XFRMMutex(false)
    func take() -> Bool {
        self.fired.withLock { f in
            defer { f = true }
            return !f
        }
    }
}

@Suite("SimulatedNIC engine, queues and wire")
struct EngineTests {
    @Test("frames for a wire without a peer go to wireSend once per engine batch, in order, every buffer given")
    func wireSendTakesEngineBatches() throws {
        let h = Harness(poolSize: 128)
        let calls = Recorder<[[UInt8]]>()
        let pool = h.pool
        h.nic.wireSend = { batch in
            calls.append((0..<batch.count).map { batch[$0].buffer.bytes })
            for i in 0..<batch.count { pool.release(batch[i].buffer) }
            batch.removeAll()
        }
        // Stalled, the engine lets 70 frames queue up; restarted, it takes them 32 at a time.
        h.nic.setStalled(true)
        let sent = (0..<70).map { i in SAParams(family: 4, mode: .tunnel).plaintext(20 + i, seed: UInt8(i)) }
        for x in sent { h.send(x) }
        h.nic.setStalled(false)
        h.nic.drain()
        #expect(calls.all.map(\.count) == [32, 32, 6])
        #expect(calls.all.flatMap { $0 } == sent, "no policy: each frame out as it came, in order")
        #expect(h.wire.count == 70, "the tap still sees every frame")
        h.finish()
    }

    @Test("packets for the host go to hostReceiveBatch once per engine batch with the thread's index, ifindex, metadata")
    func hostReceiveTakesEngineBatches() throws {
        let h = Harness(poolSize: 128)
        let calls = Recorder<(Int, [[UInt8]])>()
        let pool = h.pool
        h.nic.hostReceiveBatch = { batch, thread in
            var frames: [[UInt8]] = []
            for i in 0..<batch.count {
                let p = batch[i]
                precondition(p.stage == .input && p.ifindex == 7 && p.metadata != nil)
                frames.append(p.buffer.bytes)
                pool.release(p.buffer)
            }
            calls.append((thread, frames))
            batch.removeAll()
        }
        h.nic.setStalled(true)
        let sent = (0..<40).map { i in SAParams(family: 4, mode: .tunnel).plaintext(20 + i, seed: UInt8(i)) }
        for x in sent { h.nic.receiveFromWire(x) }
        h.nic.setStalled(false)
        h.nic.drain()
        #expect(calls.all.map(\.1.count) == [32, 8])
        #expect(calls.all.allSatisfy { $0.0 == 0 }, "one engine thread: index 0")
        #expect(calls.all.flatMap(\.1) == sent, "not ESP: up to the host as it came, in order")
        #expect(h.host.count == 0, "hostReceive is not called when the batch hook is set")
        h.finish()
    }

    @Test("two NICs joined by a wire: packet offload end to end", arguments: [false, true])
    func twoNICs(sharedPool: Bool) throws {
        let shared = PacketPool(count: 64)
        let a = Harness(name: "simA", pool: sharedPool ? shared : nil)
        let b = Harness(name: "simB", pool: sharedPool ? shared : nil)
        a.nic.connect(peer: b.nic)
        for p in [SAParams(family: 4, mode: .tunnel), SAParams(family: 6, mode: .transport, natt: true)] {
            try a.add(try p.sa(outbound: true), offload(.outbound))
            try a.nic.policyAdd(p.policy(.outbound))
            var c = p.config(outbound: true)
            c.replayWindow = 128
            try b.add(try SecurityAssociation(c, addTime: 0), offload(.inbound))
            var pol = p.policy(.outbound)
            pol.direction = .inbound
            try b.nic.policyAdd(pol)
        }
        let p4 = SAParams(family: 4, mode: .tunnel)
        let p6 = SAParams(family: 6, mode: .transport, natt: true)
        let sent = (0..<10).map { i in i % 2 == 0 ? p4.plaintext(i * 10, seed: UInt8(i)) : p6.plaintext(i * 10) }
        for x in sent { a.send(x) }
        a.nic.drain()
        b.nic.drain()
        #expect(a.wire.count == 10)
        #expect(a.wire.all.allSatisfy { f in !sent.contains(f) }, "only ESP on the wire")
        let got = b.host.all
        #expect(got.map(\.0) == sent)
        #expect(got.allSatisfy { $0.1.packetOffloaded && $0.1.cryptoSuccess })
        #expect(b.nic.counter(.espRX) == 10)
        #expect(b.nic.counter(.rxPackets) == 10)
        a.nic.disconnect()
        a.send(sent[0])
        a.nic.drain()
        b.nic.drain()
        #expect(b.nic.counter(.rxPackets) == 10)
        a.finish()
        b.finish()
    }

    @Test("drain() waits until the engine has handled everything", arguments: [1, 2])
    func drainWaits(threads: Int) throws {
        let h = Harness(engineThreads: threads, poolSize: 320)
        let wire = h.wire
        h.nic.wireTap = { f in
            usleep(50)
            wire.append(f)
        }
        let x = SAParams().plaintext()
        for _ in 0..<300 { h.send(x) }
        h.nic.drain()
        #expect(h.wire.count == 300)
        #expect(h.nic.counter(.txPackets) == 300)
        h.finish()
    }

    @Test("a full host → device queue drops and counts txDropped; transmit never blocks")
    func txQueueFull() throws {
        let h = Harness(queueDepth: 4)
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let once = Once()
        let wire = h.wire
        h.nic.wireTap = { f in
            wire.append(f)
            if once.take() {
                entered.signal()
                release.wait()
            }
        }
        let x = SAParams().plaintext()
        h.send(x)
        entered.wait()  // the engine is busy with packet 1, its queue is empty
        for _ in 0..<4 { h.send(x) }
        h.send(x)
        #expect(h.nic.txDropped == 1)
        #expect(h.nic.counter(.txQueueFull) == 1)
        release.signal()
        h.nic.drain()
        #expect(h.wire.count == 5)
        h.finish()
    }

    @Test("a full wire → device queue drops and counts rxDropped; an exhausted pool counts rx_no_buffer")
    func rxQueueFull() throws {
        let h = Harness(queueDepth: 2, poolSize: 5)
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let once = Once()
        let host = h.host
        let pool = h.pool
        h.nic.hostReceive = { b, m in
            host.append((b.bytes, m))
            pool.release(b)
            if once.take() {
                entered.signal()
                release.wait()
            }
        }
        let x = SAParams().plaintext()
        h.nic.receiveFromWire(x)
        entered.wait()
        h.nic.receiveFromWire(x)
        h.nic.receiveFromWire(x)
        h.nic.receiveFromWire(x)  // queue of 2 full
        #expect(h.nic.counter(.rxQueueFull) == 1)
        var held: [PacketBuffer] = []
        while let b = h.pool.allocate() { held.append(b) }
        h.nic.receiveFromWire(x)  // no buffer
        #expect(h.nic.counter(.rxNoBuffer) == 1)
        #expect(h.nic.rxDropped == 2)
        for b in held { h.pool.release(b) }
        release.signal()
        h.nic.drain()
        #expect(h.host.count == 3)
        h.finish()
    }

    @Test("frames above the MTU are not put on the wire")
    func mtu() throws {
        let h = Harness(mtu: 120)
        let p = SAParams()
        h.send(p.plaintext(60))
        h.send(p.plaintext(200))
        h.nic.drain()
        #expect(h.wire.count == 1)
        #expect(h.nic.counter(.txOversize) == 1)
        h.finish()
    }

    @Test("shutdown releases queued packets; later packets are dropped and released")
    func shutdown() throws {
        let h = Harness()
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let once = Once()
        let wire = h.wire
        h.nic.wireTap = { f in
            wire.append(f)
            if once.take() {
                entered.signal()
                release.wait()
            }
        }
        let x = SAParams().plaintext()
        h.send(x)
        entered.wait()
        for _ in 0..<5 { h.send(x) }
        release.signal()
        h.nic.shutdown()
        #expect(UInt64(h.wire.count) + h.nic.counter(.txShutdown) == 6)
        h.send(x)
        h.nic.receiveFromWire(x)
        #expect(h.nic.counter(.rxShutdown) == 1)
        h.nic.drain()  // returns at once after shutdown
        #expect(h.pool.available == h.pool.slotCount)
        h.finish()
    }

    @Test("dropping the last reference stops the engine")
    func deinitStops() {
        let pool = PacketPool(count: 4)
        weak var weakNIC: SimulatedNIC?
        do {
            let nic = SimulatedNIC(name: "tmp", ifindex: 9, modes: [.packet], pool: pool, engineThreads: 2)
            weakNIC = nic
            var b = pool.allocate()!
            b.append(contentsOf: SAParams().plaintext())
            nic.transmit(b, metadata: OffloadMetadata())
            nic.drain()
        }
        #expect(weakNIC == nil)
        #expect(pool.available == 4)
    }

    @Test("buffers from and to the wire: zero-copy receive and a pool-to-pool wire")
    func zeroCopyReceive() throws {
        let h = Harness()
        var b = h.pool.allocate()!
        let x = SAParams().plaintext()
        b.append(contentsOf: x)
        h.nic.receiveFromWire(b)
        h.nic.drain()
        #expect(h.host.all.map(\.0) == [x])
        h.finish()
    }
}
