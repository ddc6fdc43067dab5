// `xfrm-bench scale`: what SAs and policies cost in resident memory, and how fast they are added and deleted, from
// 1,000 to 100,000 SAs and 1,000,000 policies (issue 9's targets: ≤ 2 KiB per SA at 100,000 SAs, ≤ 1 KiB per policy
// at 1,000,000 policies).
//
// Each row uses a fresh XFRMStack in this process and goes through the stack's own API, as the control server does:
// SAs are realistic AES-128-GCM-16 tunnel-mode SAs (rfc4106(gcm(aes)), 20-byte key with salt, replay window 32,
// distinct SPIs and peers, with the algorithm name and key copy the control server keeps for listings) built with
// `makeSA` (keys checked, the stack's crypto backend keyed: ipsec-mb where it runs) and added with `addState`;
// policies are tunnel policies with one ESP template (subnet-to-subnet selectors, out/in/fwd mixed, a few with ports)
// added with `addPolicy`. Memory is the growth of the process's resident set (/proc/self/statm) over the adds,
// divided by the count; between rows everything is deleted and malloc_trim returns freed memory to the system, so a
// row does not reuse the previous row's pages (the heap figure, mallinfo2's bytes in use, is printed beside it as a
// cross-check that does not depend on page reuse). Rates are wall-clock adds/deletes per second, one thread.

import CMallocCounter
import Foundation
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket

/// Resident bytes of this process (statm's second field × page size).
private func residentBytes() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let fields = text.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// Bytes malloc has handed out and not had back (small-chunk heap plus mmapped chunks).
private func heapBytes() -> Int { Int(xfrm_heap_in_use()) }

private func seconds(since t0: ContinuousClock.Instant) -> Double {
    let d = ContinuousClock.now - t0
    return Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
}

private struct ScaleRow {
    var sas = 0
    var bytesPerSA = 0.0
    var heapPerSA = 0.0
    /// Of the heap per SA: the cipher of the stack's backend (its pre-keyed context and the wrapper).
    var cipherHeapPerSA = 0.0
    var saAddsPerSecond = 0.0
    var saDeletesPerSecond = 0.0
    var policies = 0
    var bytesPerPolicy = 0.0
    var heapPerPolicy = 0.0
    var policyAddsPerSecond = 0.0
    var policyDeletesPerSecond = 0.0
}

/// The i-th SA: AES-128-GCM-16, tunnel 192.0.2.1 → a peer in 198.18.0.0/15 (one per 256 SAs), SPI 0x1000 + i.
private func scaleSA(_ i: Int, on stack: XFRMStack) throws -> SecurityAssociation {
    var key = [UInt8](repeating: 0, count: 20)
    var x = UInt64(i) &* 0x9e37_79b9_7f4a_7c15 | 1
    for k in 0..<20 {
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        key[k] = UInt8(truncatingIfNeeded: x)
    }
    let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: key, icvBits: 128)
    let peer = IPAddress.v4(0xc612_0000 | UInt32(i >> 8))
    let config = SAConfig(
        id: SAID(destination: peer, spi: 0x1000 &+ UInt32(truncatingIfNeeded: i)), source: IPAddress("192.0.2.1")!,
        selector: .any(family: 0), reqid: UInt32(truncatingIfNeeded: i) &+ 1, mode: .tunnel, replayWindow: 32,
        crypto: crypto)
    return try stack.makeSA(config)
}

/// The i-th policy: 10.a.b.0/24 ↔ 172.16.0.0/12 subnets (distinct per i), direction i % 3, 1 in 8 with a TCP port,
/// one ESP tunnel template to a peer.
private func scalePolicy(_ i: Int) -> Policy {
    let n = UInt32(truncatingIfNeeded: i)
    let direction = PolicyDirection.allCases[i % 3]
    let local = IPPrefix(.v4(0x0a00_0000 | ((n / 3) & 0x00ff_ffff) << 8 & 0x00ff_ff00), length: 24)
    let remote = IPPrefix(.v4(0xac10_0000 | ((n / 3) >> 16) << 8), length: 24)
    var sel = direction == .outbound
        ? Selector(family: 4, source: local, destination: remote)
        : Selector(family: 4, source: remote, destination: local)
    if i % 8 == 0 {
        sel.proto = 6
        sel.destinationPort = 443
        sel.destinationPortMask = 0xffff
    }
    let peer = IPAddress.v4(0xc612_0000 | (n >> 8) & 0xffff)
    let me = IPAddress.v4(0xc000_0201)
    let t = direction == .outbound
        ? Template(source: me, destination: peer, mode: 1, reqid: n &+ 1)
        : Template(source: peer, destination: me, mode: 1, reqid: n &+ 1)
    return Policy(selector: sel, direction: direction, priority: 1000 + n % 7, templates: [t])
}

