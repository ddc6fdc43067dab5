import XFRMESP

/// Drives `ReplayWindow` and `ReplayReference` with the same received sequence numbers and reports the first
/// disagreement (the differential replay fuzzer, Fuzz/Sources/fuzz-replay, and `ReplayDifferentialTests`).
///
/// The bytes choose everything: the window size (0–4096, with the edges 0, 1, 31–33, 63–65, 127–129, 4095, 4096
/// likely), ESN on or off, the starting top (0, just below a 2^32 boundary, anything, near 2^64), then steps of
/// three bytes — a number near the top, near the bottom edge, far ahead, anywhere, one received before, or a reset —
/// and whether its ICV verifies (only then does the window advance). After every step the verdicts and tops must be
/// equal; every 256 steps and at the end the received bits must be, and the kernel bitmap layouts (ring and legacy)
/// must restore the same window.
public enum ReplayDifferential {
    static let edgeSizes = [0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 4095, 4096]

    /// Runs the steps `bytes` describe; nil when both agreed throughout, else what differed.
    public static func run(_ bytes: UnsafeRawBufferPointer) -> String? {
        var r = ByteReader(bytes)
        let b0 = r.byte(), b1 = r.byte(), flags = r.byte()
        let size = b0 & 0x80 != 0
            ? edgeSizes[Int(b1) % edgeSizes.count] : (Int(b0) << 8 | Int(b1)) % (ReplayWindow.maximumSize + 1)
        let esn = flags & 1 != 0
        let top: UInt64
        switch (flags >> 1) & 3 {
        case 0: top = 0
        case 1: top = UInt64(r.byte() & 3) << 32 | UInt64(UInt32.max - UInt32(r.byte()))
        case 2: top = r.u64()
        default: top = UInt64.max - UInt64(r.u16())
        }
        var window = ReplayWindow(size: size, esn: esn, top: top)
        var model = ReplayReference(size: size, esn: esn, top: top)
        var accepted: [UInt32] = []
        var step = 0
        func state() -> String { "size \(size) esn \(esn) top \(window.top) step \(step)" }
        while !r.isEmpty {
            step += 1
            let op = r.byte()
            let v = r.u16()
            let tl = UInt32(truncatingIfNeeded: window.top)
            let low: UInt32
            switch op & 7 {
            case 0, 1, 2: low = tl &+ UInt32(bitPattern: Int32(Int16(bitPattern: v)))
            case 3: low = tl &- UInt32(size) &+ UInt32(bitPattern: Int32(Int8(truncatingIfNeeded: v)))
            case 4: low = UInt32(v) | UInt32(r.u16()) << 16
            case 5: low = tl &+ UInt32(v) << 8
            case 6:
                let newTop = window.top &+ UInt64(v)
                window.reset(top: newTop)
                model.reset(top: newTop)
                accepted.removeAll()
                if window.top != model.top { return "\(state()): reset to \(newTop): top \(window.top) vs \(model.top)" }
                continue
            default: low = accepted.isEmpty ? UInt32(v) : accepted[Int(v) % accepted.count]
            }
            let got = window.check(low)
            let want = model.check(low)
            guard got == want else { return "\(state()): check(\(low)) = \(got), reference \(want)" }
            if case .accept(let seq) = got, op & 8 == 0 {
                window.advance(seq)
                model.advance(seq)
                accepted.append(low)
                if accepted.count > 64 { accepted.removeFirst() }
            }
            guard window.top == model.top else { return "\(state()): top \(window.top), reference \(model.top)" }
            if step % 256 == 0, let d = Self.compareBits(window, model) { return "\(state()): \(d)" }
        }
        return Self.compareBits(window, model).map { "\(state()): \($0)" } ?? Self.compareLayouts(window)
    }

    /// The received bits, newest first, against the reference's set.
    static func compareBits(_ w: ReplayWindow, _ m: ReplayReference) -> String? {
        let bits = w.receivedBits
        for i in 0..<w.size where bits[i] != m.received(distance: i) {
            return "received bit \(i) below the top is \(bits[i]), reference \(!bits[i])"
        }
        return nil
    }

    /// The window written in the kernel's layouts and read back is the same window (xfrm_replay_state_esn.bmp
    /// for any size, xfrm_replay_state.bitmap for windows up to 32).
    static func compareLayouts(_ w: ReplayWindow) -> String? {
        let ring = ReplayWindow(size: w.size, esn: w.esn, top: w.top, bitmap: .ring(w.ringBitmap))
        if ring.receivedBits != w.receivedBits { return "the ring bitmap does not restore the window (\(w.size))" }
        if w.size <= 32 {
            let legacy = ReplayWindow(size: w.size, esn: w.esn, top: w.top, bitmap: .legacy(w.legacyBitmap))
            if legacy.receivedBits != w.receivedBits { return "the legacy bitmap does not restore the window" }
        }
        return nil
    }
}

/// Reads a fuzzer's bytes front to back; past the end every read is 0.
public struct ByteReader {
    private let bytes: UnsafeRawBufferPointer
    private var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var isEmpty: Bool { self.offset >= self.bytes.count }
    /// What is left, without consuming it.
    public var rest: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: self.bytes[min(self.offset, self.bytes.count)...]) }

    public mutating func byte() -> UInt8 {
        guard self.offset < self.bytes.count else { return 0 }
        defer { self.offset += 1 }
        return self.bytes[self.offset]
    }

    public mutating func u16() -> UInt16 { UInt16(self.byte()) << 8 | UInt16(self.byte()) }
    public mutating func u32() -> UInt32 { UInt32(self.u16()) << 16 | UInt32(self.u16()) }
    public mutating func u64() -> UInt64 { UInt64(self.u32()) << 32 | UInt64(self.u32()) }

    /// The next `n` bytes (fewer at the end).
    public mutating func take(_ n: Int) -> [UInt8] {
        let end = min(self.offset + max(n, 0), self.bytes.count)
        defer { self.offset = end }
        return self.offset < end ? Array(self.bytes[self.offset..<end]) : []
    }
}
