// `xfrm-bench esp [--backend openssl|ipsec-mb|all] [--threads N[,N...]]`: ESP encapsulation and decapsulation of
// IPv4 tunnel-mode packets with AES-128-GCM-16 at inner sizes 64, 512 and 1420 bytes (or --sizes).
//
// - One core (always): each backend against its own raw AES-128-GCM seal/open of the same sizes in the same run —
//   OpenSSL's EVP calls through one reused context, or ipsec-mb's direct API with a pre-expanded key. Time is the
//   thread's CPU time; each figure is the best of N interleaved rounds.
// - `--threads`: encapsulation on N threads at once, one SA (and buffers) per thread, wall-clock packets per second
//   summed over the threads, and the scaling against 1 thread measured in the same run.

import CMallocCounter
import CXFRMCrypto
import CXFRMIPsecMB
import Foundation
import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

struct Row {
    let backend: String
    let size: Int
    let op: String
    let pps: Double
    let allocs: Double
    let rawPPS: Double
    var gbps: Double { self.pps * Double(self.size) * 8 / 1e9 }
    var ratio: Double { self.pps / self.rawPPS }
}

let benchKey = PacketFactory.pattern(16, seed: 0x40)

/// One SA pair, a pool and the packets of one size: the encap and decap loops of one thread.
final class ESPWorkload: @unchecked Sendable {  // one thread at a time
    let pool = PacketPool(count: 4, slotSize: 2048, headroom: 128)
    let tx: ESPTransform
    let rx: ESPTransform
    let size: Int
    let inner: [UInt8]
    var txBuf: PacketBuffer
    var rxBuf: PacketBuffer
    let headroom: Int
    let ringCount = 256
    let ring: UnsafeMutableRawPointer
    let wireSize: Int
    let firstSeq: UInt64
    var slot = 0

    init(size: Int, backend: any ESPCryptoBackend) {
        let spec = try! ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: benchKey + [1, 2, 3, 4], icvBits: 128)
        let config = ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: spec, tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), replayWindow: 128)
        self.tx = try! ESPTransform(config, backend: backend)
        self.rx = try! ESPTransform(config, backend: backend)
        self.size = size
        self.inner = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28)))
        precondition(self.inner.count == size)
        self.txBuf = self.pool.allocate()!
        self.txBuf.append(contentsOf: self.inner)
        self.headroom = self.txBuf.headroom
        // Decap reads a ring of 256 distinct ESP packets (consecutive sequence numbers), copied into the receive
        // buffer per packet as a NIC would DMA it; the window restarts once per pass over the ring.
        var packets: [[UInt8]] = []
        for _ in 0..<self.ringCount {
            var b = self.pool.allocate()!
            b.append(contentsOf: self.inner)
            precondition(self.tx.encapsulate(&b) == nil)
            packets.append(b.bytes)
            self.pool.release(b)
        }
        let wireSize = packets[0].count
        let ring = UnsafeMutableRawPointer.allocate(byteCount: self.ringCount * wireSize, alignment: 64)
        for (i, r) in packets.enumerated() {
            r.withUnsafeBytes { (ring + i * wireSize).copyMemory(from: $0.baseAddress!, byteCount: wireSize) }
        }
        (self.wireSize, self.ring) = (wireSize, ring)
        self.rxBuf = self.pool.allocate()!
        self.firstSeq = self.tx.outboundSequence - UInt64(self.ringCount)
        self.rx.setInboundSequence(self.firstSeq)
    }

    deinit {
        self.ring.deallocate()
        self.pool.release(self.txBuf)
        self.pool.release(self.rxBuf)
    }

    // Encap: the buffer is restored to the inner packet's place and header each time (the payload bytes left from
    // the previous round are just payload), so no copy of the packet is timed.
    // The loops work on locals and store them back once: a class's stored `var` would pay Swift's dynamic
    // exclusivity check per access, which is the benchmark's cost, not the transform's.
    func encap(_ n: Int) {
        var buf = self.txBuf
        defer { self.txBuf = buf }
        let (tx, inner, headroom, size) = (self.tx, self.inner, self.headroom, self.size)
        for _ in 0..<n {
            buf.reset(headroom: headroom)
            let p = buf.append(size)
            inner.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: 28) }
            if tx.encapsulate(&buf) != nil { fatalError("encap failed") }
        }
    }

    func decap(_ n: Int) {
        var buf = self.rxBuf
        var slot = self.slot
        defer { (self.rxBuf, self.slot) = (buf, slot) }
        let (rx, ring, wireSize, headroom) = (self.rx, self.ring, self.wireSize, self.headroom)
        for _ in 0..<n {
            if slot == self.ringCount {
                slot = 0
                rx.setInboundSequence(self.firstSeq)
            }
            buf.reset(headroom: headroom)
            buf.append(wireSize).copyMemory(from: ring + slot * wireSize, byteCount: wireSize)
            slot += 1
            guard case .esp(let info) = ESPClassification.classify(&buf), rx.decapsulate(&buf, info: info) == nil
            else { fatalError("decap failed") }
        }
    }
}

