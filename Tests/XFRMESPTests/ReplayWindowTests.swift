import Testing
import XFRMESP
import XFRMTestKit

/// A small deterministic generator (xorshift), so failures reproduce.
struct XorShift: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        self.state ^= self.state << 13
        self.state ^= self.state >> 7
        self.state ^= self.state << 17
        return self.state
    }
}

@Suite("Anti-replay window")
struct ReplayWindowTests {
    @Test("a copy of a large window is independent (copy-on-write ring)", arguments: [64, 1024])
    func copiesAreValues(size: Int) {
        var a = ReplayWindow(size: size, esn: false)
        a.advance(5)
        var b = a
        b.advance(7)
        b.advance(3)
        #expect(a.check(7) == .accept(7))
        #expect(a.check(3) == .accept(3))
        #expect(a.check(5) == .reject(.replayDuplicate))
        #expect(b.check(7) == .reject(.replayDuplicate))
        #expect(b.check(3) == .reject(.replayDuplicate))
    }

    @Test("agrees with the reference model on random sequences", arguments: [1, 2, 32, 64, 100, 128, 129, 1000, 4096])
    func matchesModel(size: Int) {
        for esn in [false, true] {
            var rng = XorShift(state: 0x9e37_79b9_7f4a_7c15 &+ UInt64(size) &* 31 &+ (esn ? 7 : 0))
            let start: UInt64 = esn ? (1 << 32) - UInt64(size) - 50 : 0  // ESN runs cross the 2^32 boundary
            var window = ReplayWindow(size: size, esn: esn, top: start)
            var model = ReplayReference(size: size, esn: esn, top: start)
            for _ in 0..<20_000 {
                // Mostly near the top (reordering, duplicates), sometimes far ahead or far behind.
                let r = rng.next() % 100
                let span = UInt64(size) * 2 + 8
                var seq: UInt64
                if r < 70 {
                    seq = model.top &+ 4 &- rng.next() % span
                } else if r < 90 {
                    seq = model.top &+ 1 &+ rng.next() % 16
                } else {
                    seq = model.top &+ rng.next() % 5000
                }
                if seq > model.top + (1 << 31) { seq = model.top }  // an underflowed draw: reuse the top
                if !esn { seq &= 0xffff_ffff }
                let low = UInt32(truncatingIfNeeded: seq)
                let expected = model.check(low)
                let got = window.check(low)
                #expect(got == expected, "size \(size) esn \(esn) seq \(seq) top \(model.top)")
                if got != expected { return }
                // The ICV verifies only when the inferred number is the one the sender used.
                if case .accept(let s) = got, s == seq {
                    window.advance(s)
                    model.advance(s)
                }
            }
            #expect(window.top == model.top)
        }
    }

    @Test("rejects sequence number zero without ESN")
    func rejectsZero() {
        let w = ReplayWindow(size: 32, esn: false)
        #expect(w.check(0) == .reject(.sequenceZero))
    }

    @Test("window zero disables checks but still tracks the top for ESN")
    func windowZero() {
        var w = ReplayWindow(size: 0, esn: false)
        #expect(w.check(5) == .accept(5))
        w.advance(5)
        #expect(w.check(5) == .accept(5))
        #expect(w.check(0) == .accept(0))
    }

    @Test("counts duplicates and too-old packets as different reasons")
    func separatesReasons() {
        var w = ReplayWindow(size: 32, esn: false)
        for s: UInt64 in [1, 2, 3, 100] { w.advance(s) }
        #expect(w.check(100) == .reject(.replayDuplicate))
        #expect(w.check(68) == .reject(.replayTooOld))
        #expect(w.check(69) == .accept(69))
        #expect(w.check(101) == .accept(101))
    }

    @Test("ESN infers the next subspace after the 2^32 boundary and the previous one before it")
    func esnWrap() {
        var w = ReplayWindow(size: 64, esn: true, top: 0xffff_fff0)
        // Case A: window within one subspace; a small low half means the next subspace.
        #expect(w.check(0x0000_0005) == .accept(0x1_0000_0005))
        w.advance(0x1_0000_0005)
        // Case B: the window now spans both subspaces; a large low half means the previous one.
        #expect(w.check(0xffff_fff8) == .accept(0xffff_fff8))
        #expect(w.check(0xffff_fff0) == .accept(0xffff_fff0))
        w.advance(0xffff_fff0)
        #expect(w.check(0xffff_fff0) == .reject(.replayDuplicate))
        #expect(w.check(0x0000_0006) == .accept(0x1_0000_0006))
        // Low half 0 in the new subspace is a valid number (2^32), not "sequence zero".
        #expect(w.check(0) == .accept(0x1_0000_0000))
    }

    @Test("ESN: a number that would fall before 0 is too old")
    func esnBeforeZero() {
        let w = ReplayWindow(size: 64, esn: true, top: 10)
        #expect(w.check(0xffff_fff0) == .reject(.replayTooOld))
    }

    @Test("a jump of more than 4096 clears the whole ring")
    func bigJump() {
        var w = ReplayWindow(size: 4096, esn: false)
        for s: UInt64 in 1...100 { w.advance(s) }
        w.advance(100_000)
        #expect(w.check(99_990) == .accept(99_990))
        #expect(w.check(100_000 - 4095) == .accept(100_000 - 4095))
        #expect(w.check(100_000 - 4096) == .reject(.replayTooOld))
    }
}

@Suite("Anti-replay window reset")
struct ReplayWindowResetTests {
    @Test("reset empties the window in place and leaves copies taken before it alone", arguments: [32, 4096])
    func resetInPlace(size: Int) {
        var w = ReplayWindow(size: size, esn: false, top: 0)
        for s in UInt64(1)...10 { w.advance(s) }
        let before = w
        w.reset(top: 100)
        #expect(w.top == 100 && w.size == size)
        let fresh = ReplayWindow(size: size, esn: false, top: 100)
        for s: UInt32 in [1, 99, 100, 101] { #expect(w.check(s) == fresh.check(s), "as a new window at 100: \(s)") }
        #expect(w.check(99) == .accept(99), "the reset window holds nothing below its top")
        #expect(before.check(10) == .reject(.replayDuplicate), "a copy taken before the reset keeps its bits")
        #expect(before.top == 10)
    }
}