func scaleBenchmark(saCounts: [Int] = [1_000, 10_000, 100_000, 100_000],
                    policyCounts: [Int] = [1_000, 10_000, 100_000, 1_000_000]) {
    var rows: [ScaleRow] = []
    for (sas, policies) in zip(saCounts, policyCounts) {
        var row = ScaleRow(sas: sas, policies: policies)
        let stack = XFRMStack(clock: ManualClock())
        // Inputs are made inside the timed loops (a key, a config, a Policy value: what a netlink message yields).
        xfrm_heap_trim()
        var r0 = residentBytes()
        var h0 = heapBytes()
        var t0 = ContinuousClock.now
        var ids: [SAID] = []
        ids.reserveCapacity(sas)
        for i in 0..<sas {
            let sa = try! scaleSA(i, on: stack)
            try! stack.addState(sa)
            ids.append(sa.id)
        }
        row.saAddsPerSecond = Double(sas) / seconds(since: t0)
        let idsBytes = sas * MemoryLayout<SAID>.stride  // the benchmark's own list
        row.bytesPerSA = Double(residentBytes() - r0 - idsBytes) / Double(sas)
        row.heapPerSA = Double(heapBytes() - h0 - idsBytes) / Double(sas)
        do {
            // The share of the cipher alone: as many ciphers of the stack's backend as SAs, nothing else.
            let n = min(sas, 10_000)
            let h = heapBytes()
            var ciphers: [any ESPCipher] = []
            ciphers.reserveCapacity(n)
            let arrayBytes = heapBytes() - h
            for i in 0..<n {
                let spec = try! ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: [UInt8](repeating: UInt8(i & 0xff), count: 20),
                                                   icvBits: 128)
                ciphers.append(try! stack.backend.makeCipher(spec))
            }
            row.cipherHeapPerSA = Double(heapBytes() - h - arrayBytes) / Double(n)
        }

        r0 = residentBytes()
        h0 = heapBytes()
        var keys: [Policy.Key] = []
        keys.reserveCapacity(policies)
        t0 = ContinuousClock.now
        for i in 0..<policies { keys.append(try! stack.addPolicy(scalePolicy(i), update: false).key) }
        row.policyAddsPerSecond = Double(policies) / seconds(since: t0)
        let keysBytes = policies * MemoryLayout<Policy.Key>.stride  // the benchmark's own list, not the SPD's
        row.bytesPerPolicy = Double(residentBytes() - r0 - keysBytes) / Double(policies)
        row.heapPerPolicy = Double(heapBytes() - h0 - keysBytes) / Double(policies)
        precondition(stack.policies.totalCount == policies && stack.states.count == sas)

        t0 = ContinuousClock.now
        for k in keys { try! stack.deletePolicy(key: k) }
        row.policyDeletesPerSecond = Double(policies) / seconds(since: t0)
        t0 = ContinuousClock.now
        for id in ids { _ = try! stack.deleteState(id, mark: Mark()) }
        row.saDeletesPerSecond = Double(sas) / seconds(since: t0)
        precondition(stack.policies.totalCount == 0 && stack.states.count == 0)
        rows.append(row)
    }

    print("Scale: resident memory (RSS growth over the adds, per object; heap = malloc bytes in use) and add/delete "
          + "rates; AES-128-GCM-16 tunnel SAs, tunnel policies with one template; one thread, wall clock")
    print("     SAs  bytes/SA  heap/SA  (cipher)  SA adds/s  SA dels/s   policies  bytes/policy  heap/policy  pol adds/s  pol dels/s")
    for r in rows {
        print(String(format: "%8d  %8.0f  %7.0f  %8.0f  %9.0f  %9.0f  %9d  %12.0f  %11.0f  %10.0f  %10.0f", r.sas,
                     r.bytesPerSA, r.heapPerSA, r.cipherHeapPerSA, r.saAddsPerSecond, r.saDeletesPerSecond, r.policies, r.bytesPerPolicy,
                     r.heapPerPolicy, r.policyAddsPerSecond, r.policyDeletesPerSecond))
    }
    for r in rows {
        print(String(format: "{\"sas\": %d, \"bytes_per_sa\": %.0f, \"heap_bytes_per_sa\": %.0f, \"cipher_bytes_per_sa\": %.0f, \"sa_adds_per_s\": %.0f, "
                     + "\"sa_deletes_per_s\": %.0f, \"policies\": %d, \"bytes_per_policy\": %.0f, "
                     + "\"heap_bytes_per_policy\": %.0f, \"policy_adds_per_s\": %.0f, \"policy_deletes_per_s\": %.0f}",
                     r.sas, r.bytesPerSA, r.heapPerSA, r.cipherHeapPerSA, r.saAddsPerSecond, r.saDeletesPerSecond, r.policies,
                     r.bytesPerPolicy, r.heapPerPolicy, r.policyAddsPerSecond, r.policyDeletesPerSecond))
    }
}