/// The raw reference of one backend: AES-128-GCM on `size` bytes with an 8-byte AAD and nothing around it. Open
/// decrypts in place, so each open runs on a fresh copy of one valid sealed record (the same copy the decap loop
/// makes from its ring), and the tag must verify every time.
final class RawGCM {
    let size: Int
    let data: UnsafeMutableRawPointer
    let sealed: UnsafeMutableRawPointer
    let nonce = UnsafeMutableRawPointer.allocate(byteCount: 12, alignment: 16)
    let sealedNonce = UnsafeMutableRawPointer.allocate(byteCount: 12, alignment: 16)
    let aad = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 16)
    let tag = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    let sealedTag = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    var counter: UInt64 = 0
    /// ipsec-mb's context, or OpenSSL's two EVP contexts.
    let mb: OpaquePointer?
    let evpSeal: OpaquePointer?
    let evpOpen: OpaquePointer?

    init(size: Int, backend: String) {
        self.size = size
        self.data = UnsafeMutableRawPointer.allocate(byteCount: size + 64, alignment: 64)
        self.data.initializeMemory(as: UInt8.self, repeating: 0x5a, count: size + 64)
        self.sealed = UnsafeMutableRawPointer.allocate(byteCount: size + 64, alignment: 64)
        self.nonce.initializeMemory(as: UInt8.self, repeating: 0, count: 12)
        self.aad.initializeMemory(as: UInt8.self, repeating: 1, count: 8)
        if backend == "ipsec-mb" {
            self.mb = benchKey.withUnsafeBytes { xfrm_mb_raw_gcm_new($0.baseAddress) }!
            (self.evpSeal, self.evpOpen) = (nil, nil)
        } else {
            self.mb = nil
            self.evpSeal = benchKey.withUnsafeBytes { xfrm_bench_gcm_new($0.baseAddress, 1) }!
            self.evpOpen = benchKey.withUnsafeBytes { xfrm_bench_gcm_new($0.baseAddress, 0) }!
        }
        self.nonce.storeBE64(1, at: 4)
        self.sealedNonce.copyMemory(from: self.nonce, byteCount: 12)
        self.sealed.copyMemory(from: self.data, byteCount: size)
        self.sealOne(self.sealedNonce, self.sealed, self.sealedTag)
    }

    deinit {
        if let mb = self.mb { xfrm_mb_raw_gcm_free(mb) }
        if let s = self.evpSeal { xfrm_bench_gcm_free(s) }
        if let o = self.evpOpen { xfrm_bench_gcm_free(o) }
        for p in [self.data, self.sealed, self.nonce, self.sealedNonce, self.aad, self.tag, self.sealedTag] { p.deallocate() }
    }

    @inline(__always)
    private func sealOne(_ nonce: UnsafeRawPointer, _ data: UnsafeMutableRawPointer, _ tag: UnsafeMutableRawPointer) {
        if let mb = self.mb {
            xfrm_mb_raw_gcm_seal(mb, nonce, self.aad, 8, data, self.size, tag)
        } else {
            _ = xfrm_bench_gcm_seal(self.evpSeal, nonce, self.aad, 8, data, Int32(self.size), tag)
        }
    }

    func seal(_ n: Int) {
        for _ in 0..<n {
            self.counter &+= 1
            self.nonce.storeBE64(self.counter, at: 4)
            self.sealOne(self.nonce, self.data, self.tag)
        }
    }

    func open(_ n: Int) {
        for _ in 0..<n {
            self.data.copyMemory(from: self.sealed, byteCount: self.size)
            let ok = self.mb.map { xfrm_mb_raw_gcm_open($0, self.sealedNonce, self.aad, 8, self.data, self.size, self.sealedTag) == 1 }
                ?? (xfrm_bench_gcm_open(self.evpOpen, self.sealedNonce, self.aad, 8, self.data, Int32(self.size), self.sealedTag) == 1)
            if !ok { fatalError("raw open failed") }
        }
    }
}

