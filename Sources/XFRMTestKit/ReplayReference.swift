import XFRMESP

/// A straightforward anti-replay receiver, written from RFC 4303 §3.4.3 and Appendix A with no bitmaps: the set of
/// sequence numbers received inside the window and the highest one. The differential replay fuzzer and its unit test
/// hold `ReplayWindow` against it (`ReplayDifferential`).
///
/// Rules, in the order applied to a received low half `low`:
/// 1. ESN (Appendix A2.2): with Tl, Th the halves of the highest number T and W the window (at least 1: a receiver
///    without a window still tracks T), the window's bottom is Tl − W + 1 (mod 2^32). When Tl ≥ W − 1 the window
///    lies in one 2^32 subspace: `low` below the bottom belongs to the next one (Th + 1). Otherwise it spans two:
///    `low` at or above the bottom belongs to the previous one (Th − 1). A subspace beyond 2^64 or below 0 does not
///    exist: too old. Without ESN the number is `low`.
/// 2. W = 0: no replay check (§3.4.3: the receiver may disable it).
/// 3. Number 0 is never sent (§2.2, §3.3.3): rejected.
/// 4. Above T: new (the window will slide). At or below T − W: too old. Received before: duplicate. Else new.
/// `advance` (after the ICV verified, Appendix A) records the number and makes it T if higher.
public struct ReplayReference {
    public let size: Int
    public let esn: Bool
    public private(set) var top: UInt64
    /// The numbers received in (top − size, top]; older ones are forgotten as the window slides.
    public private(set) var seen: Set<UInt64> = []

    public init(size: Int, esn: Bool, top: UInt64) {
        self.size = size
        self.esn = esn
        self.top = esn ? top : top & 0xffff_ffff
    }

    /// The full number `low` stands for, or nil when there is none (too old).
    public func infer(_ low: UInt32) -> UInt64? {
        guard self.esn else { return UInt64(low) }
        let w = UInt64(max(self.size, 1))
        let tl = self.top & 0xffff_ffff
        let th = self.top >> 32
        let l = UInt64(low)
        if tl + 1 >= w {  // case A: bottom = tl − w + 1 ≥ 0
            if l < tl + 1 - w {
                return th == 0xffff_ffff ? nil : (th + 1) << 32 | l
            }
            return th << 32 | l
        }
        // case B: bottom = tl − w + 1 + 2^32 (it wrapped)
        if l >= tl + (1 << 32) + 1 - w {
            return th == 0 ? nil : (th - 1) << 32 | l
        }
        return th << 32 | l
    }

    /// The verdict for a received low half, as `ReplayWindow.check` gives it.
    public func check(_ low: UInt32) -> ReplayWindow.Check {
        guard let seq = self.infer(low) else { return .reject(.replayTooOld) }
        if self.size == 0 { return .accept(seq) }
        if seq == 0 { return .reject(.sequenceZero) }
        if seq > self.top { return .accept(seq) }
        if self.top - seq >= UInt64(self.size) { return .reject(.replayTooOld) }
        if self.seen.contains(seq) { return .reject(.replayDuplicate) }
        return .accept(seq)
    }

    /// Records an authenticated number.
    public mutating func advance(_ seq: UInt64) {
        if seq > self.top { self.top = seq }
        guard self.size > 0 else { return }
        self.seen.insert(seq)
        if self.seen.count > 2 * self.size {
            let top = self.top, size = UInt64(self.size)
            self.seen = self.seen.filter { top - $0 < size }
        }
    }

    /// Forgets every number and sets the highest (a key manager restoring replay state).
    public mutating func reset(top: UInt64) {
        self.top = self.esn ? top : top & 0xffff_ffff
        self.seen = []
    }

    /// Whether the number `distance` below the top was received (false beyond the window or below 1).
    public func received(distance: Int) -> Bool {
        guard UInt64(distance) <= self.top, distance < self.size else { return false }
        return self.seen.contains(self.top - UInt64(distance))
    }
}
