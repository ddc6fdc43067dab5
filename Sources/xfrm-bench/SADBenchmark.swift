// `xfrm-bench sad`: the slow path of a flow's first packet in the SAD — output SA resolution (≈ xfrm_state_find)
// for one template among N SAs — in ns per resolution, one thread (thread CPU time, best of the rounds).
//
// Each row: a fresh stack with N AES-128-GCM-16 tunnel SAs added with `addState`, two per peer (198.18.0.0/15,
// reqids 1 and 2, source 192.0.2.1), so a template names exactly one of them. Queries cycle through 1,024 random
// SAs; every answer is checked once against the SA expected. The call is `StateDatabase.resolve(_:flow:source:
// destination:policyMark:)`, whose signature predates the output index, so the same file measures the code before
// it (a full scan) and after it (the bydst-style index).

import Foundation
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket

func sadBenchmark(seconds: Double, rounds: Int, sizes: [Int]) {
    let crypto = try! ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: [UInt8](repeating: 7, count: 20), icvBits: 128)
    let source = IPAddress("192.0.2.1")!
    func peer(_ i: Int) -> IPAddress { .v4(0xc612_0000 &+ UInt32(i / 2)) }  // 198.18.0.0 + i/2
    var rows: [(sas: Int, ns: Double)] = []
    for n in sizes {
        let stack = XFRMStack()
        for i in 0..<n {
            let sa = try! stack.makeSA(SAConfig(
                id: SAID(destination: peer(i), spi: 0x1000 &+ UInt32(i)), source: source, selector: .any(family: 4),
                reqid: UInt32(i % 2 + 1), mode: .tunnel, crypto: crypto))
            try! stack.addState(sa)
        }
        var rng = SystemRandomNumberGenerator()
        let picks = (0..<1024).map { _ in Int.random(in: 0..<n, using: &rng) }
        let templates = picks.map { Template(source: source, destination: peer($0), mode: 1, reqid: UInt32($0 % 2 + 1)) }
        let flow = Flow(source: IPAddress("10.0.1.1")!, destination: IPAddress("10.0.2.1")!, proto: 17)
        for (k, t) in templates.enumerated() {
            guard case .found(let sa) = stack.states.resolve(t, flow: flow, source: source, destination: t.destination!,
                                                             policyMark: 0),
                sa.id.spi == 0x1000 &+ UInt32(picks[k])
            else { fatalError("xfrm-bench sad: resolution picked the wrong SA") }
        }
        var best = Double.infinity
        for _ in 0..<rounds {
            var k = 0
            let (pps, _) = measure(seconds: seconds, batch: 64) { batch in
                for _ in 0..<batch {
                    let t = templates[k & 1023]
                    k &+= 1
                    if case .none = stack.states.resolve(t, flow: flow, source: source, destination: t.destination!,
                                                         policyMark: 0) { fatalError("no SA") }
                }
            }
            best = min(best, 1e9 / pps)
        }
        rows.append((n, best))
        stack.flushStates(proto: 0)
    }
    print("| SAs | resolve ns |")
    print("|---:|---:|")
    for r in rows { print("| \(r.sas) | \(String(format: "%.0f", r.ns)) |") }
    for r in rows { print("{\"bench\":\"sad\",\"sas\":\(r.sas),\"resolve_ns\":\(String(format: "%.1f", r.ns))}") }
}