func espBenchmark(seconds: Double, rounds: Int, backends: [String], threads: [Int], sizes: [Int]) {
    var rows: [Row] = []
    for name in backends {
        guard let backend = CryptoBackends.named(name) else {
            FileHandle.standardError.write("xfrm-bench esp: backend \(name) is not available here\n".data(using: .utf8)!)
            exit(2)
        }
        for size in sizes {
            let w = ESPWorkload(size: size, backend: backend)
            let raw = RawGCM(size: size, backend: name)
            var best: [String: (pps: Double, allocs: Double)] = [:]
            for _ in 0..<rounds {
                for op in ["raw-seal", "encap", "raw-open", "decap"] {
                    let m: (pps: Double, allocs: Double)
                    switch op {
                    case "raw-seal": m = measure(seconds: seconds, raw.seal)
                    case "encap": m = measure(seconds: seconds, w.encap)
                    case "raw-open": m = measure(seconds: seconds, raw.open)
                    default: m = measure(seconds: seconds, w.decap)
                    }
                    if m.pps > best[op]?.pps ?? 0 { best[op] = m }
                }
            }
            rows.append(Row(backend: name, size: size, op: "encap", pps: best["encap"]!.pps,
                            allocs: best["encap"]!.allocs, rawPPS: best["raw-seal"]!.pps))
            rows.append(Row(backend: name, size: size, op: "decap", pps: best["decap"]!.pps,
                            allocs: best["decap"]!.allocs, rawPPS: best["raw-open"]!.pps))
        }
    }

    print("ESP tunnel mode, IPv4, rfc4106(gcm(aes)) 128-bit key, 16-byte ICV; one core; thread CPU time; "
          + "best of \(rounds) rounds of \(seconds) s; raw = the same backend's bare AES-128-GCM")
    if backends.contains("ipsec-mb") { print("ipsec-mb: \(IPsecMBBackend.description)") }
    print("backend   size  op     Mpps    Gbps   raw Mpps  ratio_to_raw  allocs/pkt")
    for r in rows {
        print(String(format: "%-8@  %4d  %-5@  %6.3f  %6.2f  %8.3f  %12.2f  %10.3f", r.backend as NSString, r.size,
                     r.op as NSString, r.pps / 1e6, r.gbps, r.rawPPS / 1e6, r.ratio, r.allocs))
    }
    for r in rows {
        print(String(format: "{\"backend\": \"%@\", \"threads\": 1, \"size\": %d, \"op\": \"%@\", \"pps\": %.0f, \"gbps\": %.3f, \"allocs_per_packet\": %.3f, \"ratio_to_raw\": %.3f}",
                     r.backend as NSString, r.size, r.op as NSString, r.pps, r.gbps, r.allocs, r.ratio))
    }
    if !threads.isEmpty { espThreadScaling(seconds: seconds, rounds: rounds, backends: backends, threads: threads) }
}

