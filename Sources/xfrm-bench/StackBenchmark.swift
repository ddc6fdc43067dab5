// `xfrm-bench stack [--check]`: the whole output and input paths of the XFRM stack per packet on one core — policy
// lookup (or the flow's cached bundle), SA state and lifetime, ESP, accounting, routing; on input SAD lookup,
// replay, ESP, policy check — against the bare ESP transform (the same SA parameters and backend) on the same
// packets in the same run. Thread CPU time, best of N interleaved rounds; allocations per packet from the
// interposed malloc. `--check` exits 1 if a path allocates (CI runs it). Each path is measured per call
// (`output`, `input`) and through the batch entry point the daemon uses (`output-batch`, `input-batch`: 64 packets
// of one flow per `XFRMStack.process`).

import CMallocCounter
import Foundation
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// A's output path and B's input path over one packet size, and the bare transform loops to compare with.
private final class StackWorkload: @unchecked Sendable {  // one thread
    let (a, b, key) = makeBenchStacks()
    let pool = PacketPool(count: 80, slotSize: 2048, headroom: 256)
    /// The daemon's way in: 64 packets per call of `XFRMStack.process` (consecutive packets of one flow share the
    /// lookups of their bundle, SA and verdict; each still takes the SA's lock once).
    var batch = PacketBatch()
    /// Swapped with `batch` while a loop works on it (a unique reference: no copy, no allocation).
    var spare = PacketBatch(capacity: 1)
    let inner: [UInt8]
    let size: Int
    var buf: PacketBuffer
    let ringCount = 256
    let ring: UnsafeMutableRawPointer
    let wireSize: Int
    let rxTransform: ESPTransform
    let firstSeq: UInt64
    var slot = 0
    let bare: ESPWorkload

    init(size: Int) {
        self.size = size
        self.inner = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", proto: 17,
                                        payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28)))
        self.buf = self.pool.allocate()!
        // The ring: 256 consecutive ESP packets from A's own output path.
        var packets: [[UInt8]] = []
        for _ in 0..<self.ringCount {
            var b = self.pool.allocate()!
            b.append(contentsOf: self.inner)
            guard case .transmit = self.a.output(&b) else { fatalError("stack output refused the packet") }
            packets.append(b.bytes)
            self.pool.release(b)
        }
        let wireSize = packets[0].count
        let ring = UnsafeMutableRawPointer.allocate(byteCount: self.ringCount * wireSize, alignment: 64)
        for (i, r) in packets.enumerated() {
            r.withUnsafeBytes { (ring + i * wireSize).copyMemory(from: $0.baseAddress!, byteCount: wireSize) }
        }
        (self.ring, self.wireSize) = (ring, wireSize)
        let sa = self.b.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: 0)!
        self.rxTransform = sa.transform!
        self.firstSeq = self.rxTransform.replayTop
        self.rxTransform.setInboundSequence(self.firstSeq)
        self.bare = ESPWorkload(size: size, backend: self.a.backend)
    }

    deinit {
        self.pool.release(self.buf)
        for i in 0..<self.batch.count { self.pool.release(self.batch[i].buffer) }
        self.ring.deallocate()
    }

    /// Fills the batch with 64 buffers once; the loops rewrite them in place.
    func prepareBatch() {
        while !self.batch.isFull { _ = self.batch.append(PacketBatch.Packet(self.pool.allocate()!, stage: .output)) }
    }

    func outputBatch(_ n: Int) {
        var batch = self.spare
        swap(&batch, &self.batch)  // a unique reference: rewriting packets must not copy the batch
        defer {
            swap(&batch, &self.batch)
            self.spare = batch
        }
        let (a, inner, headroom, size) = (self.a, self.inner, self.pool.headroom, self.size)
        for i in 0..<batch.count { (batch[i].stage, batch[i].ifindex) = (.output, 0) }
        for _ in 0..<(n / batch.count) {
            for i in 0..<batch.count {  // in place: the harness copies no packet record
                batch[i].buffer.reset(headroom: headroom)
                let d = batch[i].buffer.append(size)
                inner.withUnsafeBytes { d.copyMemory(from: $0.baseAddress!, byteCount: 28) }
                batch[i].verdict = .pending
            }
            a.process(&batch)
            for i in 0..<batch.count {
                guard case .output(.transmit, _) = batch[i].verdict else { fatalError("stack output dropped a packet") }
            }
        }
    }

    func inputBatch(_ n: Int) {
        var batch = self.spare
        swap(&batch, &self.batch)
        var slot = self.slot
        defer {
            swap(&batch, &self.batch)
            self.spare = batch
            self.slot = slot
        }
        let (b, ring, wireSize, headroom) = (self.b, self.ring, self.wireSize, self.pool.headroom)
        for i in 0..<batch.count { (batch[i].stage, batch[i].ifindex) = (.input, 2) }
        for _ in 0..<(n / batch.count) {
            for i in 0..<batch.count {  // in place
                if slot == self.ringCount {
                    slot = 0
                    self.rxTransform.setInboundSequence(self.firstSeq)
                }
                batch[i].buffer.reset(headroom: headroom)
                batch[i].buffer.append(wireSize).copyMemory(from: ring + slot * wireSize, byteCount: wireSize)
                slot += 1
                batch[i].verdict = .pending
            }
            b.process(&batch)
            for i in 0..<batch.count {
                guard case .input(.forward, _) = batch[i].verdict else { fatalError("stack input dropped a packet") }
            }
        }
    }

    func output(_ n: Int) {
        var buf = self.buf
        defer { self.buf = buf }
        let (a, inner, headroom, size) = (self.a, self.inner, self.pool.headroom, self.size)
        for _ in 0..<n {
            buf.reset(headroom: headroom)
            let p = buf.append(size)
            inner.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: 28) }
            guard case .transmit = a.output(&buf) else { fatalError("stack output dropped a packet") }
        }
    }

    func input(_ n: Int) {
        var buf = self.buf
        var slot = self.slot
        defer { (self.buf, self.slot) = (buf, slot) }
        let (b, ring, wireSize, headroom) = (self.b, self.ring, self.wireSize, self.pool.headroom)
        for _ in 0..<n {
            if slot == self.ringCount {
                slot = 0
                self.rxTransform.setInboundSequence(self.firstSeq)
            }
            buf.reset(headroom: headroom)
            buf.append(wireSize).copyMemory(from: ring + slot * wireSize, byteCount: wireSize)
            slot += 1
            guard case .forward = b.input(&buf, ifindex: 2) else { fatalError("stack input dropped a packet") }
        }
    }
}

