// `xfrm-bench engine [--check]`: the daemon's per-packet work without the system calls — batches of 64 IPv4 packets
// through host A's Dispatcher (policy lookup, SA, ESP, accounting, routing to a sink) and the ESP packets through
// host B's (SAD, replay, open, policy check, local sink) — with the allocations per packet counted by the
// interposed malloc. The reference, in the same run, is the bare ESP transform over the same packets (one seal and
// one open per packet). `--check` exits 1 when the engine path allocates in its steady state (CI runs it).

import CMallocCounter
import Foundation
import XFRMCore
import XFRMCrypto
import XFRMEngine
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Keeps what a dispatcher hands it, to be sent round again (no copy, no allocation).
private final class LoopSink: PacketSink {
    var batch = PacketBatch()
    var count = 0
    let pool: PacketPool
    let keep: Bool
    init(pool: PacketPool, keep: Bool) {
        self.pool = pool
        self.keep = keep
    }
    func write(_ b: inout PacketBatch) {
        for i in 0..<b.count {
            self.count += 1
            if self.keep { self.batch.append(b[i]) } else { self.pool.release(b[i].buffer) }
        }
        b.removeAll()
    }
}

func engineBenchmark(seconds: Double, rounds: Int, check: Bool) {
    let pool = PacketPool(count: 512, slotSize: 2048, headroom: 256)
    let (a, b, key) = makeBenchStacks()
    let counters = EngineCounters()
    let wire = LoopSink(pool: pool, keep: true)
    let delivered = LoopSink(pool: pool, keep: true)
    let sinks = InterfaceSinks()
    sinks.set(wire, ifindex: 2)
    let da = Dispatcher(stack: a, pool: pool, rules: .daemon, counters: counters, interfaces: sinks,
                        local: LoopSink(pool: pool, keep: false))
    let db = Dispatcher(stack: b, pool: pool, rules: .daemon, counters: counters, interfaces: InterfaceSinks(),
                        local: delivered)
    print("xfrm-bench engine: 64-packet batches through A's dispatcher (output) and B's (input), daemon rules, vs the")
    print("bare ESP transform (seal + open) on the same packets; CPU time of this thread, best of \(rounds) rounds\n")
    print("size   engine ns/pkt  bare ns/pkt  bare/engine  allocs/pkt")
    var failed = false
    for size in [64, 1420] {
        let inner = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                       payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28)))
        var batch = PacketBatch()
        func fill() {
            while !batch.isFull {
                var buf = pool.allocate()!
                _ = buf.append(contentsOf: inner)
                batch.append(PacketBatch.Packet(buf, stage: .output))
            }
        }
        // One round trip: 64 packets out through A, their ESP in through B, the delivered buffers reset for the next.
        func roundTrip(_ n: Int) {
            for _ in 0..<(n / 64) {
                da.run(&batch)
                for i in 0..<wire.batch.count {
                    var p = wire.batch[i]
                    p.stage = .input
                    p.ifindex = 2
                    p.verdict = .pending
                    batch.append(p)
                }
                wire.batch.removeAll()
                db.run(&batch)
                for i in 0..<delivered.batch.count {
                    var buf = delivered.batch[i].buffer
                    buf.reset(headroom: pool.headroom)
                    _ = buf.append(contentsOf: inner)
                    batch.append(PacketBatch.Packet(buf, stage: .output))
                }
                delivered.batch.removeAll()
                precondition(batch.count == 64, "a packet was dropped: \(counters)")
            }
        }
        fill()
        // The reference: the same SA's transform alone (no lookup, no routing), sealing and opening one packet.
        let config = ESPConfig(spi: 0x2002, mode: .tunnel,
                               crypto: try! ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: key, icvBits: 128),
                               tunnelSource: IPAddress("192.0.2.1"), tunnelDestination: IPAddress("192.0.2.2"),
                               replayWindow: 4096)
        let tx = try! ESPTransform(config)
        let rx = try! ESPTransform(config)
        var scratch = pool.allocate()!
        func bare(_ n: Int) {
            for _ in 0..<n {
                scratch.reset(headroom: pool.headroom)
                _ = scratch.append(contentsOf: inner)
                precondition(tx.encapsulate(&scratch) == nil, "the reference's seal failed")
                guard case .delivered = rx.decapsulate(&scratch) else { fatalError("the reference's open failed") }
            }
        }
        var best = (engine: Double.infinity, bare: Double.infinity, allocs: 0.0)
        for _ in 0..<rounds {
            let e = measure(seconds: seconds / 2, batch: 256, roundTrip)
            let r = measure(seconds: seconds / 2, batch: 256, bare)
            best.engine = min(best.engine, 1e9 / e.pps)
            best.bare = min(best.bare, 1e9 / r.pps)
            best.allocs = max(best.allocs, e.allocs)
        }
        pool.release(scratch)
        for i in 0..<batch.count { pool.release(batch[i].buffer) }
        batch.removeAll()
        print(String(format: "%4d   %13.0f  %11.0f  %11.2f  %10.2f", size, best.engine, best.bare,
                     best.bare / best.engine, best.allocs))
        print("{\"bench\": \"engine\", \"size\": \(size), \"engine_ns\": \(Int(best.engine)), \"bare_ns\": "
              + "\(Int(best.bare)), \"ratio\": \(String(format: "%.3f", best.bare / best.engine)), \"allocs_per_packet\": "
              + "\(String(format: "%.2f", best.allocs))}")
        if best.allocs > 0 { failed = true }
    }
    if check && failed {
        FileHandle.standardError.write("xfrm-bench engine: the engine path allocates per packet\n".data(using: .utf8)!)
        exit(1)
    }
}
