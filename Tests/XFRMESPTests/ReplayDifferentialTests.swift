import Testing
import XFRMESP
import XFRMTestKit

/// The differential replay fuzzer (Fuzz/Sources/fuzz-replay) as a bounded, seeded test: random byte strings drive
/// `ReplayWindow` and the RFC 4303 reference model (`ReplayReference`) through the same steps — window sizes 0–4096,
/// ESN on and off, tops near 2^32 and 2^64 boundaries — and every verdict, top and received bit must agree.
@Suite("Replay window against the RFC 4303 reference model")
struct ReplayDifferentialTests {
    @Test("agrees with the reference on 1,000 random step sequences (fixed seed)")
    func agreesOnRandomSequences() {
        var rng = XorShift(state: 0x5eed_0010_c0ff_ee00)
        for run in 0..<1_000 {
            let count = 3 + Int(rng.next() % 600)
            let bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let disagreement = bytes.withUnsafeBytes { ReplayDifferential.run($0) }
            #expect(disagreement == nil, "run \(run), input \(bytes.map { String($0, radix: 16) })")
            if disagreement != nil { return }
        }
    }

    @Test("covers both ESN settings, edge and large windows and the 2^32 boundary")
    func drivesTheInterestingCases() {
        // ESN, window 4096 (an edge size), top just below 2^32 (b2: ESN + top mode 1), then 200 numbers ahead.
        var bytes: [UInt8] = [0x80, 13, 0b011, 0, 0]
        for _ in 0..<200 { bytes += [0, 0, 40] }
        #expect(bytes.withUnsafeBytes { ReplayDifferential.run($0) } == nil)
        // The reference itself crosses the boundary as Appendix A2.2 says.
        var m = ReplayReference(size: 64, esn: true, top: (1 << 32) - 10)
        #expect(m.check(5) == .accept((1 << 32) + 5))
        m.advance((1 << 32) + 5)
        #expect(m.check(UInt32.max - 20) == .accept((1 << 32) - 21))
        // Below the window's bottom in the lower subspace: Th, i.e. far ahead in the upper one.
        #expect(m.check(UInt32.max - 100) == .accept((1 << 33) - 101))
    }
}
