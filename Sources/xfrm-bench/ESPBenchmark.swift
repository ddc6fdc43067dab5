// `xfrm-bench esp`: one core, ESP encapsulation and decapsulation of IPv4 tunnel-mode packets with AES-128-GCM-16 at inner
// sizes 64, 512 and 1420 bytes, against raw OpenSSL AES-128-GCM seal/open of the same sizes through one reused
// EVP context. Time is the thread's CPU time; each figure is the best of N interleaved rounds.

import CMallocCounter
import CXFRMCrypto
import Foundation
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Runs `body(batch)` repeatedly for about `seconds` of CPU time; returns (packets per second, allocs per packet).
func measure(seconds: Double, batch: Int = 256, _ body: (Int) -> Void) -> (pps: Double, allocs: Double) {
    body(batch)  // warm-up
    var packets = 0
    let a0 = xfrm_malloc_count()
    let t0 = threadCPUSeconds()
    var t = t0
    repeat {
        body(batch)
        packets += batch
        t = threadCPUSeconds()
    } while t - t0 < seconds
    let allocs = Double(xfrm_malloc_count() - a0) / Double(packets)
    return (Double(packets) / (t - t0), allocs)
}

struct Row {
    let size: Int
    let op: String
    let pps: Double
    let allocs: Double
    let rawPPS: Double
    var gbps: Double { self.pps * Double(self.size) * 8 / 1e9 }
    var ratio: Double { self.pps / self.rawPPS }
}