func stackBenchmark(seconds: Double, rounds: Int, sizes: [Int], check: Bool) {
    struct StackRow { let size: Int; let op: String; let pps: Double; let espPPS: Double; let allocs: Double }
    var rows: [StackRow] = []
    var backendName = ""
    for size in sizes {
        let w = StackWorkload(size: size)
        w.prepareBatch()
        backendName = w.a.backend.name
        var best: [String: (pps: Double, allocs: Double)] = [:]
        for _ in 0..<rounds {
            for op in ["esp-encap", "output", "output-batch", "esp-decap", "input", "input-batch"] {
                let m: (pps: Double, allocs: Double)
                switch op {
                case "esp-encap": m = measure(seconds: seconds, w.bare.encap)
                case "output": m = measure(seconds: seconds, w.output)
                case "output-batch": m = measure(seconds: seconds, w.outputBatch)
                case "esp-decap": m = measure(seconds: seconds, w.bare.decap)
                case "input": m = measure(seconds: seconds, w.input)
                default: m = measure(seconds: seconds, w.inputBatch)
                }
                if m.pps > best[op]?.pps ?? 0 { best[op] = m }
            }
        }
        for (op, esp) in [("output", "esp-encap"), ("output-batch", "esp-encap"), ("input", "esp-decap"),
                          ("input-batch", "esp-decap")] {
            rows.append(StackRow(size: size, op: op, pps: best[op]!.pps, espPPS: best[esp]!.pps, allocs: best[op]!.allocs))
        }
    }
    print("XFRM stack per packet, one core (IPv4 tunnel, rfc4106(gcm(aes)) 128, \(backendName)): output = policy or "
          + "cached bundle, SA, ESP, accounting, route; input = SAD, replay, ESP, policy check; vs the bare ESP "
          + "transform on the same packets; thread CPU time, best of \(rounds) rounds of \(seconds) s")
    print("(op: one call per packet; op-batch: XFRMStack.process on batches of 64, the daemon's path)")
    print("size  op            Mpps   ns/pkt   esp Mpps  ratio_to_esp  allocs/pkt")
    for r in rows {
        print(String(format: "%4d  %-12@  %6.3f  %7.1f  %9.3f  %12.2f  %10.3f", r.size, r.op as NSString, r.pps / 1e6,
                     1e9 / r.pps, r.espPPS / 1e6, r.pps / r.espPPS, r.allocs))
    }
    for r in rows {
        print(String(format: "{\"bench\": \"stack\", \"backend\": \"%@\", \"size\": %d, \"op\": \"%@\", \"pps\": %.0f, \"ratio_to_esp\": %.3f, \"allocs_per_packet\": %.3f}",
                     backendName as NSString, r.size, r.op as NSString, r.pps, r.pps / r.espPPS, r.allocs))
    }
    if check && rows.contains(where: { $0.allocs > 0 }) {
        FileHandle.standardError.write("xfrm-bench stack: the stack path allocates per packet\n".data(using: .utf8)!)
        exit(1)
    }
}