/// ESP encapsulation on N threads, one SA per thread, and the backend's raw AES-128-GCM seal on as many threads in
/// the same rounds (interleaved): the raw scaling is what the machine gives two busy cores at that moment (a shared
/// host's other load, frequency), the reference the ESP scaling is read against.
func espThreadScaling(seconds: Double, rounds: Int, backends: [String], threads: [Int]) {
    let counts = threads.contains(1) ? threads : [1] + threads
    struct ScaleRow {
        let backend: String; let size: Int; let threads: Int; let pps: Double; let scaling: Double
        let rawPPS: Double; let rawScaling: Double
    }
    var rows: [ScaleRow] = []
    for name in backends {
        let backend = CryptoBackends.named(name)!
        for size in [64, 1420] {
            var best: [Int: Double] = [:]
            var bestRaw: [Int: Double] = [:]
            for _ in 0..<rounds {
                for n in counts {
                    let esp = rateOnThreads(n, seconds: seconds) { ESPWorkload(size: size, backend: backend).encap }
                    best[n] = max(best[n] ?? 0, esp)
                    let raw = rateOnThreads(n, seconds: seconds) { RawGCM(size: size, backend: name).seal }
                    bestRaw[n] = max(bestRaw[n] ?? 0, raw)
                }
            }
            for n in counts {
                rows.append(ScaleRow(backend: name, size: size, threads: n, pps: best[n]!, scaling: best[n]! / best[1]!,
                                     rawPPS: bestRaw[n]!, rawScaling: bestRaw[n]! / bestRaw[1]!))
            }
        }
    }
    print("")
    print("ESP encapsulation on N threads, one SA per thread, and raw AES-128-GCM seal on as many, interleaved; wall "
          + "clock (\(ProcessInfo.processInfo.activeProcessorCount) cores); best of \(rounds) rounds of \(seconds) s")
    print("backend   size  threads    Mpps    Gbps  scaling_vs_1  raw Mpps  raw_scaling")
    for r in rows {
        print(String(format: "%-8@  %4d  %7d  %6.3f  %6.2f  %12.2f  %8.3f  %11.2f", r.backend as NSString, r.size,
                     r.threads, r.pps / 1e6, r.pps * Double(r.size) * 8 / 1e9, r.scaling, r.rawPPS / 1e6, r.rawScaling))
    }
    for r in rows {
        print(String(format: "{\"backend\": \"%@\", \"threads\": %d, \"size\": %d, \"op\": \"encap\", \"pps\": %.0f, \"gbps\": %.3f, \"scaling\": %.3f, \"raw_pps\": %.0f, \"raw_scaling\": %.3f}",
                     r.backend as NSString, r.threads, r.size, r.pps, r.pps * Double(r.size) * 8 / 1e9, r.scaling,
                     r.rawPPS, r.rawScaling))
    }
}

/// `n` threads at once, each running its own work (made here, one per thread, before any starts) in steps of 256
/// packets: wall-clock packets per second summed over the threads (each thread counts its own packets within the same
/// wall-clock window).
func rateOnThreads(_ n: Int, seconds: Double, make: () -> (Int) -> Void) -> Double {
    let works = (0..<n).map { _ in make() }
    let go = Atomic<Bool>(false)  // every thread warms up, then all start together
    final class Box: @unchecked Sendable { var packets = [Int](); var elapsed = [Double]() }
    let box = Box()
    box.packets = Array(repeating: 0, count: n)
    box.elapsed = Array(repeating: 0, count: n)
    var threads: [Thread] = []
    let done = DispatchGroup()
    for i in 0..<n {
        done.enter()
        nonisolated(unsafe) let work = works[i]  // used by this one thread only
        let t = Thread {
            work(256)  // warm-up
            while !go.load(ordering: .acquiring) { sched_yield() }
            let t0 = monotonicSeconds()
            var packets = 0
            var t = t0
            repeat {
                work(256)
                packets += 256
                t = monotonicSeconds()
            } while t - t0 < seconds
            box.packets[i] = packets
            box.elapsed[i] = t - t0
            done.leave()
        }
        threads.append(t)
        t.start()
    }
    go.store(true, ordering: .releasing)
    done.wait()
    return (0..<n).reduce(0.0) { $0 + Double(box.packets[$1]) / box.elapsed[$1] }
}