func espBenchmark(seconds: Double, rounds: Int) {
    let key = PacketFactory.pattern(16, seed: 0x40)
    let salt: [UInt8] = [1, 2, 3, 4]
    let spec = try! ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: key + salt, icvBits: 128)
    let pool = PacketPool(count: 4, slotSize: 2048, headroom: 128)
    var rows: [Row] = []
    for size in [64, 512, 1420] {
        let config = ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: spec, tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), replayWindow: 128)
        let tx = try! ESPTransform(config)
        let rx = try! ESPTransform(config)
        let inner = PacketFactory.ipv4(
            proto: 17, payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28)))
        precondition(inner.count == size)

        // Encap: the buffer is restored to the inner packet's place and header each time (the payload bytes left
        // from the previous round are just payload), so no copy of the packet is timed.
        var txBuf = pool.allocate()!
        txBuf.append(contentsOf: inner)
        let headroom = txBuf.headroom
        let encap = { (n: Int) in
            for _ in 0..<n {
                txBuf.reset(headroom: headroom)
                let p = txBuf.append(size)
                inner.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: 28) }
                if tx.encapsulate(&txBuf) != nil { fatalError("encap failed") }
            }
        }

        // Decap: a ring of 256 distinct ESP packets (consecutive sequence numbers) is copied into the receive buffer
        // per packet, as a NIC would DMA it; the window restarts once per pass over the ring.
        let ringCount = 256
        var ring: [[UInt8]] = []
        for _ in 0..<ringCount {
            var b = pool.allocate()!
            b.append(contentsOf: inner)
            precondition(tx.encapsulate(&b) == nil)
            ring.append(b.bytes)
            pool.release(b)
        }
        let wireSize = ring[0].count
        let ringMemory = UnsafeMutableRawPointer.allocate(byteCount: ringCount * wireSize, alignment: 64)
        for (i, r) in ring.enumerated() {
            r.withUnsafeBytes { (ringMemory + i * wireSize).copyMemory(from: $0.baseAddress!, byteCount: wireSize) }
        }
        var rxBuf = pool.allocate()!
        let firstSeq = tx.outboundSequence - UInt64(ringCount)
        var slot = 0
        let decap = { (n: Int) in
            for _ in 0..<n {
                if slot == ringCount {
                    slot = 0
                    rx.setInboundSequence(firstSeq)
                }
                rxBuf.reset(headroom: headroom)
                rxBuf.append(wireSize).copyMemory(from: ringMemory + slot * wireSize, byteCount: wireSize)
                slot += 1
                guard case .esp(let info) = ESPClassification.classify(&rxBuf),
                    rx.decapsulate(&rxBuf, info: info) == nil
                else { fatalError("decap failed") }
            }
        }
        rx.setInboundSequence(firstSeq)

        // The reference: raw EVP AES-128-GCM on `size` bytes with an 8-byte AAD, one reused context.
        let evpSeal = key.withUnsafeBytes { xfrm_bench_gcm_new($0.baseAddress, 1) }!
        let evpOpen = key.withUnsafeBytes { xfrm_bench_gcm_new($0.baseAddress, 0) }!
        let data = UnsafeMutableRawPointer.allocate(byteCount: size + 64, alignment: 64)
        data.initializeMemory(as: UInt8.self, repeating: 0x5a, count: size + 64)
        let nonce = UnsafeMutableRawPointer.allocate(byteCount: 12, alignment: 16)
        nonce.initializeMemory(as: UInt8.self, repeating: 0, count: 12)
        let aad = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 16)
        aad.initializeMemory(as: UInt8.self, repeating: 1, count: 8)
        let tag = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
        var counter: UInt64 = 0
        let rawSeal = { (n: Int) in
            for _ in 0..<n {
                counter &+= 1
                nonce.storeBE64(counter, at: 4)
                _ = xfrm_bench_gcm_seal(evpSeal, nonce, aad, 8, data, Int32(size), tag)
            }
        }
        // Open decrypts in place, so each open runs on a fresh copy of one valid sealed record (the same copy the
        // decap loop makes from its ring), and the tag must verify every time.
        let sealed = UnsafeMutableRawPointer.allocate(byteCount: size + 64, alignment: 64)
        nonce.storeBE64(1, at: 4)
        sealed.copyMemory(from: data, byteCount: size)
        let sealedTag = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
        let sealedNonce = UnsafeMutableRawPointer.allocate(byteCount: 12, alignment: 16)
        sealedNonce.copyMemory(from: nonce, byteCount: 12)
        _ = xfrm_bench_gcm_seal(evpSeal, sealedNonce, aad, 8, sealed, Int32(size), sealedTag)
        let rawOpen = { (n: Int) in
            for _ in 0..<n {
                data.copyMemory(from: sealed, byteCount: size)
                if xfrm_bench_gcm_open(evpOpen, sealedNonce, aad, 8, data, Int32(size), sealedTag) != 1 { fatalError("open") }
            }
        }

        var best: [String: (pps: Double, allocs: Double)] = [:]
        for _ in 0..<rounds {
            for name in ["raw-seal", "encap", "raw-open", "decap"] {
                let m: (pps: Double, allocs: Double)
                switch name {
                case "raw-seal": m = measure(seconds: seconds, rawSeal)
                case "encap": m = measure(seconds: seconds, encap)
                case "raw-open": m = measure(seconds: seconds, rawOpen)
                default: m = measure(seconds: seconds, decap)
                }
                if m.pps > best[name]?.pps ?? 0 { best[name] = m }
            }
        }
        rows.append(Row(size: size, op: "encap", pps: best["encap"]!.pps, allocs: best["encap"]!.allocs,
                        rawPPS: best["raw-seal"]!.pps))
        rows.append(Row(size: size, op: "decap", pps: best["decap"]!.pps, allocs: best["decap"]!.allocs,
                        rawPPS: best["raw-open"]!.pps))
        xfrm_bench_gcm_free(evpSeal)
        xfrm_bench_gcm_free(evpOpen)
        pool.release(txBuf)
        pool.release(rxBuf)
    }

    print("ESP tunnel mode, IPv4, rfc4106(gcm(aes)) 128-bit key, 16-byte ICV; one core; thread CPU time; "
          + "best of \(rounds) rounds of \(seconds) s")
    print("size  op     Mpps    Gbps   raw Mpps  ratio_to_raw  allocs/pkt")
    for r in rows {
        print(String(format: "%4d  %-5@  %6.3f  %6.2f  %8.3f  %12.2f  %10.3f", r.size, r.op as NSString,
                     r.pps / 1e6, r.gbps, r.rawPPS / 1e6, r.ratio, r.allocs))
    }
    for r in rows {
        print(String(format: "{\"size\": %d, \"op\": \"%@\", \"pps\": %.0f, \"gbps\": %.3f, \"allocs_per_packet\": %.3f, \"ratio_to_raw\": %.3f}",
                     r.size, r.op as NSString, r.pps, r.gbps, r.allocs, r.ratio))
    }
}

